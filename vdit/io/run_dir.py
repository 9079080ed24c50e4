"""Run directories and trained weights, read without the jobs that wrote them.

A run directory holds the resolved `config.yaml`, `checkpoints/` (orbax), `metrics.jsonl` and
`samples/`. This module reads and writes its config, and loads the weights that sampling,
evaluation and tokenizing need: a DiT's (from a run, a safetensors export or a param-only
checkpoint) and a trained autoencoder's. Building the system that runs the weights is the
caller's job (`vdit.sample.loading.load_for_sampling` for a DiT).
"""

from __future__ import annotations

import os
from pathlib import Path

from vdit import config as config_lib
from vdit.config import Config, ConfigError
from vdit.io import atomic
from vdit.io.checkpoint import Checkpointer, is_params_checkpoint, load_params
from vdit.io.safetensors_io import ExportError, flat_leaves, is_export, read_export

# Keys that may change when a run is resumed; anything else would silently change the experiment.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint", "train.tensorboard",
    "train.sample_at_end", "train.sample_every", "train.max_bad_steps", "data.prefetch", "mesh.",
    "sample.",
)


def check_output_dir(path: str | Path, argument: str) -> Path:
    """Refuse, before any work is done, a folder to write into that cannot be one: `path` or
    the nearest of its ancestors that exists is a file, or is not writable. `argument` names
    what the user gave (`--out`, `train.run_dir`), so the error points at it."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor)
                    or str(p) == ".")
    if not existing.is_dir():
        what = "exists and is not a folder" if existing == path else f"is under {existing}, a file"
        raise ConfigError(f"{argument}: {path} {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{argument}: {path}: cannot write in {existing} (permission denied)")
    return path


def check_resume_compatible(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume a run under a config that changes the experiment, naming the keys."""
    check_output_dir(run_dir, "train.run_dir")
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists() or not (run_dir / "checkpoints").exists():
        return
    saved = config_lib.load_config(saved_path)
    changed = [k for k in config_lib.diff(saved, cfg) if not k.startswith(RESUMABLE_KEYS)]
    if changed:
        raise ConfigError(
            f"{run_dir} holds a run whose config differs in: {', '.join(changed)}. "
            "Resume with the same values, or choose a new train.run_dir."
        )


def save_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "config.yaml", config_lib.dump_yaml(cfg))


