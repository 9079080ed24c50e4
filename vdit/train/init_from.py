"""A DiT run's first weights (`train.init_from`; docs/fine-tuning.md): a published model, a run
or an export, read onto the trainer's param shardings; or, for a LoRA run without a source, the
frozen base of a fresh init.

    PATH is                                    the DiT's params come from
    a diffusers WanTransformer3DModel folder   it (config.json + safetensors, sharded or not)
    a WanPipeline folder, or a `vdit export    its transformer/; Wan 2.2 A14B's two experts:
      --to diffusers` folder                   train.expert high -> transformer/, low ->
                                               transformer_2/, both -> the two
    a vdit run directory                       the EMA params of its newest checkpoint
    a vdit export (--to safetensors / params)  the params it holds

A LoRA source (run or export) gives its adapters folded into its base. The architecture is
checked against the config's `model` section first, naming every key that differs
(`model.depth: config 2, checkpoint 3`). Diffusers folders stream per device slice onto the
shardings (`wan_transformer.load_params(path, target=...)`), so a 14B model never sits whole on
one host; a run is restored sharded (its whole TrainState, onto this mesh); an export is read
on one host (it is one file). Optimizer, EMA (= the loaded params) and step start fresh.

The run records what it started from, with the source's SHA-256, in RUN/init_from.json
(`write_record`); only the first start reads the source: a resume restores its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.config import Config, ConfigError, ModelConfig
from vdit.diffusion.lora_system import BASE_DTYPE, LoraTextToVideo, make_system, values
from vdit.io import atomic
from vdit.parallel.rules import Rules

RECORD = "init_from.json"


# --- what PATH is -------------------------------------------------------------------------------

def transformer_folders(path: Path) -> list[Path] | None:
    """The Wan transformer folder(s) PATH names, high-noise expert first: a diffusers
    transformer folder, a WanPipeline folder's (checked), or a `vdit export --to diffusers`
    folder's; None for anything else."""
    from vdit.io.hf_folder import read_config
    from vdit.io.wan_pipeline import is_pipeline_folder, resolve_pipeline
    from vdit.io.wan_transformer import CLASS_NAME

    if is_pipeline_folder(path):
        return resolve_pipeline(path).expert_folders()
    if (path / "config.json").is_file() and read_config(path).get("_class_name") == CLASS_NAME:
        return [path]
    if (path / "transformer" / "config.json").is_file():
        return [p for p in (path / "transformer", path / "transformer_2") if p.is_dir()]
    return None


def pick_experts(folders: list[Path], expert: str, where: Path) -> dict[str, Path]:
    """{params key: folder}: "" (one DiT) or {"high", "low"} for train.expert both."""
    if expert == "both":
        return {"high": folders[0], "low": folders[-1]}
    if len(folders) == 1:
        return {"": folders[0]}
    if expert == "none":
        raise ConfigError(
            f"train.init_from: {where} holds Wan 2.2's two experts ({folders[0].name}/: high "
            f"noise, {folders[1].name}/: low noise); set train.expert high, low or both, or "
            f"name one folder ({folders[0]})")
    return {"": folders[0] if expert == "high" else folders[1]}


# --- the architecture check ---------------------------------------------------------------------

def architecture(model: ModelConfig, text_width: int, channels: int) -> dict[str, Any]:
    """The config keys that fix a DiT's params (dotted key -> value)."""
    keys = {"model.kind": model.kind, "model.width": model.width, "model.depth": model.depth,
            "model.heads": model.heads, "model.ffn_dim": model.hidden_dim(),
            "model.patch": tuple(model.patch), "model.rope_theta": model.rope_theta,
            "text.width": text_width, "autoencoder.latent_channels": channels}
    if model.kind == "wan":
        keys.update({"model.freq_dim": model.freq_dim,
                     "model.cross_attn_norm": model.cross_attn_norm})
    return keys


def check_architecture(cfg: Config, found: dict[str, Any], where: str | Path) -> None:
    """Refuse a source whose architecture differs from the config, naming every key."""
    wanted = architecture(cfg.model, cfg.text.width, cfg.autoencoder.latent_channels)
    wanted.update({k: _config_value(cfg, k) for k in found if k not in wanted})
    bad = [f"{k}: config {wanted[k]!r}, checkpoint {found[k]!r}" for k in sorted(found)
           if k in wanted and wanted[k] != found[k]]
    if bad:
        raise ConfigError(f"train.init_from: {where} does not match the config:\n  "
                          + "\n  ".join(bad))


