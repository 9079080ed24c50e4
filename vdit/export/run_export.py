"""`vdit export RUN_DIR --to safetensors | stablehlo | params | diffusers | lora`: a run leaves
vdit."""

from __future__ import annotations

from pathlib import Path

from vdit import config as config_lib
from vdit.io.checkpoint import Checkpointer
from vdit.io.run_dir import check_output_dir
from vdit.io.safetensors_io import seal, write_export

ROUTES = ("safetensors", "stablehlo", "params", "diffusers", "lora")


def export_run(run_dir: str | Path, *, to: str = "safetensors", out: str | Path | None = None,
               raw: bool = False, step: int | None = None, overwrite: bool = False,
               dtype: str | None = None, pipeline: str | Path | None = None,
               max_shard_bytes: int = 5 * 2 ** 30, lora_format: str | None = None,
               merge: bool = False) -> Path:
    """Export the EMA (or raw) params and stats of a DiT or autoencoder run; returns the folder.

    safetensors: an autoencoder exports its VAE params (the discriminator stays behind); a DiT
    its params with the frozen autoencoder's inside `stats/autoencoder`. stablehlo: the same,
    plus the DiT's generation function as a serialized program. params: a param-only orbax
    checkpoint, consolidated onto one host, that `vdit sample` restores anywhere. diffusers: a
    `model.kind: wan` run's transformer/ folder in `dtype` (float32 by default), or with
    `pipeline` a whole WanPipeline folder (vdit/export/diffusers.py); any other run is refused.
    lora: a LoRA run's adapters as one .safetensors in `lora_format` (diffusers | comfyui), or
    with `merge` a diffusers transformer folder with them folded in (vdit/export/lora.py).

    A non-empty `out` (an earlier export) is refused unless `overwrite`; then the export's files
    are written over, and nothing else in `out` is touched."""
    if to not in ROUTES:
        raise ValueError(f"--to {to!r}; allowed: {', '.join(ROUTES)}")
    merged = to == "diffusers" or (to == "lora" and merge)
    if not merged and (dtype is not None or pipeline is not None):
        raise config_lib.ConfigError(f"--dtype and --pipeline go with --to diffusers, not "
                                     f"--to {to}" + " without --merge" * (to == "lora"))
    if to != "lora" and (lora_format is not None or merge):
        raise config_lib.ConfigError(f"--format and --merge go with --to lora, not --to {to}")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a vdit run directory (no config.yaml)")
    out = check_output_dir(out if out else run_dir / f"export_{to}", "--out")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise config_lib.ConfigError(f"{out} is not empty (an earlier export?); choose another "
                                     "--out, or pass --overwrite to write over it")
    cfg = config_lib.load_config(run_dir / "config.yaml")
    if to == "lora":
        from vdit.export.lora import export_lora

        return export_lora(run_dir, cfg, out, fmt=lora_format or "diffusers", raw=raw, step=step,
                           merge=merge, dtype=dtype or "float32", pipeline=pipeline,
                           max_shard_bytes=max_shard_bytes)
    if to == "diffusers":
        from vdit.export.diffusers import export_diffusers

        return export_diffusers(run_dir, cfg, out, raw=raw, step=step, dtype=dtype or "float32",
                                pipeline=pipeline, max_shard_bytes=max_shard_bytes)
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    state, meta = ckpt.restore_raw(step)
    ckpt.close()
    kind = meta.get("system", "dit")
    params = state["params"] if raw else state["ema_params"]
    if kind == "autoencoder":
        params = params["vae"]
    info = {"kind": kind, "config": config_lib.to_dict(cfg), "step": int(state["step"]),
            "weights": "raw" if raw else "ema"}
    if kind == "dit" and cfg.text.encoder != "transformer":  # the encoder a caption needs
        info["text_encoder"] = {"kind": cfg.text.encoder, "path": cfg.text.checkpoint,
                                "sha256": cfg.text.checkpoint_sha256, "width": cfg.text.width,
                                "max_length": cfg.text.max_length, "dtype": cfg.text.dtype}
    elif kind == "dit":  # what turns a caption into the tokens the weights were trained on
        from vdit.data.physics import physics_tokenizer
        from vdit.models.text import BOS, PAD, UNK

        tok = physics_tokenizer(cfg.text.max_length)
        info["tokenizer"] = {"kind": "words", "pattern": "[a-z]+ after lower-casing",
                             "max_length": tok.max_length, "bos": BOS, "pad": PAD, "unk": UNK,
                             "words": list(tok.words)}
    tensors = {"params": params, "stats": state["stats"]}
    if to == "params":
        from vdit.io.checkpoint import save_params

        return save_params(out, tensors, info)
    write_export(out, tensors, info)
    if to == "stablehlo":
        if kind != "dit":
            raise ValueError("--to stablehlo exports a DiT's sampler; this run trains an "
                             "autoencoder (use --to safetensors)")
        from vdit.export.stablehlo import export_sampler

        export_sampler(out)
        seal(out)  # the program and tokenizer are checksummed with the weights
    return out
