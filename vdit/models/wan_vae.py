"""The Wan 2.1 / 2.2 video VAE (diffusers' `AutoencoderKLWan`) in Flax, with vdit's interface.

Wan 2.1: video [B, 1 + 4k, H, W, 3] <-> latent [B, 1 + k, H/8, W/8, 16]. Wan 2.2 (TI2V-5B):
pixels are first folded 2x2 into 12 channels (`patch_size` 2) and the levels carry averaging /
duplicating shortcuts (`is_residual`): [B, 1 + 4k, H, W, 3] <-> [B, 1 + k, H/16, W/16, 48].
Which one is built is decided by the checkpoint's own config.json (`WanVAESpec`).

The semantics are diffusers 0.42.1's: zero-padded causal 3D convolutions, the first frame encoded
alone and the rest in chunks of 4, decoding one latent frame at a time with a feature cache,
RMS-norm with its sqrt(C) scale, per-frame attention in the middle blocks, `quant_conv` after the
encoder, the posterior log-variance clamped to [-30, 20], `post_quant_conv` before the decoder and
the decoded video clamped to [-1, 1]. vdit/models/wan_blocks.py writes each layer so that one
pass over a whole clip equals diffusers' chunked pass; `WanVAE.encode_chunk` / `decode_chunk`
stream a clip through the same layers with the cache passed explicitly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from vdit.models.autoencoder import pad_to_valid
from vdit.models.wan_blocks import (
    CausalConv3d,
    MidBlock,
    Resample,
    ResidualBlock,
    ResidualDownBlock,
    ResidualUpBlock,
    RMSNorm,
    UpBlock,
)

Params = Any
Cache = Any  # the `cache` collection of a streamed pass: a nested dict of arrays
Dtype = Any

# diffusers' defaults for keys a config.json may omit (AutoencoderKLWan.__init__ in 0.42.1).
_WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
_DEFAULTS: dict[str, Any] = {
    "base_dim": 96, "decoder_base_dim": None, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True],
    "dropout": 0.0, "latents_mean": list(_WAN21_MEAN), "latents_std": list(_WAN21_STD),
    "is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
    "scale_factor_temporal": 4, "scale_factor_spatial": 8,
}


def _int(config: dict, key: str, low: int = 1) -> int:
    v = config[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"config.json: {key} must be an integer >= {low}, got {v!r}")
    return v


def _list(config: dict, key: str, kind: str, length: int | None = None) -> tuple:
    """config[key] as a tuple of `kind` ("bool", "int" or "number") values."""
    v = config[key]
    types = {"bool": bool, "int": int, "number": (int, float)}[kind]
    ok = isinstance(v, list | tuple) and all(
        isinstance(e, types) and (kind == "bool") == isinstance(e, bool) for e in v)
    if not ok or (length is not None and len(v) != length):
        want = f"a list of {length} " if length is not None else "a list of "
        raise ValueError(f"config.json: {key} must be {want}{kind} values, got {v!r}")
    return tuple(v)


@dataclasses.dataclass(frozen=True)
class WanVAESpec:
    """The architecture of an `AutoencoderKLWan`, as its config.json states it."""

    base_dim: int = 96
    decoder_base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
    latents_mean: tuple[float, ...] = _WAN21_MEAN
    latents_std: tuple[float, ...] = _WAN21_STD
    is_residual: bool = False
    patch_size: int = 1
    dropout: float = 0.0  # training only; the identity here

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> WanVAESpec:
        """Validate a diffusers config.json (as a dict); a value this port does not implement
        raises ValueError naming its key. Keys starting with `_` are metadata."""
        name = config.get("_class_name", "AutoencoderKLWan")
        if name != "AutoencoderKLWan":
            raise ValueError(f"config.json: _class_name is {name!r}, expected AutoencoderKLWan")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS)
        if unknown:
            raise ValueError(f"config.json: unsupported key(s) {', '.join(unknown)} (this port "
                             "implements diffusers 0.42.1's AutoencoderKLWan)")
        c = {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None or k in (
            "decoder_base_dim", "patch_size")}}
        dim_mult = _list(c, "dim_mult", "int")
        if not dim_mult or any(m < 1 for m in dim_mult):
            raise ValueError(f"config.json: dim_mult must be positive integers, got {dim_mult}")
        base = _int(c, "base_dim")
        dec = base if c["decoder_base_dim"] is None else _int(c, "decoder_base_dim")
        z = _int(c, "z_dim")
        patch = 1 if c["patch_size"] is None else _int(c, "patch_size")
        is_residual = c["is_residual"]
        if not isinstance(is_residual, bool):
            raise ValueError(f"config.json: is_residual must be true or false, got {is_residual!r}")
        if not isinstance(c["dropout"], int | float) or isinstance(c["dropout"], bool):
            raise ValueError(f"config.json: dropout must be a number, got {c['dropout']!r}")
        spec = cls(
            base_dim=base, decoder_base_dim=dec, z_dim=z, dim_mult=dim_mult,
            num_res_blocks=_int(c, "num_res_blocks"),
            temperal_downsample=_list(c, "temperal_downsample", "bool", len(dim_mult) - 1),
            latents_mean=tuple(float(m) for m in _list(c, "latents_mean", "number", z)),
            latents_std=tuple(float(s) for s in _list(c, "latents_std", "number", z)),
            is_residual=is_residual, patch_size=patch, dropout=float(c["dropout"]),
        )
        if _list(c, "attn_scales", "number"):
            # diffusers 0.42.1 builds encoder attention blocks for them but cannot run them
            # (its encoder passes the feature cache to WanAttentionBlock), and the Wan
            # checkpoints have none: nothing to be faithful to.
            raise ValueError(f"config.json: attn_scales must be [], got {c['attn_scales']!r}")
        for key in ("in_channels", "out_channels"):
            if _int(c, key) != 3 * patch * patch:
                raise ValueError(f"config.json: {key} is {c[key]}; RGB video folded {patch}x"
                                 f"{patch} has {3 * patch * patch} channels")
        for key, want in (("scale_factor_temporal", spec.factors[0]),
                          ("scale_factor_spatial", spec.factors[1])):
            if key in config and config[key] is not None and config[key] != want:
                raise ValueError(f"config.json: {key} is {config[key]}, but the architecture "
                                 f"scales by {want}")
        if is_residual:
            spec._check_residual()
        return spec

    def _check_residual(self) -> None:
        """The Wan 2.2 shortcuts regroup channels: widths must divide as diffusers asserts."""
        n = len(self.dim_mult)
        enc = [self.base_dim * m for m in (1, *self.dim_mult)]
        for i in range(n):
            last = i == n - 1
            factor = (1 if last else (2 if self.temperal_downsample[i] else 1) * 4)
            if enc[i] * factor % enc[i + 1]:
                raise ValueError(f"config.json: dim_mult {list(self.dim_mult)} with base_dim "
                                 f"{self.base_dim}: level {i}'s shortcut cannot average "
                                 f"{enc[i]}x{factor} channels into {enc[i + 1]}")
        dec = self.decoder_dims
        up = self.temperal_upsample
        for i in range(n - 1):
            factor = (2 if up[i] else 1) * 4
            if dec[i + 1] * factor % dec[i]:
                raise ValueError(f"config.json: dim_mult {list(self.dim_mult)} with "
                                 f"decoder_base_dim {self.decoder_base_dim}: level {i}'s "
                                 f"shortcut cannot spread {dec[i]} channels over "
                                 f"{dec[i + 1]}x{factor}")

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]

    @property
    def decoder_dims(self) -> list[int]:
        return [self.decoder_base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]

    @property
    def factors(self) -> tuple[int, int, int]:
        """(time, height, width) downsampling of video to latent: (4, 8, 8) for Wan 2.1,
        (4, 16, 16) for Wan 2.2."""
        s = 2 ** (len(self.dim_mult) - 1) * self.patch_size
        return 2 ** sum(self.temperal_downsample), s, s

    @property
    def channels(self) -> int:
        """Channels the encoder sees / the decoder emits: RGB times patch_size^2."""
        return 3 * self.patch_size**2


def patchify(video: jax.Array, p: int) -> jax.Array:
    """[B, T, H, W, C] -> [B, T, H/p, W/p, C p p]: channel c * p * p + pw * p + ph, diffusers'
    order (the column offset before the row offset)."""
    if p == 1:
        return video
    return rearrange(video, "b t (h ph) (w pw) c -> b t h w (c pw ph)", ph=p, pw=p)


def unpatchify(x: jax.Array, p: int) -> jax.Array:
    """The inverse of `patchify`."""
    if p == 1:
        return x
    return rearrange(x, "b t h w (c pw ph) -> b t (h ph) (w pw) c", ph=p, pw=p)


class Encoder3d(nn.Module):
    """[B, T, H, W, spec.channels] -> [B, T', H', W', 2 z_dim] (mean and log-variance)."""

    spec: WanVAESpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        s, dt = self.spec, self.dtype
        dims = [s.base_dim * m for m in (1, *s.dim_mult)]
        x = CausalConv3d(dims[0], dtype=dt, name="conv_in")(x, first)
        idx = 0
        for i, out in enumerate(dims[1:]):
            last = i == len(s.dim_mult) - 1
            temporal = not last and s.temperal_downsample[i]
            if s.is_residual:
                x = ResidualDownBlock(out, s.num_res_blocks, temporal, not last, dt,
                                      name=f"down_blocks_{i}")(x, first)
                continue
            # Wan 2.1: one flat list of residual blocks and downsamplers (attention blocks
            # would sit there too for a non-empty attn_scales, which the spec refuses).
            for _ in range(s.num_res_blocks):
                x = ResidualBlock(out, dt, name=f"down_blocks_{idx}")(x, first)
                idx += 1
            if not last:
                mode = "downsample3d" if temporal else "downsample2d"
                x = Resample(mode, out, dt, name=f"down_blocks_{idx}")(x, first)
                idx += 1
        x = MidBlock(dt, name="mid_block")(x, first)
        x = nn.silu(RMSNorm(dt, name="norm_out")(x))
        return CausalConv3d(2 * s.z_dim, dtype=dt, name="conv_out")(x, first)


class Decoder3d(nn.Module):
    """[B, T', H', W', z_dim] -> [B, 1 + ft (T' - 1), H, W, spec.channels] (first chunk)."""

    spec: WanVAESpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        s, dt = self.spec, self.dtype
        dims = s.decoder_dims
        x = CausalConv3d(dims[0], dtype=dt, name="conv_in")(x, first)
        x = MidBlock(dt, name="mid_block")(x, first)
        for i, out in enumerate(dims[1:]):
            up = i != len(s.dim_mult) - 1
            temporal = up and s.temperal_upsample[i]
            if s.is_residual:
                block = ResidualUpBlock(out, s.num_res_blocks, temporal, up, dt,
                                        name=f"up_blocks_{i}")
            else:
                mode = ("upsample3d" if temporal else "upsample2d") if up else None
                block = UpBlock(out, s.num_res_blocks, mode, dt, name=f"up_blocks_{i}")
            x = block(x, first)
        x = nn.silu(RMSNorm(dt, name="norm_out")(x))
        return CausalConv3d(s.channels, dtype=dt, name="conv_out")(x, first)


class WanVAEModule(nn.Module):
    """The Flax module; `WanVAE` wraps it with vdit's autoencoder interface."""

    spec: WanVAESpec
    dtype: Dtype = jnp.float32

    def setup(self):
        z = self.spec.z_dim
        self.encoder = Encoder3d(self.spec, self.dtype)
        self.quant_conv = CausalConv3d(2 * z, (1, 1, 1), dtype=self.dtype)
        self.post_quant_conv = CausalConv3d(z, (1, 1, 1), dtype=self.dtype)
        self.decoder = Decoder3d(self.spec, self.dtype)

    def encode(self, video: jax.Array, first: bool = True) -> tuple[jax.Array, jax.Array]:
        """video [B, T, H, W, 3] -> posterior (mean, logvar), float32 [B, T', H', W', z_dim]."""
        h = self.encoder(patchify(video, self.spec.patch_size), first)
        h = self.quant_conv(h, first).astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latent: jax.Array, first: bool = True) -> jax.Array:
        """latent [B, T', H', W', z_dim] -> video [B, T, H, W, 3] in [-1, 1], float32."""
        x = self.decoder(self.post_quant_conv(latent, first), first)
        return jnp.clip(unpatchify(x.astype(jnp.float32), self.spec.patch_size), -1.0, 1.0)

    def __call__(self, video: jax.Array) -> jax.Array:
        return self.decode(self.encode(video)[0])