def _config_value(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _run_architecture(src: Config) -> dict[str, Any]:
    keys = architecture(src.model, src.text.width, src.autoencoder.latent_channels)
    keys["model.scan_layers"] = src.model.scan_layers
    if src.model.kind == "dit":  # the jointly trained text encoder is part of the params
        keys.update({"text.encoder": src.text.encoder, "text.depth": src.text.depth,
                     "text.heads": src.text.heads})
    return keys


# --- loading ------------------------------------------------------------------------------------

def dit_target(system, mesh, rules: Rules, dtype=None) -> Any:
    """The DiT's params as ShapeDtypeStructs with their shardings (`dtype`: else the init's)."""
    init = system.init_dit if isinstance(system, LoraTextToVideo) else system.init
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed)["params"], mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype,
                                                           sharding=sh),
                        values(boxed)["params"], shardings)


def _onto(params: Any, target: Any) -> Any:
    """Params (host or device, any float dtype) placed as `target` (dtypes, shardings)."""
    shardings = jax.tree.map(lambda t: t.sharding, target)
    return jax.jit(lambda p: jax.tree.map(lambda x, t: jnp.asarray(x).astype(t.dtype), p,
                                          target), out_shardings=shardings)(params)


def _check_structure(params: Any, target: Any, where: Path) -> None:
    from vdit.io.safetensors_io import flat_leaves

    got, want = set(flat_leaves(params)), set(flat_leaves(target))
    problems = ([f"missing {k}" for k in sorted(want - got)[:5]]
                + [f"unexpected {k}" for k in sorted(got - want)[:5]])
    if problems:
        raise ConfigError(f"train.init_from: {where}: the weights do not match the config's "
                          "model:\n  " + "\n  ".join(problems))


def _load_diffusers(cfg: Config, path: Path, folders: list[Path], target: Any,
                    log) -> tuple[Any, dict]:
    from vdit.io.hf_folder import folder_sha256
    from vdit.io.wan_transformer import WEIGHTS, load_params, read_spec

    if not cfg.model.scan_layers:
        raise ConfigError("train.init_from: a diffusers Wan transformer loads into scanned "
                          "blocks; set model.scan_layers true")
    picked = pick_experts(folders, cfg.train.expert, path)
    out, sums = {}, {}
    for key, folder in picked.items():
        spec = read_spec(folder)
        check_architecture(cfg, architecture(spec.model, spec.text_dim, spec.in_channels),
                           folder)
        if spec.out_channels != spec.in_channels:
            raise ConfigError(f"train.init_from: {folder} predicts {spec.out_channels} "
                              f"channels from {spec.in_channels}; vdit's Wan DiT needs the same")
        want = target[key] if key else target
        _, params = load_params(folder, want, log=log)
        _check_structure(params, want, folder)
        out[key] = params
        sums[key or "transformer"] = folder_sha256(folder, WEIGHTS)
    params = out.get("", out)
    return params, {"folders": {k or "transformer": str(f.resolve()) for k, f in picked.items()},
                    "sha256": sums}


def _expert_tree(src: Config, params: Any, cfg: Config, where: Path) -> Any:
    """A run's or export's params as this run's experts take them."""
    theirs, mine = src.train.expert == "both", cfg.train.expert == "both"
    if theirs == mine:
        return params
    if mine:
        return {"high": params, "low": params}
    raise ConfigError(f"train.init_from: {where} holds both Wan 2.2 experts (train.expert "
                      "both); start a one-expert run from a diffusers folder or pipeline")


def _load_run(cfg: Config, path: Path, target: Any, mesh, rules: Rules) -> tuple[Any, dict]:
    from vdit.io.checkpoint import Checkpointer
    from vdit.io.run_dir import run_config
    from vdit.train.state import abstract_state, make_optimizer

    src = run_config(path)
    check_architecture(cfg, _run_architecture(src), path)
    system = make_system(src)
    abstract = abstract_state(system, make_optimizer(src.train), system.stats_shapes(), mesh,
                              rules)
    ckpt = Checkpointer(path / "checkpoints", async_save=False)
    if ckpt.latest_step() is None:
        raise ConfigError(f"train.init_from: {path} has no checkpoint yet")
    state, _ = ckpt.restore(abstract)
    ckpt.close()
    step = int(state.step)
    params = state.ema_params
    if isinstance(system, LoraTextToVideo):  # its adapters folded into its base
        params = jax.jit(system.merged)(params, state.stats)
    del state
    params = _onto(_expert_tree(src, params, cfg, path), target)
    return params, {"step": step, "weights": "ema",
                    "sha256": _tree_sha256(path / "checkpoints" / str(step))}