def run_config(run_dir: str | Path) -> Config:
    """The resolved config of a run directory; a folder that is not one is named."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a vdit run directory (no config.yaml)")
    return config_lib.load_config(run_dir / "config.yaml")


def load_dit_weights(path: str | Path, step: int | None = None,
                     raw: bool = False) -> tuple[Config, dict, dict, int]:
    """(config, params, stats, step) of a DiT run directory (EMA params unless `raw`; the
    newest readable checkpoint unless `step`), a safetensors export or a param-only checkpoint
    (which hold the params they were made with). Arrays come back whole, on one device; a
    LoRA run's (or export's) with its adapters folded into its base (`fold_lora`)."""
    path = Path(path)
    if is_export(path) or is_params_checkpoint(path):
        tensors, info = read_export(path) if is_export(path) else load_params(path)
        if info.get("kind") != "dit":
            raise ConfigError(f"{path} exports a {info.get('kind')!r}, not a text-to-video DiT")
        cfg = config_lib.from_dict(info["config"])
        return (cfg, *fold_lora(cfg, tensors["params"], tensors["stats"]), int(info["step"]))
    cfg = run_config(path)
    ckpt = Checkpointer(path / "checkpoints", async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"{path} has no checkpoint yet")
    state, _ = ckpt.restore(None, step)
    ckpt.close()
    if "vae" in state["params"]:
        raise ConfigError(f"{path} is an autoencoder run, not a text-to-video DiT run")
    params = state["params"] if raw else state["ema_params"]
    return (cfg, *fold_lora(cfg, params, state["stats"]), int(state["step"]))


def fold_lora(cfg: Config, params: dict, stats: dict) -> tuple[dict, dict]:
    """(params, stats) of a DiT; a LoRA run's adapters folded into its frozen base
    (stats["base"], dropped), float32: what sampling, evaluating and exporting run."""
    if not cfg.train.lora.enabled:
        return params, stats
    import jax
    import numpy as np

    from vdit.models.lora import fold

    merged = jax.tree.map(np.asarray, fold(stats["base"], params, cfg.train.lora.scale()))
    return merged, {k: v for k, v in stats.items() if k != "base"}


def check_params_match(init, params: dict, where: Path) -> None:
    """Refuse weights whose names or shapes differ from those `init(key)["params"]` makes."""
    import flax.linen as nn
    import jax

    abstract = nn.unbox(jax.eval_shape(init, jax.random.key(0)))["params"]
    expected = {k: tuple(v.shape) for k, v in flat_leaves(abstract).items()}
    found = {k: tuple(v.shape) for k, v in flat_leaves(params).items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{k}: expected shape {expected[k]}, found {found[k]}"
             for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    if missing or extra or wrong:
        lines = ([f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in extra[:5]]
                 + wrong[:5])
        raise ExportError(f"{where}: the weights do not match the config's model:\n  "
                          + "\n  ".join(lines))


def resolve_autoencoder_path(path: str | Path) -> Path:
    """`autoencoder.checkpoint` as a path: as given when it exists (absolute, or relative to
    the working directory, like every other path in a config); else a relative path is looked
    up among the files shipped with vdit (`checkpoints/autoencoder-4x8x8`), so the embedded
    default works from any directory and from an installed wheel. Neither: refused, naming
    every place looked at."""
    if not path:
        raise ConfigError("autoencoder.checkpoint: a causal_vae autoencoder needs a trained "
                          "checkpoint (train one with `vdit train-ae`); or set "
                          "autoencoder.kind=space_to_depth")
    given = Path(path).expanduser()
    if given.exists():
        return given
    looked = [given.absolute()]
    if not given.is_absolute():
        shipped = config_lib.shipped_path(given)
        if shipped.exists():
            return shipped
        looked.append(shipped)
    raise ConfigError(f"autoencoder.checkpoint: {path} does not exist (looked for "
                      + " and ".join(str(p) for p in looked) + ")")


def load_autoencoder(path: str | Path) -> tuple[Config, dict, dict]:
    """(its config, EMA params, latent stats {"mean", "std"}) of a trained autoencoder, from
    an autoencoder run directory (newest readable checkpoint) or an export (`vdit export`)."""
    from vdit.models.autoencoder import make_autoencoder

    path = resolve_autoencoder_path(path)
    if is_export(path):
        tensors, info = read_export(path)
        if info.get("kind") != "autoencoder":
            raise ConfigError(f"autoencoder.checkpoint: {path} exports a {info.get('kind')!r}, "
                              "not an autoencoder")
        cfg = config_lib.from_dict(info["config"])
        check_params_match(_autoencoder_init(cfg, make_autoencoder), tensors["params"], path)
        return cfg, tensors["params"], tensors["stats"]
    if not (path / "config.yaml").exists():
        raise ConfigError(f"autoencoder.checkpoint: {path} is neither an autoencoder run "
                          "directory nor an exported autoencoder")
    cfg = config_lib.load_config(path / "config.yaml")
    ckpt = Checkpointer(path / "checkpoints", async_save=False)
    if ckpt.latest_step() is None:
        raise ConfigError(f"autoencoder.checkpoint: {path} has no checkpoint yet")
    state, _ = ckpt.restore(None)
    ckpt.close()
    if "vae" not in state["ema_params"]:
        raise ConfigError(f"autoencoder.checkpoint: {path} is a DiT run, not an autoencoder run "
                          "(train one with `vdit train-ae`)")
    return cfg, state["ema_params"]["vae"], state["stats"]


def _autoencoder_init(cfg: Config, make_autoencoder):
    """`key -> {"params": autoencoder params}` at the clip shape the autoencoder trained on."""
    import jax.numpy as jnp

    w = cfg.data.world
    video = jnp.zeros((1, w.frames, w.height, w.width, 3), jnp.float32)
    ae = make_autoencoder(cfg.autoencoder)
    return lambda key: {"params": ae.init(key, video)}
