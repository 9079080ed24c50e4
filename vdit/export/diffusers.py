"""`vdit export RUN_DIR --to diffusers [--pipeline PIPELINE]`: a `model.kind: wan` run as the
folders diffusers loads.

    OUT/transformer/config.json                        WanTransformer3DModel's config
    OUT/transformer/diffusion_pytorch_model*.safetensors  diffusers' tensor names (+ index when
                                                       sharded); EMA params, or raw with --raw
    OUT/vdit_export.json                               run, step, weights, dtype, text encoder

A Wan 2.2 expert run (`train.expert`, vdit/diffusion/experts.py) writes its experts under
their pipeline names: `both` transformer/ (high noise, t >= boundary) and transformer_2/ (low);
`high` transformer/, `low` transformer_2/ (with `--pipeline`, the other expert is the source
pipeline's, which must have two). vdit_export.json names the expert and the boundary.

With `--pipeline` (the WanPipeline folder whose VAE and text encoder the run trained with) OUT
is a whole pipeline: model_index.json, tokenizer/, text_encoder/, vae/ and scheduler/ from that
folder (hard-linked where the file system allows, else copied) and transformer/ from the run;
with two experts model_index.json names transformer_2 and the run's boundary_ratio.
The folder must be the run's own: its text encoder has the SHA-256 the run recorded
(text.checkpoint_sha256), its tokenizer the one the run's shards record, and its VAE the very
weights and latent statistics the run's checkpoint carries in stats/autoencoder; anything else
is refused, naming the part.

Weights move by transposes and reshapes only (`vdit/io/wan_transformer.py`), so float32
export -> import (`wan_transformer.load_params`) is bit-identical to the run's params. The run
computes in diffusers what it computed in vdit when given its caption as vdit gave it: embeddings
zero-padded to `text.max_length` (WanPipeline: `max_sequence_length=text.max_length`; Wan's
own runs use 512), no mask (text_to_video.py: `apply_dit`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from vdit import __version__
from vdit import config as config_lib
from vdit.config import Config, ConfigError
from vdit.io import atomic
from vdit.io import wan_transformer as wt
from vdit.io.safetensors_io import ExportError

DTYPES = ("float32", "bfloat16")
PIPELINE_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler")
INFO = "vdit_export.json"
ROPE_THETA = 10000.0  # diffusers' WanRotaryPosEmbed has no other


def check_exportable(cfg: Config, run_dir: Path) -> None:
    """Refuse, before anything is read, a run that diffusers has no class for."""
    if cfg.model.kind != "wan":
        raise ConfigError(
            f"--to diffusers: {run_dir} trains model.kind {cfg.model.kind!r} (vdit's own DiT), "
            "which diffusers has no model class for; only a model.kind 'wan' run exports to "
            "diffusers' WanTransformer3DModel (any run exports --to safetensors, stablehlo or "
            "params)")
    if cfg.model.rope_theta != ROPE_THETA:
        raise ConfigError(f"--to diffusers: model.rope_theta is {cfg.model.rope_theta}; "
                          f"diffusers' Wan transformer uses {ROPE_THETA} only")


def transformer_spec(cfg: Config) -> wt.WanTransformerSpec:
    """The diffusers spec of a `model.kind: wan` run: its model section, the caption width
    (text.width) and the latent channels in and out."""
    c = cfg.autoencoder.latent_channels
    config = wt.diffusers_config(cfg.model, cfg.text.width, c, c)
    return wt.spec_from_config(config, "the run's model section")


def stacked_blocks(params: dict[str, Any], depth: int) -> dict[str, Any]:
    """Params of an unscanned run (blocks_0 ... blocks_{depth-1}) with the blocks stacked on a
    leading layer axis, as a scanned run holds them and the diffusers map reads them."""
    if "blocks" in params or "blocks_0" not in params:
        return params
    import jax

    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    out["blocks"] = jax.tree.map(lambda *layers: np.stack(layers),
                                 *[params[f"blocks_{i}"] for i in range(depth)])
    return out


def write_transformer(out: str | Path, cfg: Config, params: dict[str, Any], *,
                      dtype: str = "float32", max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """OUT/ as a diffusers transformer folder of the run's params (numpy, scanned or not):
    what `vdit export --to diffusers` writes under transformer/."""
    from flax import traverse_util

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    spec = transformer_spec(cfg)
    params = stacked_blocks(params, cfg.model.depth)
    found = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
    expected = {k: ((cfg.model.depth,) if leaf.stacked else ()) + leaf.shape
                for k, leaf in wt.leaves(spec).items()}
    problems = ([f"missing {'/'.join(k)}" for k in sorted(set(expected) - set(found))]
                + [f"unexpected {'/'.join(k)}" for k in sorted(set(found) - set(expected))]
                + [f"{'/'.join(k)}: expected shape {expected[k]}, found {found[k]}"
                   for k in sorted(set(expected) & set(found)) if expected[k] != found[k]])
    if problems:
        raise ExportError("the run's params do not match its model section:\n  "
                          + "\n  ".join(problems[:8]))
    return wt.write_folder(out, spec, params, dtype=dtype, max_shard_bytes=max_shard_bytes)


# --- the pipeline the run came from ------------------------------------------------------------

def check_pipeline_text(spec, cfg: Config) -> list[str]:
    """The pipeline's text encoder and tokenizer against those the run recorded (its config's
    text.checkpoint_sha256; its shards' tokenizer fingerprint while they exist)."""
    from vdit.data.captions import tokenizer_sha256
    from vdit.io.hf_t5 import checkpoint_sha256

    problems = []
    run_sha = cfg.text.checkpoint_sha256
    text_sha = checkpoint_sha256(spec.text_encoder)
    if text_sha != run_sha:
        problems.append(f"text_encoder/ has SHA-256 {text_sha}, the run trained on captions of "
                        f"{cfg.text.checkpoint or '?'} (text.checkpoint_sha256 {run_sha or '?'})")
    run_tok = _run_tokenizer_sha(cfg)
    tok_sha = tokenizer_sha256(spec.tokenizer)
    if run_tok and tok_sha != run_tok:
        problems.append(f"tokenizer/ has SHA-256 {tok_sha or 'none (no tokenizer file)'}, the "
                        f"run's shards {cfg.data.shards} record {run_tok}")
    return problems