def _load_export(cfg: Config, path: Path, target: Any) -> tuple[Any, dict]:
    from vdit.io.run_dir import load_dit_weights
    from vdit.io.safetensors_io import WEIGHTS, is_export

    src, params, _, step = load_dit_weights(path)  # a LoRA export comes back folded
    check_architecture(cfg, _run_architecture(src), path)
    params = _expert_tree(src, params, cfg, path)
    _check_structure(params, target, path)
    if is_export(path):  # its checksums were verified by the read
        digest = json.loads((path / "config.json").read_text())["sha256"][WEIGHTS]
    else:
        digest = _tree_sha256(path)
    return _onto(params, target), {"step": step, "sha256": digest}


def load_source(cfg: Config, system, mesh, rules: Rules, dtype=None,
                log=print) -> tuple[Any, dict]:
    """(params on the DiT's shardings in `dtype`, the record of what was read)."""
    from vdit.io.checkpoint import is_params_checkpoint
    from vdit.io.safetensors_io import is_export

    given = cfg.train.init_from
    path = Path(given).expanduser()
    if not path.exists():
        raise ConfigError(f"train.init_from: {given} does not exist")
    target = dit_target(system, mesh, rules, dtype)  # {"high", "low"} for train.expert both
    folders = transformer_folders(path)
    if folders is not None:
        kind = "pipeline" if (path / "model_index.json").is_file() else "diffusers"
        params, record = _load_diffusers(cfg, path, folders, target, log)
    elif is_export(path) or is_params_checkpoint(path):
        kind = "export"
        params, record = _load_export(cfg, path, target)
    elif (path / "config.yaml").is_file():
        kind = "run"
        params, record = _load_run(cfg, path, target, mesh, rules)
    else:
        raise ConfigError(
            f"train.init_from: {given} is none of: a diffusers Wan transformer folder, a "
            "WanPipeline folder, a vdit run directory, a vdit export")
    return params, {"init_from": given, "path": str(path.resolve()), "kind": kind, **record}


def fresh_base(system: LoraTextToVideo, seed: int, mesh, rules: Rules) -> Any:
    """A LoRA run's frozen base without init_from: the DiT a full run of this seed starts
    from, in the base's dtype, on its shardings."""
    target = dit_target(system, mesh, rules, BASE_DTYPE)
    shardings = jax.tree.map(lambda t: t.sharding, target)
    init = jax.jit(lambda key: system.base_from(nn.unbox(system.init_dit(key))["params"]),
                   out_shardings=shardings)
    return init(jax.random.key(seed))


def initial_weights(cfg: Config, system, mesh, rules: Rules,
                    log=print) -> tuple[Any | None, dict, dict | None]:
    """(params to start from, None: the system's init; stats to add; the record or None):
    a full run's params from train.init_from, or a LoRA run's stats["base"] (from it, or a
    fresh init)."""
    lora_run = isinstance(system, LoraTextToVideo)
    if not cfg.train.init_from:
        return None, ({"base": fresh_base(system, cfg.train.seed, mesh, rules)}
                      if lora_run else {}), None
    params, record = load_source(cfg, system, mesh, rules, BASE_DTYPE if lora_run else None,
                                 log=log)
    record["loaded_as"] = "frozen LoRA base (bfloat16)" if lora_run else "params"
    if lora_run:
        return None, {"base": params}, record
    return params, {}, record


def write_record(run_dir: str | Path, record: dict) -> Path:
    """RUN/init_from.json: what the run started from and its SHA-256."""
    path = Path(run_dir) / RECORD
    atomic.write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def _tree_sha256(folder: Path) -> str:
    """SHA-256 of every file under `folder` (relative name, size, bytes; in name order)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(file.relative_to(folder)).encode()
        digest.update(rel + b"\0" + file.stat().st_size.to_bytes(8, "little"))
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
