"""Exact matmul FLOPs of the text-to-video DiT (either `model.kind`), from its config.

XLA's cost analysis counts a scanned layer stack once, not `depth` times, so MFU needs an
analytic count. Only matmuls are counted (2 FLOPs per multiply-add); norms, softmax and
elementwise work are a few percent at most. Training = 3 x forward (backward = 2 x forward).

A train step on pixel batches also runs the frozen autoencoder's encoder (forward only):
`encoder_flops_per_clip` counts it, and throughput reports (`vdit bench`, the train loop) add
it to the step's work. Scaling budgets (C = 6 N D) count the DiT alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vdit.config import Config

TIME_FREQ_DIM = 256  # sinusoidal timestep features, see models/dit.py


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs of one sample, by term."""

    per_token_linear: float  # 2 * N * P_tok: patch embed, QKV/out, cross-attn Q/out, MLP, final
    self_attention: float  # 4 * N^2 * d * L
    cross_attention: float  # 4 * N * S * d * L, plus text K/V projections
    per_sample: float  # adaLN and timestep MLP: once per sample, not per token
    text_encoder: float

    @property
    def forward(self) -> float:
        return (self.per_token_linear + self.self_attention + self.cross_attention
                + self.per_sample + self.text_encoder)


def per_token_params(cfg: Config) -> int:
    """Weights applied to every video token (the P_tok of 2 * N * P_tok). Both kinds: patch
    embedding, per block q/k/v/out of self-attention, q/out of cross-attention and the MLP
    (Wan: its FFN of ffn_dim), then the output projection."""
    d, m, p = cfg.model.width, cfg.model.hidden_dim(), cfg.latent_shape()[3]
    p_in = p * cfg.model.patch[0] * cfg.model.patch[1] * cfg.model.patch[2]
    block = 3 * d * d + d * d + 2 * d * d + 2 * d * m  # qkv, out, cross q/out, mlp
    return p_in * d + cfg.model.depth * block + d * p_in


def _caption_kv_width(cfg: Config) -> int:
    """Input width of each block's cross-attention K/V projections: the text width (own DiT)
    or the model width (Wan maps the caption to it once, in its text MLP)."""
    return cfg.model.width if cfg.model.kind == "wan" else cfg.text.width


def wan_forward_flops(cfg: Config) -> FlopBreakdown:
    """Forward FLOPs of one sample of `model.kind: wan` (diffusers' WanTransformer3DModel,
    vdit/models/wan_dit.py), by term: per token the shared per-token weights
    (`per_token_params`); per block self-attention 4 N^2 d and cross-attention 4 N S d plus the
    caption's K/V projections from d; once per sample the time path (freq_dim -> d -> d ->
    6 d, no per-block adaLN matmul: blocks add a learned table) and, in `text_encoder`, the
    text MLP over the S caption tokens (text.width -> d -> d)."""
    n, d, depth = cfg.num_tokens(), cfg.model.width, cfg.model.depth
    s, e = cfg.text.max_length, cfg.text.width
    return FlopBreakdown(
        per_token_linear=2.0 * n * per_token_params(cfg),
        self_attention=4.0 * n * n * d * depth,
        cross_attention=depth * (4.0 * n * s * d + 2.0 * s * d * 2 * d),
        per_sample=2.0 * (cfg.model.freq_dim * d + d * d + d * 6 * d),
        text_encoder=2.0 * s * (e * d + d * d),
    )


def forward_breakdown(cfg: Config) -> FlopBreakdown:
    if cfg.model.kind == "wan":
        return wan_forward_flops(cfg)
    n, d, depth = cfg.num_tokens(), cfg.model.width, cfg.model.depth
    s, e = cfg.text.max_length, cfg.text.width
    text = 0.0
    if cfg.text.encoder == "transformer":
        # Per text block: qkv + out (4 E^2), MLP (8 E^2) per token; QK and AV (4 S E) per token.
        text = cfg.text.depth * s * (2 * 12 * e * e + 4 * s * e)
    return FlopBreakdown(
        per_token_linear=2.0 * n * per_token_params(cfg),
        self_attention=4.0 * n * n * d * depth,
        cross_attention=depth * (4.0 * n * s * d + 2.0 * s * e * 2 * d),
        per_sample=2.0 * (depth * d * 6 * d + d * 2 * d + TIME_FREQ_DIM * d + d * d),
        text_encoder=text,
    )


