"""The Wan 2.1 / 2.2 Diffusion Transformer (diffusers' `WanTransformer3DModel`) in Flax.

latent [B, T, H, W, C] -> spacetime patches (a Conv3d with stride = patch is a linear map of
each patch) -> L blocks -> LayerNorm modulated by the top-level table + temb -> proj_out ->
velocity [B, T, H, W, C]. A block (diffusers' `WanTransformerBlock`):

    shift, scale, gate, c_shift, c_scale, c_gate = scale_shift_table + time_proj(temb)  # f32
    x = x + gate * SelfAttn(LN(x) * (1 + scale) + shift)     # q/k RMS-normed across heads, RoPE
    x = x + CrossAttn(LN_affine(x), text)                     # q/k RMS-normed, no gate
    x = x + c_gate * FFN(LN(x) * (1 + c_scale) + c_shift)    # GELU-tanh

Semantics follow diffusers 0.42 exactly (checked against its outputs on tiny random checkpoints,
tests/test_wan_dit.py): sinusoidal time features cos-first from the timestep in Wan's units
(0..1000), LayerNorms in float32, RoPE with Wan's head-dim split (`rope.wan_split`) from float64
tables. It shares vdit's `Linear`, attention dispatch, RoPE rotation, patching, remat policies
and layer scan with the own DiT (vdit/models/dit.py); the norms and modulation are Wan's own.
Parameter names follow diffusers' modules (vdit/io/wan_transformer.py maps them).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.config import ModelConfig, TextConfig
from vdit.models.dit import stack_blocks, timestep_embedding
from vdit.models.layers import Dtype, Linear, attend
from vdit.models.patch import grid_positions, patchify, token_grid, unpatchify
from vdit.models.rope import apply_rope, rope_angles, rope_tables, wan_split

EPS = 1e-6  # every norm of the published models (config.json "eps")


def layer_norm(x: jax.Array, scale=None, bias=None, eps: float = EPS) -> jax.Array:
    """diffusers' FP32LayerNorm: statistics and affine in float32; returns float32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale + bias
    return y


class HeadsRMSNorm(nn.Module):
    """RMS norm over all heads at once ("rms_norm_across_heads"): x [B, N, H, Dh]."""

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("heads", "kv")), x.shape[-2:])
        xf = x.astype(jnp.float32)
        ms = jnp.square(xf).mean(axis=(-2, -1), keepdims=True)
        return (xf * jax.lax.rsqrt(ms + EPS) * w).astype(x.dtype)


class WanAttention(nn.Module):
    """Self-attention (context None, RoPE) or cross-attention to `context` [B, S, D]:
    separate q/k/v projections with biases, q and k RMS-normed across heads. x [B, N, D]."""

    heads: int
    dtype: Dtype = jnp.float32
    impl: str = "auto"
    blocks: tuple[int, int] | None = None
    context_parallel: str | None = None

    @nn.compact
    def __call__(self, x, context=None, kv_mask=None, rope=None, segment_ids=None):
        d = x.shape[-1]
        hd = d // self.heads
        src = x if context is None else context
        proj = dict(features=(self.heads, hd), names=("embed", "heads", "kv"), dtype=self.dtype)
        q = HeadsRMSNorm(name="norm_q")(Linear(**proj, name="to_q")(x))
        k = HeadsRMSNorm(name="norm_k")(Linear(**proj, name="to_k")(src))
        v = Linear(**proj, name="to_v")(src)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attend(q, k, v, cross=context is not None, kv_mask=kv_mask,
                     segment_ids=segment_ids, impl=self.impl, blocks=self.blocks,
                     context_parallel=self.context_parallel)
        return Linear((d,), ("heads", "kv", "embed"), in_dims=2, dtype=self.dtype,
                      name="to_out")(out)


def _table(module: nn.Module, name: str, rows: int, d: int) -> jax.Array:
    """A learned modulation table [rows, d] (diffusers inits randn / sqrt(d))."""
    init = nn.with_logical_partitioning(
        lambda key, shape: jax.random.normal(key, shape) / d ** 0.5, (None, "norm"))
    return module.param(name, init, (rows, d))


def _split_modulation(table: jax.Array, proj: jax.Array, rows: int) -> list[jax.Array]:
    """table [rows, D] + proj [B, rows, D] or per token [B, N, rows, D] -> rows arrays shaped
    to broadcast against x [B, N, D], float32."""
    mod = table + proj.astype(jnp.float32)
    parts = jnp.split(mod, rows, axis=-2)
    return [p.squeeze(-2)[:, None] if proj.ndim == 3 else p.squeeze(-2) for p in parts]


