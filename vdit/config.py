"""Configs are data: typed dataclasses, loaded from YAML with dotted `key=value` overrides.

Every problem (an unknown key, a value of the wrong type, a value out of range, sections that
disagree) is reported with its full dotted key and what is allowed, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vdit.data.physics import WorldConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "default.yaml"


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its dotted key."""


@dataclass(frozen=True)
class ModelConfig:
    """The diffusion transformer."""

    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    patch: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) over the latent
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params stay float32
    remat: Literal["none", "full", "dots"] = "none"
    scan_layers: bool = True
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    rope_theta: float = 10000.0

    def validate(self) -> list[str]:
        problems = _positive(self, "width", "depth", "heads", "mlp_ratio", "rope_theta")
        problems += [f"patch: every entry must be >= 1, got {self.patch}"] * any(
            p < 1 for p in self.patch
        )
        if self.heads > 0 and self.width % self.heads:
            problems.append(f"width: {self.width} is not divisible by heads={self.heads}")
        elif self.heads > 0 and (self.width // self.heads) % 8:
            problems.append(
                f"heads: head dim width/heads = {self.width // self.heads} must be a multiple of 8 "
                "(3D RoPE splits it across t, h, w)"
            )
        return problems


@dataclass(frozen=True)
class TextConfig:
    """Caption tokenizer and text encoder."""

    encoder: Literal["transformer", "precomputed"] = "transformer"
    max_length: int = 32  # tokens, including the leading BOS
    width: int = 128
    depth: int = 2
    heads: int = 4

    def validate(self) -> list[str]:
        problems = _positive(self, "max_length", "width", "depth", "heads")
        if self.heads > 0 and self.width % self.heads:
            problems.append(f"width: {self.width} is not divisible by heads={self.heads}")
        return problems


@dataclass(frozen=True)
class AutoencoderConfig:
    """Pixels <-> latent. `space_to_depth` is a lossless stand-in for a learned autoencoder."""

    kind: Literal["space_to_depth"] = "space_to_depth"
    factors: tuple[int, int, int] = (1, 4, 4)  # (time, height, width) compression

    def validate(self) -> list[str]:
        if any(f < 1 for f in self.factors):
            return [f"factors: every entry must be >= 1, got {self.factors}"]
        return []


@dataclass(frozen=True)
class DataConfig:
    """Where clips come from. The physics world generates clip i from seed (seed, i)."""

    source: Literal["physics"] = "physics"
    world: WorldConfig = field(default_factory=WorldConfig)
    num_clips: int = 1_000_000  # size of the training index space (an epoch)
    num_eval_clips: int = 16  # fixed held-out clips for the eval loss
    stats_clips: int = 64  # clips used to estimate per-channel latent mean and std
    seed: int = 0
    prefetch: int = 4  # batches rendered ahead on a background thread

    def validate(self) -> list[str]:
        problems = [f"world.{p}" for p in self.world.validate()]
        return problems + _positive(self, "num_clips", "num_eval_clips", "stats_clips")


@dataclass(frozen=True)
class DiffusionConfig:
    """Rectified flow: x_t = (1 - t) x0 + t eps, target v = eps - x0."""

    t_mean: float = 0.0  # logit-normal location
    t_std: float = 1.0  # logit-normal scale
    shift: float | None = None  # None: sqrt(tokens / shift_base_tokens)
    shift_base_tokens: int = 256
    caption_dropout: float = 0.1
    eval_timesteps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)

    def validate(self) -> list[str]:
        problems = _positive(self, "t_std", "shift_base_tokens")
        if self.shift is not None and self.shift <= 0:
            problems.append(f"shift: must be > 0 or null (auto), got {self.shift}")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not self.eval_timesteps or any(not 0.0 < t < 1.0 for t in self.eval_timesteps):
            problems.append(f"eval_timesteps: need values in (0, 1), got {self.eval_timesteps}")
        return problems


@dataclass(frozen=True)
class SampleConfig:
    """Generation from prompts: at the end of training and in `vdit sample`."""

    sampler: Literal["euler", "heun"] = "euler"
    steps: int = 32
    guidance: float = 4.0
    prompts: tuple[str, ...] = (
        "a large red ball falls and bounces twice",
        "a medium blue ball rolls right",
    )
    num_per_prompt: int = 2
    seed: int = 0
    fps: float = 8.0

    def validate(self) -> list[str]:
        problems = _positive(self, "steps", "num_per_prompt", "fps")
        if self.guidance < 0:
            problems.append(f"guidance: must be >= 0, got {self.guidance}")
        return problems


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging, evaluation and checkpoint cadence."""

    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = True
    sample_at_end: bool = True

    def validate(self) -> list[str]:
        problems = _positive(
            self, "steps", "batch_size", "lr", "log_every", "eval_every", "checkpoint_every",
            "keep_checkpoints", "grad_clip",
        )
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        for name in ("min_lr_ratio", "ema_decay", "b1", "b2"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        return problems


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (-1: the devices left over); `rules` names a logical-axis table."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1
    rules: Literal["default"] = "default"

    def validate(self) -> list[str]:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor,
                 "context": self.context}
        problems = [f"{k}: must be >= 1 or -1, got {v}" for k, v in sizes.items()
                    if v == 0 or v < -1]
        if sum(v == -1 for v in sizes.values()) > 1:
            problems.append("data: at most one mesh axis may be -1")
        return problems


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def validate(self) -> list[str]:
        problems = []
        for f in dataclasses.fields(self):
            problems += [f"{f.name}.{p}" for p in getattr(self, f.name).validate()]
        if problems:
            return problems
        if self.text.encoder == "precomputed" and self.data.source == "physics":
            problems.append(
                "text.encoder: 'precomputed' needs a data source that supplies text embeddings; "
                "data.source 'physics' supplies caption tokens (use 'transformer')"
            )
        # Cross-section checks: the video must cut evenly into latents, the latents into patches.
        w, ae, p = self.data.world, self.autoencoder.factors, self.model.patch
        for axis, size, f, pp in zip("thw", (w.frames, w.height, w.width), ae, p, strict=True):
            if size % f:
                problems.append(
                    f"autoencoder.factors: data.world size {size} along {axis} is not "
                    f"divisible by factor {f}"
                )
            elif (size // f) % pp:
                problems.append(
                    f"model.patch: latent size {size // f} along {axis} is not divisible by "
                    f"patch {pp}"
                )
        return problems

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(T', H', W', C) of one clip's latent."""
        w, (ft, fh, fw) = self.data.world, self.autoencoder.factors
        return (w.frames // ft, w.height // fh, w.width // fw, 3 * ft * fh * fw)

    def num_tokens(self) -> int:
        """Spacetime tokens per clip: T'/pt * H'/ph * W'/pw."""
        t, h, w, _ = self.latent_shape()
        pt, ph, pw = self.model.patch
        return (t // pt) * (h // ph) * (w // pw)


# --- loading ---------------------------------------------------------------------------------


def _positive(section: Any, *names: str) -> list[str]:
    return [f"{n}: must be > 0, got {getattr(section, n)}" for n in names
            if getattr(section, n) <= 0]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"{key}: unsupported annotation {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; allowed: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.depth=6", "train.lr=3e-4"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: dict) -> Config:
    """Build and validate a Config; raises ConfigError naming every bad key."""
    config = _build(Config, data, "")
    problems = config.validate()
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (default: experiments/default.yaml) + dotted overrides -> validated Config."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return from_dict(_merge(data, parse_overrides(overrides or [])))


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML and JSON."""

    def plain(x: Any) -> Any:
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