def train_flops_per_step(cfg: Config, batch_size: int | None = None) -> float:
    """FLOPs of one training step over the global batch (3 x forward)."""
    batch = cfg.train.batch_size if batch_size is None else batch_size
    return 3.0 * batch * forward_breakdown(cfg).forward


def packed_train_flops(cfg: Config, segment_ids: np.ndarray) -> tuple[float, int]:
    """(FLOPs, real tokens) of one training step on packed rows (vdit/data/packing.py).

    segment_ids int [rows, budget], 0 = padding. Counts the work on real tokens only: the
    per-token matmuls, plus adaLN and the timestep MLP per token (packed rows condition each
    token), self-attention within each clip (4 n_i^2 d L, not budget^2), each token's
    cross-attention to its clip's caption, and the caption K/V and text encoder once per clip.
    Training = 3 x forward.
    """
    ids = np.asarray(segment_ids).reshape(-1, np.shape(segment_ids)[-1])
    rows, cols = np.nonzero(ids > 0)
    _, lengths = np.unique(np.stack([rows, ids[rows, cols]]), axis=1, return_counts=True)
    lengths = lengths.astype(np.float64)  # tokens of each (row, clip)
    tokens, clips = float(lengths.sum()), len(lengths)
    b = forward_breakdown(cfg)
    d, depth = cfg.model.width, cfg.model.depth
    s, e = cfg.text.max_length, _caption_kv_width(cfg)
    forward = (
        2.0 * per_token_params(cfg) * tokens
        + b.per_sample * tokens
        + 4.0 * d * depth * float((lengths**2).sum())
        + depth * (4.0 * s * d * tokens + 2.0 * s * e * 2 * d * clips)
        + b.text_encoder * clips
    )
    return 3.0 * forward, int(tokens)


def encoder_flops_per_clip(cfg: Config) -> float:
    """Forward FLOPs of the autoencoder's encoder on one clip of `data.world`'s shape.

    XLA's count of the lowered (not yet optimised) encoder: convolutions, norms and activations,
    exactly the graph the train step runs on its pixel batches (the encoder has no scanned
    loop, so nothing is counted once for many). Lowering only traces; nothing is compiled.
    0 for space_to_depth (a reshape).
    """
    import jax
    import jax.numpy as jnp

    from vdit.io.autoencoders import build_autoencoder

    if cfg.autoencoder.kind == "space_to_depth":
        return 0.0
    w = cfg.data.world
    video = jax.ShapeDtypeStruct((1, w.frames, w.height, w.width, 3), jnp.float32)
    autoencoder = build_autoencoder(cfg.autoencoder)
    params = jax.eval_shape(autoencoder.init, jax.random.key(0), video)
    cost = jax.jit(autoencoder.encode).lower(params, video).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def text_encoder_flops_per_caption(cfg: Config) -> float:
    """Forward matmul FLOPs of the frozen T5 a `text.encoder: t5` step runs on each caption
    (text.max_length tokens, padding included, as the step runs them): Q, K, V and O
    projections, QK^T and AV, the FFN (two input projections when gated). 0 for the other
    encoders: the jointly trained transformer is part of the DiT's count (forward_breakdown),
    precomputed embeddings cost the step nothing."""
    if cfg.text.encoder != "t5":
        return 0.0
    from vdit.io.hf_t5 import read_spec

    spec = read_spec(cfg.text.checkpoint)
    s, d, inner = cfg.text.max_length, spec.d_model, spec.num_heads * spec.d_kv
    per_token = 2 * (4 * d * inner + 2 * s * inner + (3 if spec.gated else 2) * d * spec.d_ff)
    return float(s * spec.num_layers * per_token)


def step_flops(cfg: Config, encodes_pixels: bool) -> tuple[float, float]:
    """(the DiT's train FLOPs, the frozen encoders' forward FLOPs) of one step over the global
    batch. Frozen: the autoencoder's encoder when the step encodes pixel batches (physics
    videos, not stored latents) and a T5 run in the step (`text.encoder: t5`)."""
    encoder = cfg.train.batch_size * encoder_flops_per_clip(cfg) if encodes_pixels else 0.0
    text = cfg.train.batch_size * text_encoder_flops_per_caption(cfg)
    return train_flops_per_step(cfg), encoder + text


def tokens_per_step(cfg: Config) -> int:
    """Latent tokens processed per step (the D of scaling laws counts these)."""
    return cfg.train.batch_size * cfg.num_tokens()
