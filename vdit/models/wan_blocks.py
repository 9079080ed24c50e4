"""Layers of the Wan 2.1 / 2.2 video VAE (diffusers' `AutoencoderKLWan`), channels-last.

Tensors are [B, T, H, W, C]. Parameter names mirror diffusers' module names (a list index `.i`
becomes `_i`), so vdit/io/diffusers_wan.py maps a checkpoint by rule; kernels are THWIO (2D ones
HWIO) in float32 with logical axis names (`embed` in, `mlp` out, `norm` for RMS-norm scales).

Streaming. Every module takes `first`: True for the first time chunk of a clip (or the whole
clip, one-shot), False for a later chunk. Stateful layers keep what the next chunk needs in the
mutable `cache` collection: a causal 3x3x3 convolution its last CACHE_T input frames, a temporal
downsampler its last frame, a temporal upsampler its last two frames. diffusers encodes the first
frame alone, then 4 frames at a time, and decodes one latent frame at a time; each rule below is
written so that one call over many frames equals those small chunks (see each docstring), which
makes a one-shot pass and any valid chunking agree.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

Dtype = Any

CACHE_T = 2  # frames a causal 3x3x3 convolution carries between chunks (its kernel_t - 1)


def _param_init(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


def conv_frames(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride_t: int, pad: int,
                dtype: Dtype) -> jax.Array:
    """A convolution that is `valid` in time over x [B, T, H, W, Ci] (already padded in time)
    with kernel [kt, kh, kw, Ci, Co], zero-padded by `pad` on every side in space.

    -> [B, (T - kt) // stride_t + 1, H, W, Co]. One 3D convolution: XLA compiles it about twice
    as fast as vdit's causal VAE's sum of per-tap 2D convolutions (measured on this model),
    which is what a frozen encoder used once per shape mostly pays for."""
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), (stride_t, 1, 1), ((0, 0), (pad, pad), (pad, pad)),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + bias.astype(dtype)


class CausalConv3d(nn.Module):
    """diffusers' `WanCausalConv3d`: x [B, T, H, W, Ci] -> [B, T', H, W, features].

    `causal`: the past is padded with kernel_t - 1 zero frames in the first chunk and with the
    cached last frames of the previous chunk afterwards (what diffusers' feature cache holds),
    so output frame t sees input frames t - 2 .. t. Without it the convolution is valid in time
    (the temporal downsampler and upsampler pad for themselves)."""

    features: int
    kernel: tuple[int, int, int] = (3, 3, 3)
    stride_t: int = 1
    causal: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        kt, kh, kw = self.kernel
        kernel = self.param("kernel", _param_init(nn.initializers.lecun_normal(),
                                                  (None, None, None, "embed", "mlp")),
                            (kt, kh, kw, x.shape[-1], self.features))
        bias = self.param("bias", _param_init(nn.initializers.zeros_init(), ("mlp",)),
                          (self.features,))
        if self.causal and kt > 1:
            x = _with_past(self, "past", x, kt - 1, first)
        return conv_frames(x, kernel, bias, self.stride_t, kh // 2, self.dtype)


def _with_past(module: nn.Module, name: str, x: jax.Array, n: int, first: bool) -> jax.Array:
    """x with n past frames in front (zeros in the first chunk, else the cache `name`); the
    last n frames of the result become the cache for the next chunk."""
    past = jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype) if first else _cached(module, name)
    xp = jnp.concatenate([past.astype(x.dtype), x], axis=1)
    if module.is_mutable_collection("cache"):
        module.put_variable("cache", name, xp[:, xp.shape[1] - n:])
    return xp


def _cached(module: nn.Module, name: str) -> jax.Array:
    value = module.get_variable("cache", name)
    if value is None:
        raise ValueError(f"{module.name}: a later chunk (first=False) needs the cache of the "
                         "previous chunk; pass it back in")
    return value


class Conv2d(nn.Module):
    """A per-frame 2D convolution (torch `Conv2d`): [B, T, H, W, Ci] -> [B, T, H', W', Co].
    `pad` is (top, bottom, left, right) zero padding."""

    features: int
    kernel: int = 3
    stride: int = 1
    pad: tuple[int, int, int, int] = (1, 1, 1, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel
        kernel = self.param("kernel", _param_init(nn.initializers.lecun_normal(),
                                                  (None, None, "embed", "mlp")),
                            (k, k, x.shape[-1], self.features))
        bias = self.param("bias", _param_init(nn.initializers.zeros_init(), ("mlp",)),
                          (self.features,))
        b, t = x.shape[:2]
        top, bottom, left, right = self.pad
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]).astype(self.dtype), kernel.astype(self.dtype),
            (self.stride, self.stride), ((top, bottom), (left, right)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(b, t, *y.shape[1:]) + bias.astype(self.dtype)


class RMSNorm(nn.Module):
    """diffusers' `WanRMS_norm` over channels: x / max(|x|_2, 1e-12) * sqrt(C) * gamma.

    The sqrt(C) makes it an RMS norm (|x|_2 / sqrt(C) is the root mean square). Normalised in
    at least float32 whatever the compute dtype, as diffusers does for half precision."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        gamma = self.param("gamma", _param_init(nn.initializers.ones_init(), ("norm",)), (c,))
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        return (xf / jnp.maximum(norm, 1e-12) * (c**0.5) * gamma).astype(self.dtype)


class ResidualBlock(nn.Module):
    """RMS-norm, SiLU, causal conv, twice, plus a shortcut (a 1x1x1 conv if the width changes).
    Dropout is diffusers' training-only layer and is the identity here."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = CausalConv3d(self.features, (1, 1, 1), dtype=self.dtype,
                                    name="conv_shortcut")(x, first)
        h = nn.silu(RMSNorm(self.dtype, name="norm1")(x))
        h = CausalConv3d(self.features, dtype=self.dtype, name="conv1")(h, first)
        h = nn.silu(RMSNorm(self.dtype, name="norm2")(h))
        h = CausalConv3d(self.features, dtype=self.dtype, name="conv2")(h, first)
        return h + shortcut.astype(h.dtype)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (never across time, so
    it stays causal), with an RMS-norm before and a residual around it."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        y = RMSNorm(self.dtype, name="norm")(x)
        qkv = Conv2d(3 * c, 1, pad=(0, 0, 0, 0), dtype=self.dtype, name="to_qkv")(y)
        q, k, v = jnp.split(qkv.reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
        y = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
        y = Conv2d(c, 1, pad=(0, 0, 0, 0), dtype=self.dtype, name="proj")(y)
        return x + y.astype(x.dtype)


class MidBlock(nn.Module):
    """Residual block, attention, residual block (diffusers' `WanMidBlock`, one layer)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        c = x.shape[-1]
        x = ResidualBlock(c, self.dtype, name="resnets_0")(x, first)
        x = AttentionBlock(self.dtype, name="attentions_0")(x)
        return ResidualBlock(c, self.dtype, name="resnets_1")(x, first)


class Resample(nn.Module):
    """diffusers' `WanResample`: halve or double space, and time for the `3d` modes.

    downsample2d / 3d: zero-pad right and bottom by one, 3x3 conv of stride 2 per frame; 3d then
      halves time with a (3, 1, 1) conv of stride 2 whose windows are (2j - 2, 2j - 1, 2j):
      frame 0 passes through untouched (diffusers encodes it alone and skips the time conv for
      that chunk) and later chunks see the last frame of the previous one.
    upsample2d / 3d: 3d first doubles time with a causal (3, 1, 1) conv to 2C channels, split
      into two frames per input frame; frame 0 of the clip passes through once (diffusers' "Rep"
      marker) and the causal padding of the rest starts with zeros, not with frame 0. Then
      nearest 2x in space and a 3x3 conv per frame to `out_features`.
    """

    mode: str
    out_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        c = x.shape[-1]
        if self.mode.startswith("down"):
            x = Conv2d(c, 3, stride=2, pad=(0, 1, 0, 1), dtype=self.dtype, name="resample_1")(x)
            if self.mode == "downsample3d":
                x = self._down_time(x, first)
            return x
        if self.mode == "upsample3d":
            x = self._up_time(x, first)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact at scale 2
        return Conv2d(self.out_features, 3, dtype=self.dtype, name="resample_1")(x)

    def _time_conv(self, features: int, stride_t: int) -> CausalConv3d:
        return CausalConv3d(features, (3, 1, 1), stride_t=stride_t, causal=False,
                            dtype=self.dtype, name="time_conv")

    def _down_time(self, x: jax.Array, first: bool) -> jax.Array:
        conv = self._time_conv(x.shape[-1], 2)
        xp = x if first else jnp.concatenate([_cached(self, "last").astype(x.dtype), x], 1)
        if self.is_mutable_collection("cache"):
            self.put_variable("cache", "last", x[:, -1:])
        if xp.shape[1] < 3:  # a first chunk of one frame: it passes through alone
            return x
        y = conv(xp)
        return jnp.concatenate([x[:, :1], y.astype(x.dtype)], 1) if first else y

    def _up_time(self, x: jax.Array, first: bool) -> jax.Array:
        c = x.shape[-1]
        conv = self._time_conv(2 * c, 1)
        head, rest = (x[:, :1], x[:, 1:]) if first else (None, x)
        xp = _with_past(self, "past", rest, CACHE_T, first)
        if rest.shape[1] == 0:  # a first chunk of one frame: it passes through alone
            return head
        # Channels [0:C] become frame 2t, [C:2C] frame 2t + 1 (diffusers' reshape to (2, C)).
        y = rearrange(conv(xp), "b t h w (f c) -> b (t f) h w c", f=2)
        return y if head is None else jnp.concatenate([head, y.astype(head.dtype)], 1)


def avg_down(x: jax.Array, out_features: int, ft: int, fs: int) -> jax.Array:
    """diffusers' `AvgDown3D`, the Wan 2.2 shortcut: fold (ft, fs, fs) into channels (zero frames
    in front when T is not a multiple of ft), then average groups of channels down to
    `out_features`. [B, T, H, W, C] -> [B, ceil(T / ft), H / fs, W / fs, out_features]."""
    pad = (ft - x.shape[1] % ft) % ft
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    x = rearrange(x, "b (t a) (h p) (w q) c -> b t h w (c a p q)", a=ft, p=fs, q=fs)
    return x.reshape(*x.shape[:-1], out_features, -1).mean(-1)


def dup_up(x: jax.Array, out_features: int, ft: int, fs: int, first: bool) -> jax.Array:
    """diffusers' `DupUp3D`, the Wan 2.2 shortcut: repeat channels, unfold them into (ft, fs, fs);
    the first chunk drops its first ft - 1 frames (frame 0 is not doubled in time).
    [B, T, H, W, C] -> [B, T ft (- ft + 1), H fs, W fs, out_features]."""
    repeats = out_features * ft * fs * fs // x.shape[-1]
    x = jnp.repeat(x, repeats, axis=-1)
    x = rearrange(x, "b t h w (o a p q) -> b (t a) (h p) (w q) o", a=ft, p=fs, q=fs)
    return x[:, ft - 1:] if first else x


class ResidualDownBlock(nn.Module):
    """Wan 2.2 encoder level: residual blocks and a downsampler, plus the `avg_down` shortcut."""

    features: int
    num_res_blocks: int
    temporal: bool
    down: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        shortcut = avg_down(x, self.features, 2 if self.temporal else 1, 2 if self.down else 1)
        for j in range(self.num_res_blocks):
            x = ResidualBlock(self.features, self.dtype, name=f"resnets_{j}")(x, first)
        if self.down:
            mode = "downsample3d" if self.temporal else "downsample2d"
            x = Resample(mode, self.features, self.dtype, name="downsampler")(x, first)
        return x + shortcut.astype(x.dtype)


class UpBlock(nn.Module):
    """Wan 2.1 decoder level: num_res_blocks + 1 residual blocks, then an upsampler whose conv
    halves the width (`upsamplers_0`)."""

    features: int
    num_res_blocks: int
    mode: str | None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        for j in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.features, self.dtype, name=f"resnets_{j}")(x, first)
        if self.mode is not None:
            x = Resample(self.mode, self.features // 2, self.dtype, name="upsamplers_0")(x, first)
        return x


class ResidualUpBlock(nn.Module):
    """Wan 2.2 decoder level: residual blocks and an upsampler (width kept), plus the `dup_up`
    shortcut of the level's input."""

    features: int
    num_res_blocks: int
    temporal: bool
    up: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        shortcut = dup_up(x, self.features, 2 if self.temporal else 1, 2, first) if self.up \
            else None
        for j in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.features, self.dtype, name=f"resnets_{j}")(x, first)
        if self.up:
            mode = "upsample3d" if self.temporal else "upsample2d"
            x = Resample(mode, self.features, self.dtype, name="upsampler")(x, first)
            x = x + shortcut.astype(x.dtype)
        return x