def refuse(spec, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"--pipeline {spec.path} is not the pipeline this run trained with:"
                          "\n  " + "\n  ".join(problems) + "\nexport without --pipeline "
                          "(transformer/ only), or name the folder whose text encoder and VAE "
                          "the run used")


def _run_tokenizer_sha(cfg: Config) -> str:
    """The tokenizer fingerprint the run's shards record ("" when they are gone or silent)."""
    from vdit.data.captions import shards_encoder

    try:
        return (shards_encoder(cfg.data.shards) or {}).get("tokenizer_sha256", "")
    except (OSError, ValueError):
        return ""


def vae_problems(folder: Path, cfg: Config, stats: dict[str, Any]) -> list[str]:
    """The pipeline's VAE against the frozen one the run's checkpoint carries."""
    from flax import traverse_util

    from vdit.io.diffusers_wan import load_wan_vae
    from vdit.io.hf_folder import CheckpointFormatError

    if cfg.autoencoder.kind != "wan":
        return [f"the run's autoencoder is autoencoder.kind {cfg.autoencoder.kind!r}, not the "
                "pipeline's Wan VAE"]
    try:
        _, params, latent = load_wan_vae(folder)
    except CheckpointFormatError as e:
        return [f"vae/: {e}"]
    theirs = traverse_util.flatten_dict(params)
    ours = traverse_util.flatten_dict(stats["autoencoder"])
    same = set(theirs) == set(ours) and all(
        np.shape(ours[k]) == np.shape(theirs[k]) and np.array_equal(ours[k], theirs[k])
        for k in ours)
    same = same and all(np.array_equal(stats[k], latent[k]) for k in ("mean", "std"))
    if same:
        return []
    return [f"vae/ holds other weights or latent statistics than the VAE the run's checkpoint "
            f"carries (autoencoder.checkpoint {cfg.autoencoder.checkpoint})"]