def _plain(boxed: Any) -> Any:
    """Unbox logical-axis metadata without a sharding constraint: the frozen params are
    replicated, and this may run inside a mesh (the trainer's) or on abstract values."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False)
                        if isinstance(x, nn.Partitioned) else x, boxed,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


class WanVAE:
    """vdit's autoencoder interface over the Wan VAE. Videos are float [B, T, H, W, 3] in
    [-1, 1]; latents [B, T', H', W', z_dim], unnormalised (the checkpoint's per-channel
    `latents_mean` / `latents_std` are returned by the loader as stats).

    Params are float32 (plain arrays, as `vdit.io.diffusers_wan.load_wan_vae` returns them);
    `dtype` is the compute dtype. Nothing here is jitted: callers jit what they call.

    Streaming: `encode_chunk(params, video, cache)` with cache None for the first chunk of
    1 + 4a frames, then the returned cache with chunks of 4b frames; `decode_chunk` likewise
    with 1 + a latent frames, then any number. The concatenated outputs equal one-shot
    `moments` / `decode` up to float rounding.
    """

    def __init__(self, spec: WanVAESpec, dtype: Dtype = jnp.float32):
        self.spec = spec
        self.dtype = dtype
        self.module = WanVAEModule(spec, dtype)

    @property
    def factors(self) -> tuple[int, int, int]:
        return self.spec.factors

    @property
    def latent_channels(self) -> int:
        return self.spec.z_dim

    def _init_video(self) -> jax.Array:
        # 1 + ft frames: every temporal down/upsampler sees enough frames to create its params.
        ft, fh, fw = self.factors
        return jnp.zeros((1, 1 + ft, fh, fw, 3), jnp.float32)

    def init(self, key: jax.Array, video: jax.Array | None = None) -> Params:
        """Random float32 params (plain arrays). `video` is ignored: the parameter shapes depend
        on the spec alone."""
        # Jitted: run op by op, the init of even a tiny model takes tens of seconds on CPU.
        return _plain(jax.jit(self.module.init)(key, self._init_video())["params"])

    def logical_specs(self) -> Any:
        """The params' logical axis names, a tree of PartitionSpecs (vdit/parallel/rules.py)."""
        boxed = jax.eval_shape(self.module.init, jax.random.key(0), self._init_video())
        return nn.get_partition_spec(boxed)["params"]

    def param_shapes(self) -> Any:
        """The params' tree of ShapeDtypeStructs, without allocating them."""
        boxed = jax.eval_shape(self.module.init, jax.random.key(0), self._init_video())
        return _plain(boxed["params"])

    def moments(self, params: Params, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior (mean, logvar), each float32 [B, 1 + k, H/fh, W/fw, z_dim], of video
        [B, T, H, W, 3]; a video that is not 1 + 4k frames of multiples of (fh, fw) is padded
        by vdit's rule (vdit/models/autoencoder.py: last frame repeated, edges replicated)."""
        video = pad_to_valid(video, self.factors)
        return self.module.apply({"params": params}, video, method=WanVAEModule.encode)

    def encode(self, params: Params, video: jax.Array) -> jax.Array:
        return self.moments(params, video)[0]

    def decode(self, params: Params, latent: jax.Array,
               size: tuple[int, int, int] | None = None) -> jax.Array:
        """Video [B, 1 + 4(T' - 1), H' fh, W' fw, 3] in [-1, 1] of latent [B, T', H', W', z];
        `size` (T, H, W) crops it back to a padded input's size."""
        video = self.module.apply({"params": params}, latent, method=WanVAEModule.decode)
        if size is not None:
            video = video[:, : size[0], : size[1], : size[2]]
        return video

    def _check_chunk(self, what: str, frames: int, step: int, first: bool) -> None:
        ok = frames > 0 and (frames - 1 if first else frames) % step == 0
        if not ok:
            want = f"1 + {step}a" if first else f"{step}b (b >= 1)"
            raise ValueError(f"{what}: a {'first' if first else 'later'} chunk holds {want} "
                             f"frames, got {frames}")

    def encode_chunk(self, params: Params, video: jax.Array, cache: Cache | None = None,
                     ) -> tuple[tuple[jax.Array, jax.Array], Cache]:
        """One time chunk of a streamed encode: video [B, t, H, W, 3] (t = 1 + 4a for the first
        chunk, cache None; t = 4b later, with the cache the previous call returned) ->
        ((mean, logvar) of its 1 + a (or b) latent frames, the cache for the next chunk).
        H and W must be multiples of the spatial factor (no padding here)."""
        first = cache is None
        self._check_chunk("encode_chunk", video.shape[1], self.factors[0], first)
        variables = {"params": params, **({} if first else {"cache": cache})}
        out, state = self.module.apply(variables, video, first, method=WanVAEModule.encode,
                                       mutable=["cache"])
        return out, state["cache"]

    def decode_chunk(self, params: Params, latent: jax.Array, cache: Cache | None = None,
                     ) -> tuple[jax.Array, Cache]:
        """One time chunk of a streamed decode: latent [B, t', H', W', z] (cache None for the
        first chunk, whose first latent frame yields one video frame; later ones 4 each) ->
        (video frames in [-1, 1], the cache for the next chunk)."""
        first = cache is None
        self._check_chunk("decode_chunk", latent.shape[1], 1, first)
        variables = {"params": params, **({} if first else {"cache": cache})}
        out, state = self.module.apply(variables, latent, first, method=WanVAEModule.decode,
                                       mutable=["cache"])
        return out, state["cache"]