class WanBlock(nn.Module):
    """One Wan block. x [B, N, D], time_proj [B, 6, D] (or [B, N, 6, D]), text [B, S, D],
    text_mask [B, S], rope (cos, sin) [N, Dh/2] or angles [B, N, Dh/2] -> [B, N, D]."""

    heads: int
    ffn_dim: int
    cross_attn_norm: bool = True
    dtype: Dtype = jnp.float32
    impl: str = "auto"
    blocks: tuple[int, int] | None = None
    context_parallel: str | None = None

    @nn.compact
    def __call__(self, x, time_proj, text, text_mask, rope, segments=None):
        d = x.shape[-1]
        self_ids, cross_ids = segments if segments is not None else (None, None)
        shift, scale, gate, c_shift, c_scale, c_gate = _split_modulation(
            _table(self, "scale_shift_table", 6, d), time_proj, 6)
        attn = dict(heads=self.heads, dtype=self.dtype, impl=self.impl, blocks=self.blocks,
                    context_parallel=self.context_parallel)

        h = (layer_norm(x) * (1 + scale) + shift).astype(x.dtype)
        h = WanAttention(**attn, name="attn1")(h, rope=rope, segment_ids=self_ids)
        x = (x.astype(jnp.float32) + h * gate).astype(x.dtype)

        if self.cross_attn_norm:
            ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
            zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",))
            h = layer_norm(x, self.param("norm2_scale", ones, (d,)),
                           self.param("norm2_bias", zeros, (d,))).astype(x.dtype)
        else:
            h = x
        x = x + WanAttention(**attn, name="attn2")(h, context=text, kv_mask=text_mask,
                                                   segment_ids=cross_ids)

        h = (layer_norm(x) * (1 + c_scale) + c_shift).astype(x.dtype)
        h = Linear((self.ffn_dim,), ("embed", "mlp"), dtype=self.dtype, name="ffn_in")(h)
        h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=True),
                                       ("act_batch", "act_length", "act_mlp"))
        h = Linear((d,), ("mlp", "embed"), dtype=self.dtype, name="ffn_out")(h)
        x = (x.astype(jnp.float32) + h.astype(jnp.float32) * c_gate).astype(x.dtype)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return x, None


class WanDiT(nn.Module):
    """Predicts the flow velocity of a noisy latent, with the call of vdit's DiT.

    Call: latent [B, T, H, W, C] float, t [B] (or per token [B, N]) in [0, 1] (the model sees
    Wan's timestep t * time_scale; time_scale 1 takes Wan's timesteps directly), text float
    embeddings [B, S, text_dim] with text_mask [B, S] (Wan's pipeline pads its UMT5 embeddings
    to 512 tokens with zeros and masks nothing). Returns float32 [B, T, H, W, C].
    Packed rows: as vdit's DiT (patches [B, L, P], positions [B, L, 3], segment ids).
    """

    cfg: ModelConfig
    text_cfg: TextConfig
    latent_shape: tuple[int, int, int, int]
    time_scale: float = 1000.0

    @nn.compact
    def __call__(self, latent, t, text, text_mask=None, positions=None, segment_ids=None,
                 text_segment_ids=None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        d, hd, packed = cfg.width, cfg.width // cfg.heads, positions is not None
        if packed:
            tokens, grid = latent.astype(dtype), None
        else:
            grid = token_grid(latent.shape[1:], cfg.patch)
            tokens = patchify(latent.astype(dtype), cfg.patch)
        x = Linear((d,), ("patch_in", "embed"), dtype=dtype, name="patch_embedding")(tokens)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        # Time: sinusoid (cos first) -> MLP -> temb; time_proj(silu(temb)) -> 6 x D. float32,
        # as diffusers keeps the time embedder in float32.
        timestep = t.astype(jnp.float32) * self.time_scale
        freq = timestep_embedding(timestep.reshape(-1), cfg.freq_dim, scale=1.0)
        freq = freq.reshape(*t.shape, cfg.freq_dim)
        temb = Linear((d,), (None, "embed"), name="time_linear_1")(freq)
        temb = Linear((d,), ("embed", "cond"), name="time_linear_2")(nn.silu(temb))
        time_proj = Linear((6, d), ("embed", None, "cond"), name="time_proj")(nn.silu(temb))

        # Text: GELU-tanh MLP from text_dim to D.
        text = Linear((d,), (None, "embed"), dtype=dtype, name="text_linear_1")(
            jnp.asarray(text).astype(dtype))
        text = Linear((d,), ("embed", "cond"), dtype=dtype, name="text_linear_2")(
            jax.nn.gelu(text, approximate=True))
        mask = None if text_mask is None else jnp.asarray(text_mask).astype(bool)

        split = wan_split(hd)
        if packed:
            rope = rope_angles(positions, hd, cfg.rope_theta, split)
            segments = (segment_ids, (segment_ids, text_segment_ids))
        else:
            rope = tuple(jnp.asarray(r) for r in rope_tables(grid_positions(grid), hd,
                                                             cfg.rope_theta, split))
            segments = None
        x = stack_blocks(WanBlock, cfg, (x, time_proj, text, mask, rope, segments), "blocks_",
                         ffn_dim=cfg.hidden_dim(), cross_attn_norm=cfg.cross_attn_norm)

        temb_rows = temb[:, None] if temb.ndim == 2 else temb[:, :, None]  # [B, (N,) 1, D]
        shift, scale = _split_modulation(_table(self, "scale_shift_table", 2, d), temb_rows, 2)
        x = (layer_norm(x) * (1 + scale) + shift).astype(dtype)
        out = Linear((tokens.shape[-1],), ("embed", "patch_in"), dtype=dtype, name="proj_out")(x)
        if packed:
            return out.astype(jnp.float32)
        return unpatchify(out, grid, cfg.patch).astype(jnp.float32)