def _place(src: Path, dst: Path) -> None:
    """`src` at `dst`: a hard link (no copy of a multi-GB text encoder) where the file system
    allows, else a copy; renamed into place either way."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.part"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _copy_folder(src: Path, dst: Path) -> None:
    """Every file of `src` at `dst` (placed), and files `dst` has beyond them removed."""
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        _place(src / rel, dst / rel)
    keep = set(files)
    for old in (p for p in dst.rglob("*") if p.is_file()):
        if old.relative_to(dst) not in keep:
            old.unlink()


def copy_parts(spec, out: Path, boundary: float | None = None) -> None:
    """tokenizer/ text_encoder/ vae/ scheduler/ of the source pipeline into OUT (files the
    source's part does not have are removed from OUT's, so an export written over another
    never mixes two), its licence files, and model_index.json last: a folder with a
    model_index.json is whole. With `boundary` (OUT holds transformer_2/ too) it names both
    experts and that boundary_ratio; else a two-expert source (Wan 2.2 A14B) becomes a
    one-transformer pipeline: the run trained one transformer."""
    for part in PIPELINE_PARTS:
        _copy_folder(spec.path / part, out / part)
    for licence in spec.path.glob("LICENSE*"):
        if licence.is_file():
            _place(licence, out / licence.name)
    index = dict(spec.index)
    if boundary is not None:
        index.update(transformer_2=["diffusers", "WanTransformer3DModel"],
                     boundary_ratio=boundary)
    elif spec.transformer_2 is not None:
        index.update(transformer_2=[None, None], boundary_ratio=None)
    atomic.write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")


def expert_parts(cfg: Config, params: dict[str, Any]) -> dict[str, Any]:
    """The run's params per export folder: transformer (none, high; both's high) and
    transformer_2 (low; both's low)."""
    from vdit.diffusion.experts import FOLDERS

    expert = cfg.train.expert
    if expert == "both":
        return {FOLDERS[e]: params[e] for e in ("high", "low")}
    return {FOLDERS.get(expert, "transformer"): params}


def partner_problems(spec, cfg: Config) -> list[str]:
    """A one-expert run exported into a pipeline takes the other expert from the source: it
    must have two, of the run's architecture."""
    if cfg.train.expert not in ("high", "low"):
        return []
    if spec.transformer_2 is None:
        return [f"the run trains Wan 2.2's {cfg.train.expert}-noise expert (train.expert); the "
                "pipeline has one transformer, so the other range has no expert (export "
                "without --pipeline, or name a two-expert pipeline)"]
    other = spec.transformer_2 if cfg.train.expert == "high" else spec.transformer
    mine = transformer_spec(cfg)
    if (other.model, other.text_dim, other.in_channels) != (mine.model, mine.text_dim,
                                                           mine.in_channels):
        return [f"its other expert has another architecture than the run's model section "
                f"({other.model} vs {mine.model})"]
    return []


def export_diffusers(run_dir: Path, cfg: Config, out: Path, *, raw: bool = False,
                     step: int | None = None, dtype: str = "float32",
                     pipeline: str | Path | None = None,
                     max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """See the module doc; returns OUT."""
    from vdit.io.checkpoint import Checkpointer

    check_exportable(cfg, run_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    source = None
    if pipeline is not None:  # a wrong folder is refused before the checkpoint is read
        from vdit.io.wan_pipeline import resolve_pipeline

        source = resolve_pipeline(pipeline)
        refuse(source, check_pipeline_text(source, cfg) + partner_problems(source, cfg))
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    state, meta = ckpt.restore_raw(step)
    ckpt.close()
    if meta.get("system", "dit") != "dit":
        raise ConfigError(f"--to diffusers: {run_dir} is an autoencoder run, not a DiT run")
    if source is not None:  # the VAE against the frozen weights the checkpoint carries
        refuse(source, vae_problems(source.vae, cfg, state["stats"]))
    from vdit.io.run_dir import fold_lora

    # A LoRA run: its adapters folded into its base.
    params, _ = fold_lora(cfg, state["params"] if raw else state["ema_params"], state["stats"])
    parts = expert_parts(cfg, params)  # {folder: params}: an expert run's under their names
    origin = dict.fromkeys(parts, "run")
    for folder, params in parts.items():
        write_transformer(out / folder, cfg, params, dtype=dtype,
                          max_shard_bytes=max_shard_bytes)
    if source is not None and cfg.train.expert in ("high", "low"):  # the other range's expert
        other = "transformer_2" if cfg.train.expert == "high" else "transformer"
        _copy_folder(source.path / other, out / other)
        origin[other] = "pipeline"
    boundary = _boundary(cfg)
    t = cfg.text
    info = {"vdit_version": __version__, "run": str(run_dir.resolve()),
            "step": int(state["step"]), "weights": "raw" if raw else "ema", "dtype": dtype,
            "pipeline": None if source is None else str(source.path.resolve()),
            "model": config_lib.to_dict(cfg)["model"],
            "expert": cfg.train.expert, "boundary_ratio": boundary,
            "transformers": origin,
            "text_encoder": {"kind": t.encoder, "path": t.checkpoint, "sha256": t.checkpoint_sha256,
                             "width": t.width, "max_length": t.max_length, "dtype": t.dtype},
            "usage": f"captions zero-padded to {t.max_length} tokens, unmasked (WanPipeline: "
                     f"max_sequence_length={t.max_length})"}
    atomic.write_text(out / INFO, json.dumps(info, indent=2) + "\n")
    if source is not None:
        copy_parts(source, out, None if cfg.train.expert == "none" else boundary)
    return out


def _boundary(cfg: Config) -> float | None:
    """An expert run's boundary_ratio (config.yaml names it; None for a one-transformer run)."""
    if cfg.train.expert == "none":
        return None
    from vdit.diffusion.experts import boundary_of

    return boundary_of(cfg)
