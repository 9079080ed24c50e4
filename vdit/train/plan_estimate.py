"""What `vdit plan` cannot compile, it estimates; what does not fit, it suggests a fix for.

`estimate_temporaries` is the GPU path's stand-in for the compiler's temporaries (no GPU
compiler runs on a CPU host): activations kept for the backward pass, by remat policy, plus the
float32 gradients and the optimizer's update. Per token and layer a transformer block keeps
about 34 width-sized 16-bit values without remat once attention is a flash kernel (Korthikanti
et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", 34·s·b·h bytes
without the 5·a·s²·b score term); the DiT's cross-attention and adaLN modulation add about 10.
`dots` keeps the matmul outputs (~12), `full` only the layer input (the residual stream, f32).
Calibration: for experiments/plan_1b.yaml at one clip per chip (16k tokens, remat dots) this
gives 15.1 GiB of temporaries; the TPU compiler's memory_analysis() for v5p-64 says 15.0 GiB.
"""

from __future__ import annotations

import math

from vdit.config import Config

# Width-sized values kept per token and layer, by model.remat (see the module doc).
KEPT_PER_TOKEN_LAYER = {"none": 44, "dots": 12, "full": 2}
LAYER_WORKING_SET = 44  # one layer's activations, live while its backward runs


def tokens_per_chip(cfg: Config, sizes: dict) -> float:
    """Tokens one device processes at once: its slice of one micro-batch."""
    micro = getattr(cfg.train, "microbatches", 1)
    clips = cfg.train.batch_size / (sizes["data"] * sizes["fsdp"]) / micro
    return clips * cfg.num_tokens() / sizes["context"]


def estimate_temporaries(cfg: Config, sizes: dict, param_bytes: int) -> float:
    """Per-chip bytes beyond the state and the batch: activations + gradients + update."""
    act = 2 if cfg.model.dtype == "bfloat16" else 4
    per_layer = tokens_per_chip(cfg, sizes) * cfg.model.width * act
    kept = cfg.model.depth * KEPT_PER_TOKEN_LAYER[cfg.model.remat] * per_layer
    working = LAYER_WORKING_SET * per_layer
    return kept + working + 2 * param_bytes  # f32 gradients and the AdamW update, sharded


def suggestions(cfg: Config, r: dict) -> list[str]:
    """Fixes for a plan that does not fit, most effective first, each with its projection."""
    usable = r["usable_fraction"] * r["hbm_bytes"]
    sizes, chips = r["mesh"], r["chips"]
    state = r["param_bytes"] + r["opt_bytes"] + r["other_state_bytes"]
    temp = r["peak_bytes"] - state - r["batch_bytes"]
    fixes = []
    shardable = chips // (sizes["tensor"] * sizes["context"])
    if sizes["fsdp"] < shardable and state > 0.25 * usable:
        # Parameters, EMA and moments shard over fsdp; data-parallel replicas each hold all.
        new_state = state * sizes["fsdp"] / shardable
        fixes.append(f"shard the parameters over more chips: mesh.data=1 mesh.fsdp=-1 "
                     f"(fsdp {sizes['fsdp']} -> {shardable}): state {_gib(state)} -> "
                     f"{_gib(new_state)} per chip")
        temp_after = temp
    else:
        temp_after = temp
    if cfg.model.remat != "full" and temp_after > 0.25 * usable:
        fixes.append(f"recompute activations in the backward pass: model.remat=full (now "
                     f"{cfg.model.remat}; keeps only each layer's input, ~1/3 more FLOPs)")
    clips = cfg.train.batch_size // (sizes["data"] * sizes["fsdp"])
    micro = getattr(cfg.train, "microbatches", None)
    if clips > 1 and temp_after > 0.25 * usable:
        need = min(clips, 2 ** math.ceil(math.log2(max(temp_after / (0.5 * usable), 2))))
        while clips % need:
            need *= 2
        if micro is not None:
            fixes.append(f"accumulate gradients over micro-batches: train.microbatches="
                         f"{need * micro} ({clips // micro} -> {clips // (need * micro)} clips "
                         f"per chip at a time; activations ~{_gib(temp_after / need)})")
        else:
            fixes.append(f"a smaller batch: train.batch_size={cfg.train.batch_size // need} "
                         f"({clips} -> {clips // need} clips per chip)")
    if not fixes or (clips <= 1 and cfg.model.remat == "full"):
        fixes.append("more chips: a larger slice or more slices (the state and activations per "
                     "chip shrink with the fsdp and context axes), or mesh.context=2 to split "
                     "each clip's tokens where the rules support context parallelism")
    return fixes


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"
