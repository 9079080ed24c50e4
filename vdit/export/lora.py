"""`vdit export RUN --to lora [--format diffusers | comfyui] [--merge]`: a LoRA run's adapters
(`train.lora`, a `model.kind: wan` run) as the file other tools load.

    OUT/lora_diffusers.safetensors  PEFT names, transformer.blocks.0.attn1.to_q.lora_A.weight
                                    [r, in] and .lora_B.weight [out, r]
                                    (`WanPipeline.load_lora_weights`)
    OUT/lora_comfyui.safetensors    diffusion_model.blocks.0.self_attn.q.lora_down.weight,
                                    .lora_up.weight and .alpha = rank (ComfyUI, musubi-tuner)
    OUT/vdit_export.json            run, step, weights, rank, alpha, targets, format

B is written with the run's alpha / rank folded in, so each tool's own rule gives scale 1
(diffusers without adapter metadata takes alpha = rank; ComfyUI reads .alpha = rank): loaded at
multiplier 1, either reproduces the run. Names go through vdit/io/wan_lora.py's map, the one
`vdit sample --lora` reads back. `--merge` writes a full diffusers transformer folder with the
adapters folded in instead: what `--to diffusers` writes for a LoRA run.
"""

from __future__ import annotations

import json
from pathlib import Path

from vdit import __version__
from vdit.config import Config, ConfigError
from vdit.io import atomic

FORMATS = ("diffusers", "comfyui")


def adapter_tensors(cfg: Config, params: dict, base: dict, fmt: str) -> dict:
    """A LoRA run's adapters (a tree, as TrainState holds them) and its frozen base -> the
    tensors of a LoRA file in `fmt`, alpha / rank folded into B."""
    from vdit.export.diffusers import stacked_blocks, transformer_spec
    from vdit.io.wan_lora import lora_tensors
    from vdit.models import lora

    params, base = (stacked_blocks(t, cfg.model.depth) for t in (params, base))
    adapters = lora.by_name(params)
    targets = lora.targets_of(adapters, base)
    flat = lora.flat_layout(lora.scaled(adapters, cfg.train.lora.scale()), targets)
    return lora_tensors(flat, transformer_spec(cfg), fmt)


def export_lora(run_dir: Path, cfg: Config, out: Path, *, fmt: str = "diffusers",
                raw: bool = False, step: int | None = None, merge: bool = False,
                dtype: str = "float32", pipeline: str | Path | None = None,
                max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """See the module doc; returns OUT."""
    from safetensors.numpy import save_file

    from vdit.export.diffusers import check_exportable, export_diffusers
    from vdit.io.checkpoint import Checkpointer

    check_exportable(cfg, run_dir)
    if not cfg.train.lora.enabled:
        raise ConfigError(f"--to lora: {run_dir} trains every parameter (train.lora.rank 0), "
                          "so it has no adapters; export it --to diffusers")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if merge:
        return export_diffusers(run_dir, cfg, out, raw=raw, step=step, dtype=dtype,
                                pipeline=pipeline, max_shard_bytes=max_shard_bytes)
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    state, _ = ckpt.restore_raw(step)
    ckpt.close()
    tensors = adapter_tensors(cfg, state["params"] if raw else state["ema_params"],
                              state["stats"]["base"], fmt)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lora_{fmt}.safetensors"
    lc = cfg.train.lora
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "vdit_version": __version__,
                                               "lora_rank": str(lc.rank)})
    info = {"vdit_version": __version__, "run": str(run_dir.resolve()), "file": path.name,
            "format": fmt, "step": int(state["step"]), "weights": "raw" if raw else "ema",
            "rank": lc.rank, "alpha": lc.rank if lc.alpha is None else lc.alpha,
            "scale_in_b": lc.scale(), "targets": lc.targets or "default",
            "tensors": len(tensors)}
    atomic.write_text(out / "vdit_export.json", json.dumps(info, indent=2) + "\n")
    return out
