"""What `vdit plan` cannot compile, it estimates; what does not fit, it suggests a fix for.

`estimate_temporaries` is the GPU path's stand-in for the compiler's temporaries (no GPU
compiler runs on a CPU host): activations kept for the backward pass, by remat policy, plus the
float32 gradients and the optimizer's update. Per token and layer a transformer block keeps
about 34 width-sized 16-bit values without remat once attention is a flash kernel (Korthikanti
et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", 34·s·b·h bytes
without the 5·a·s²·b score term); the DiT's cross-attention and adaLN modulation add about 10.
`dots` keeps the matmul outputs on the clip's tokens (`kept_widths`: 12 at the own DiT's MLP
ratio 4, more for Wan 1.3B's wide FFN) and, in a LoRA run, each adapter's two
(`lora_kept_widths`); `full` only the layer input (the residual stream, f32).
Calibration against the TPU compiler's memory_analysis() of the same per-chip program:
experiments/plan_1b.yaml at one clip per chip (16k tokens, remat dots) 15.1 GiB of temporaries
here, 15.0 GiB on v5p-64; Wan 2.1 1.3B at 32,760 tokens, one clip per chip, remat dots
(experiments/bench_gpu_wan.yaml, v5p-8 mesh.data=4) 53.6 against 55.8 GiB, and as a rank-32
LoRA (experiments/plan_wan_finetune_1b3.yaml) 79.9 against 79.4 GiB; with remat full this
over-estimates (the LoRA: 10.1 against 5.9 GiB). docs/fine-tuning.md has the figures.
"""

from __future__ import annotations

import math
import re

from vdit.config import Config, ModelConfig

# Width-sized values kept per token and layer, by model.remat (see the module doc; dots:
# `kept_widths`).
KEPT_PER_TOKEN_LAYER = {"none": 44, "full": 2}
LAYER_WORKING_SET = 44  # one layer's activations, live while its backward runs
# Cross-attention projections of the caption (S tokens, not the clip's N): not per video token.
CAPTION_SIDE = re.compile(r"(^|/)(attn2/to_(k|v)|cross_attn/kv)$")


def kept_widths(model: ModelConfig) -> float:
    """Width-sized values a block keeps per token for the backward pass under `model.remat`.
    `dots` keeps its matmul outputs on the clip's tokens, q, k, v and out of self-attention, q
    and out of cross-attention, the MLP's hidden and output (7 + hidden / width), and the
    fused attention output (1): 12 for the own DiT at MLP ratio 4, 13.8 for Wan 2.1 1.3B (FFN
    8960 of width 1536), 10.7 for 14B (13824 of 5120)."""
    if model.remat == "dots":
        return 8 + model.hidden_dim() / model.width
    return KEPT_PER_TOKEN_LAYER[model.remat]


def tokens_per_chip(cfg: Config, sizes: dict) -> float:
    """Tokens one device processes at once: its slice of one micro-batch."""
    micro = getattr(cfg.train, "microbatches", 1)
    clips = cfg.train.batch_size / (sizes["data"] * sizes["fsdp"]) / micro
    return clips * cfg.num_tokens() / sizes["context"]


def lora_kept_widths(targets, rank: int, model: ModelConfig) -> float:
    """Width-sized values a LoRA run keeps per video token and layer beyond the base's: each
    adapted Linear's branch (vdit/models/lora.py `branch`) makes two matmul outputs, x a (rank
    wide) and (x a) b (as wide as the Linear's output), which remat `dots` (and `none`) keep
    for the backward pass; `full` keeps neither. `targets`: models/lora.py Targets."""
    if model.remat == "full":
        return 0.0
    total = 0.0
    for t in targets:
        if not CAPTION_SIDE.search(t.name):
            layers = t.shape[0] if t.stacked else 1
            total += layers * (math.prod(t.axes()[1]) + rank)
    return total / (model.depth * model.width)


def estimate_temporaries(cfg: Config, sizes: dict, param_bytes: int,
                         lora_widths: float = 0.0) -> float:
    """Per-chip bytes beyond the state and the batch: activations + gradients + update.
    `param_bytes`: one copy of the trained params (a LoRA run's adapters), whose f32 gradients
    and update are the non-activation part; `lora_widths`: `lora_kept_widths`."""
    act = 2 if cfg.model.dtype == "bfloat16" else 4
    per_layer = tokens_per_chip(cfg, sizes) * cfg.model.width * act
    kept = cfg.model.depth * (kept_widths(cfg.model) + lora_widths) * per_layer
    working = LAYER_WORKING_SET * per_layer
    return kept + working + 2 * param_bytes  # f32 gradients and the AdamW update, sharded


def suggestions(cfg: Config, r: dict) -> list[str]:
    """Fixes for a plan that does not fit, most effective first, each with its projection."""
    usable = r["usable_fraction"] * r["hbm_bytes"]
    sizes, chips = r["mesh"], r["chips"]
    state = r["state_bytes"]
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
