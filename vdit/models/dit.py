"""Diffusion Transformer over spacetime patches (Peebles & Xie 2023, with Sora-style video tokens).

latent [B, T, H, W, C] -> patches -> width-D tokens with 3D RoPE -> L blocks of
(adaLN-Zero self-attention, cross-attention to text, adaLN-Zero MLP) -> velocity [B, T, H, W, C].
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.config import ModelConfig, TextConfig
from vdit.models.layers import Attention, Dtype, Linear, Mlp, norm
from vdit.models.patch import grid_positions, patchify, token_grid, unpatchify
from vdit.models.rope import rope_angles
from vdit.models.text import TextEncoder
from vdit.ops.attention import is_fused_attention

REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    # matmul outputs and fused attention kernels' outputs are kept; element-wise work is redone
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, is_fused_attention),
}


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0,
                       scale: float = 1000.0) -> jax.Array:
    """Sinusoidal features, cos first, of scale * t (t in [0, 1] scaled by 1000 as in DiT; the
    Wan DiT passes its timesteps with scale 1): [B] -> [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


def stack_blocks(block: type[nn.Module], cfg: ModelConfig, args: tuple, unrolled: str,
                 **kwargs) -> jax.Array:
    """cfg.depth blocks over args = (x [B, N, D], *inputs every block sees) -> x [B, N, D].
    Remat by cfg.remat; one nn.scan (params and LoRA adapters stacked on a leading "layers"
    axis) or unrolled blocks named f"{unrolled}{i}". The blocks get the attention settings of
    cfg plus `kwargs`. Call inside a compact method (shared by the DiT and the Wan DiT)."""
    if cfg.remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    tiles = tuple(cfg.attention_blocks) if any(cfg.attention_blocks) else None
    kwargs = dict(heads=cfg.heads, dtype=jnp.dtype(cfg.dtype), impl=cfg.attention, blocks=tiles,
                  context_parallel=cfg.context_parallel, **kwargs)
    if cfg.scan_layers:
        stack = nn.scan(block, variable_axes={"params": 0, "lora": 0},
                        split_rngs={"params": True, "lora_dropout": True},
                        in_axes=(nn.broadcast,) * (len(args) - 1), length=cfg.depth,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(**kwargs, name="blocks")(*args)[0]
    x = args[0]
    for i in range(cfg.depth):
        x, _ = block(**kwargs, name=f"{unrolled}{i}")(x, *args[1:])
    return x


class DiTBlock(nn.Module):
    """One block; the identity at initialisation (zero gates, zero cross-attention output).

    x [B, N, D], cond [B, D] (or per token [B, N, D]), text [B, S, E], text_mask [B, S],
    rope [N, D_head/2] (or [B, N, D_head/2]) -> [B, N, D]. `segments` (packed clips): (ids
    [B, N], (ids [B, N], caption ids [B, S])) keep self- and cross-attention within a clip.
    """

    heads: int
    mlp_hidden: int
    dtype: Dtype = jnp.float32
    impl: str = "auto"
    blocks: tuple[int, int] | None = None
    context_parallel: str | None = None  # "ring" | "ulysses" under a mesh with context > 1

    @nn.compact
    def __call__(self, x, cond, text, text_mask, rope, segments=None):
        d = x.shape[-1]
        self_ids, cross_ids = segments if segments is not None else (None, None)
        mod = Linear((6 * d,), ("embed", "mlp"), dtype=self.dtype, zero=True, name="adaln")(
            nn.silu(cond))
        mod = mod[:, None, :] if mod.ndim == 2 else mod
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        h = modulate(norm(self.dtype)(x), shift1, scale1)
        cp = self.context_parallel
        x = x + gate1 * Attention(self.heads, self.dtype, self.impl, blocks=self.blocks,
                                  context_parallel=cp, name="self_attn")(
            h, rope=rope, segment_ids=self_ids)
        x = x + Attention(self.heads, self.dtype, self.impl, zero_out=True, blocks=self.blocks,
                          context_parallel=cp, name="cross_attn")(
            norm(self.dtype)(x), context=text, kv_mask=text_mask, segment_ids=cross_ids)
        h = modulate(norm(self.dtype)(x), shift2, scale2)
        x = x + gate2 * Mlp(self.mlp_hidden, self.dtype, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return x, None


class DiT(nn.Module):
    """Predicts the flow velocity of a noisy latent.

    Call: latent [B, T, H, W, C] float, t [B] in [0, 1], text: int32 tokens [B, S] (jointly
    trained encoder) or float embeddings [B, S, E] with text_mask [B, S] (precomputed).
    Returns float32 [B, T, H, W, C].

    Packed rows (vdit/data/packing.py): latent = patches [B, L, P], t per token [B, L],
    text = captions [B, K * S] (K captions of max_length S), with `positions` [B, L, 3] for
    RoPE, `segment_ids` [B, L] and `text_segment_ids` [B, K * S] (0 = padding); returns the
    velocity patches float32 [B, L, P]. No token attends to another clip's tokens or caption.
    """

    cfg: ModelConfig
    text_cfg: TextConfig
    vocab_size: int
    latent_shape: tuple[int, int, int, int]

    @nn.compact
    def __call__(self, latent, t, text, text_mask=None, positions=None, segment_ids=None,
                 text_segment_ids=None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        d, packed = cfg.width, positions is not None
        if packed:
            tokens, grid = latent.astype(dtype), None
        else:
            # The grid follows the input, so bucketed batches of other shapes run (retraced).
            grid = token_grid(latent.shape[1:], cfg.patch)
            tokens = patchify(latent.astype(dtype), cfg.patch)
        x = Linear((d,), ("patch_in", "embed"), dtype=dtype, name="patch_embed")(tokens)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        cond = timestep_embedding(t.reshape(-1), 256).reshape(*t.shape, 256)
        for i in range(2):
            cond = Linear((d,), (None, "embed"), dtype=dtype, name=f"t_embed{i}")(cond)
            cond = nn.silu(cond) if i == 0 else cond

        if self.text_cfg.encoder == "transformer":
            encoder = TextEncoder(self.text_cfg, self.vocab_size, dtype, name="text")
            if packed:  # each caption on its own: [B, K * S] -> [B * K, S] -> back
                b, s = text.shape[0], self.text_cfg.max_length
                text, text_mask = encoder(text.reshape(-1, s))
                text, text_mask = text.reshape(b, -1, text.shape[-1]), text_mask.reshape(b, -1)
            else:
                text, text_mask = encoder(text)
        text = text.astype(dtype)

        if packed:
            rope = rope_angles(positions, d // cfg.heads, cfg.rope_theta)
            segments = (segment_ids, (segment_ids, text_segment_ids))
        else:
            rope = jnp.asarray(rope_angles(grid_positions(grid), d // cfg.heads, cfg.rope_theta))
            segments = None
        x = stack_blocks(DiTBlock, cfg, (x, cond, text, text_mask, rope, segments), "block",
                         mlp_hidden=cfg.hidden_dim())

        final = Linear((2 * d,), ("embed", "mlp"), dtype=dtype, zero=True, name="final_adaln")(
            nn.silu(cond))
        shift, scale = jnp.split(final[:, None] if final.ndim == 2 else final, 2, axis=-1)
        x = modulate(norm(dtype)(x), shift, scale)
        out = Linear((tokens.shape[-1],), ("embed", "patch_in"), dtype=dtype, zero=True,
                     name="final")(x)
        if packed:
            return out.astype(jnp.float32)
        return unpatchify(out, grid, cfg.patch).astype(jnp.float32)
