"""The text-to-video system: autoencoder + tokenizer + DiT + rectified flow, as pure functions.

Pixels are uint8 [B, T, H, W, 3]; the DiT works on latents normalised per channel with the
training data's statistics. `stats = {"mean": [C], "std": [C], "autoencoder": params}` travels
with the DiT's params: the frozen autoencoder's params are part of every DiT checkpoint, so a
checkpoint alone samples videos.

Captions reach the DiT as word tokens (`text.encoder: transformer`, encoded inside the DiT) or
as embeddings `(text [B, S, E], text_mask [B, S])` ("a caption" below is either): stored in the
shards (`precomputed`: batch["text"], batch["text_mask"]) or computed in the step by a frozen T5
from the stored token ids (`t5`: stats["text_encoder"]). Both embedding routes round to
`text.dtype` and use stats["null_text"] / ["null_mask"] (the empty caption) for dropout.

Wan 2.2 experts (`train.expert`, diffusion/experts.py): a one-expert run draws its t's in its
range; `both` holds params {"high": ..., "low": ...}, trains each on its half of the batch and
samples with the expert of each step's t.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import Config
from vdit.data.physics import physics_tokenizer
from vdit.diffusion import experts
from vdit.diffusion.flow import noisy, resolve_shift, sample_time, velocity_loss
from vdit.diffusion.sampler import sample_ode
from vdit.io.autoencoders import build_autoencoder
from vdit.models import lora
from vdit.models.dit import DiT
from vdit.models.patch import token_grid
from vdit.models.text import null_tokens_like
from vdit.models.wan_dit import WanDiT

Stats = dict[str, Any]


def to_float(video: jax.Array) -> jax.Array:
    """uint8 [..., 3] -> float32 in [-1, 1]."""
    return video.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(video: jax.Array) -> jax.Array:
    """float in [-1, 1] -> uint8, clipped."""
    return jnp.clip(jnp.round((video + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class TextToVideo:
    """Holds the static parts (modules, shapes); every method is a pure function of its inputs."""

    kind = "dit"
    primary_metric = ("loss", "", "lower")  # what progress lines and summaries report

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.autoencoder = build_autoencoder(cfg.autoencoder)
        self.tokenizer = physics_tokenizer(cfg.text.max_length)
        self.latent_shape = cfg.latent_shape()
        if cfg.model.kind == "wan":
            self.dit = WanDiT(cfg.model, cfg.text, self.latent_shape)
        else:
            self.dit = DiT(cfg.model, cfg.text, self.tokenizer.vocab_size, self.latent_shape)
        self.shift = resolve_shift(cfg.diffusion, cfg.num_tokens())
        self.embedded = cfg.text.encoder != "transformer"  # the DiT sees embeddings
        self._t5 = None
        self.expert = cfg.train.expert  # none | high | low | both
        self.boundary = None if self.expert == "none" else experts.boundary_of(cfg)
        self.eval_timesteps = experts.eval_times(cfg)

    # --- captions --------------------------------------------------------------------------
    def t5(self):
        """(T5Encoder module, pad id) of text.encoder 't5' (read from its config.json once)."""
        if self._t5 is None:
            from vdit.data.captions import encoder_folder
            from vdit.io.hf_folder import read_config
            from vdit.io.hf_t5 import read_spec
            from vdit.models.t5 import T5Encoder

            folder = encoder_folder(self.cfg.text.checkpoint, self.cfg.text.checkpoint_sha256)
            pad = read_config(folder).get("pad_token_id", 0)
            self._t5 = (T5Encoder(read_spec(folder)), pad if isinstance(pad, int) else 0)
        return self._t5

    def batch_text(self, batch: dict, stats: Stats):
        """A batch's captions as the DiT takes them: tokens [B, S] (transformer), or
        (embeddings float32 [B, S, E] rounded through text.dtype, mask bool [B, S])."""
        if not self.embedded:
            return batch["tokens"]
        if "text" in batch:
            return (batch["text"].astype(jnp.float32), batch["text_mask"] > 0)
        module, pad = self.t5()  # frozen: no gradient reaches the encoder
        ids, s = batch["tokens"], self.cfg.text.max_length
        mask = ids != pad
        # One caption per encoder row: packed rows hold K captions, [B, K * S] -> [B * K, S].
        flat = module.apply({"params": jax.lax.stop_gradient(stats["text_encoder"])},
                            ids.reshape(-1, s), mask.reshape(-1, s))
        emb = flat.reshape(*ids.shape, -1).astype(jnp.dtype(self.cfg.text.dtype))
        # Zero past the real tokens, as stored embeddings are (and as Wan's pipeline pads).
        return jnp.where(mask[..., None], emb.astype(jnp.float32), 0.0), mask

    def null_text(self, like, stats: Stats):
        """The empty caption in the shape of `like` (tokens [B, S] or (emb, mask))."""
        if not self.embedded:
            return null_tokens_like(like)
        emb, mask = like
        return (jnp.broadcast_to(stats["null_text"], emb.shape),
                jnp.broadcast_to(stats["null_mask"] > 0, mask.shape))

    def apply_dit(self, params, x, t, text, **kw) -> jax.Array:
        """The DiT on a caption of either kind (see `batch_text`). The Wan DiT gets no mask:
        it attends to the caption's zero padding up to text.max_length, as diffusers'
        WanPipeline feeds its transformer (which takes no mask), so a run exported to
        diffusers (`vdit export --to diffusers`) computes there what it computed here."""
        if not isinstance(text, tuple):
            args = (text,)
        elif self.cfg.model.kind == "wan":
            args = (text[0],)
        else:
            args = (text[0], jnp.asarray(text[1]).astype(bool))
        if isinstance(params, lora.Adapted):  # a LoRA run (diffusion/lora_system.py)
            return params.apply(self.dit, x, t, *args, **kw)
        return self.dit.apply({"params": params}, x, t, *args, **kw)

    def apply_expert(self, params, t: jax.Array, x, t_model, text) -> jax.Array:
        """`apply_dit(params, x, t_model, text)`; for `train.expert: both` with the expert of
        the step's time t [B] (one value; t_model may be per token)."""
        if self.expert != "both":
            return self.apply_dit(params, x, t_model, text)
        return experts.route(params, t, self.boundary, self.apply_dit, x, t_model, text)

    # --- shapes and parameters -----------------------------------------------------------
    def dummy_inputs(self, batch: int = 1):
        latent = jnp.zeros((batch, *self.latent_shape), jnp.float32)
        s = self.cfg.text.max_length
        if self.embedded:
            text = (jnp.zeros((batch, s, self.cfg.text.width), jnp.float32),
                    jnp.ones((batch, s), bool))
            return latent, jnp.zeros((batch,), jnp.float32), *text
        tokens = null_tokens_like(jnp.zeros((batch, s), jnp.int32))
        return latent, jnp.zeros((batch,), jnp.float32), tokens

    def init(self, key: jax.Array):
        """Boxed (logically partitioned) variables of the DiT ({"params": {"high", "low"}} for
        train.expert both)."""
        def init(k):
            return self.dit.init(k, *self.dummy_inputs())

        return experts.init_both(init, key) if self.expert == "both" else init(key)

    def sharded_stats(self) -> dict[str, Any]:
        """Stats sharded like params: none here (a LoRA run's frozen base, lora_system.py)."""
        return {}

    # --- latents ---------------------------------------------------------------------------
    def initial_stats(self, videos: np.ndarray) -> Stats:
        """Latent statistics and autoencoder params: from the trained autoencoder named by
        `autoencoder.checkpoint`, or measured for the parameter-free stand-in on uint8 videos
        [B, T, H, W, 3] or on already encoded latents [B, T', H', W', C] (shards)."""
        text = {}
        if self.embedded:
            from vdit.data.captions import text_stats

            text = text_stats(self.cfg)
        if self.cfg.autoencoder.kind == "causal_vae":
            from vdit.io.run_dir import load_autoencoder

            ae_cfg, params, stats = load_autoencoder(self.cfg.autoencoder.checkpoint)
            check_autoencoder_matches(self.cfg.autoencoder, ae_cfg.autoencoder)
            return {"mean": jnp.asarray(stats["mean"]), "std": jnp.asarray(stats["std"]),
                    "autoencoder": jax.tree.map(jnp.asarray, params), **text}
        if self.cfg.autoencoder.kind == "wan":  # frozen: stats from the checkpoint's config
            from vdit.io.autoencoders import load_wan

            _, params, stats = load_wan(self.cfg.autoencoder)
            return {"mean": jnp.asarray(stats["mean"]), "std": jnp.asarray(stats["std"]),
                    "autoencoder": jax.tree.map(jnp.asarray, params), **text}
        lat = (self.autoencoder.encode({}, to_float(jnp.asarray(videos)))
               if videos.dtype == np.uint8 else jnp.asarray(videos, jnp.float32))
        axes = tuple(range(lat.ndim - 1))
        return {"mean": lat.mean(axes), "std": jnp.maximum(lat.std(axes), 1e-3),
                "autoencoder": {}, **text}

    def stats_shapes(self) -> Stats:
        """What `initial_stats` returns, as jax.ShapeDtypeStruct leaves, without data or files:
        the structure a checkpoint's stats restore into (they hold the autoencoder's params,
        so sampling a run needs neither its autoencoder export nor its data)."""
        channels = jax.ShapeDtypeStruct((self.latent_shape[-1],), jnp.float32)
        autoencoder = {}
        if self.cfg.autoencoder.kind == "causal_vae":
            w = self.cfg.data.world
            video = jax.ShapeDtypeStruct((1, w.frames, w.height, w.width, 3), jnp.float32)
            autoencoder = jax.eval_shape(self.autoencoder.init, jax.random.key(0), video)
        if self.cfg.autoencoder.kind == "wan":
            autoencoder = self.autoencoder.param_shapes()
        text = {}
        if self.embedded:
            from vdit.data.captions import text_stats_shapes

            text = text_stats_shapes(self.cfg)
        return {"mean": channels, "std": channels, "autoencoder": autoencoder, **text}

    def encode(self, video: jax.Array, stats: Stats) -> jax.Array:
        """uint8 [B, T, H, W, 3] -> normalised latent [B, T', H', W', C]."""
        latent = self.autoencoder.encode(stats.get("autoencoder", {}), to_float(video))
        return (latent - stats["mean"]) / stats["std"]

    def batch_latent(self, batch: dict, stats: Stats) -> jax.Array:
        """The normalised latent of a batch: encoded from "video" (uint8, physics), or the
        stored "latent" [B, T', H', W', C] of shards (raw autoencoder output, any float)."""
        if "latent" in batch:
            return (batch["latent"].astype(jnp.float32) - stats["mean"]) / stats["std"]
        return self.encode(batch["video"], stats)

    def decode(self, latent: jax.Array, stats: Stats) -> jax.Array:
        """Normalised latent -> uint8 video [B, T, H, W, 3]."""
        latent = latent * stats["std"] + stats["mean"]
        return to_uint8(self.autoencoder.decode(stats.get("autoencoder", {}), latent))

    # --- training objective ----------------------------------------------------------------
    def drop_captions(self, text, key: jax.Array, stats: Stats | None = None):
        """Replace each caption (tokens [B, S] or (emb, mask)) by the empty one with
        probability caption_dropout."""
        first = text[0] if isinstance(text, tuple) else text
        drop = jax.random.bernoulli(key, self.cfg.diffusion.caption_dropout, (first.shape[0],))
        null = self.null_text(text, stats)
        return jax.tree.map(lambda n, x: jnp.where(drop.reshape(-1, *[1] * (x.ndim - 1)), n, x),
                            null, text)

    def loss(self, params, batch: dict, stats: Stats, key: jax.Array,
             step: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """(loss, {}) on batch {"video": uint8 [B, T, H, W, 3] or "latent": [B, T', H', W', C],
        "tokens": int32 [B, S]}, or on a packed batch (see `packed_loss`). An expert run draws
        t in its expert's range; `both` trains each expert on half the batch (experts.py)."""
        if self.expert == "both":
            return experts.both_loss(lambda p, b, k, r: self._loss(p, b, stats, k, r), params,
                                     batch, key, self.boundary)
        return self._loss(params, batch, stats, key, experts.t_range(self.expert, self.boundary))

    def _loss(self, params, batch: dict, stats: Stats, key: jax.Array,
              t_range: tuple[float, float] | None) -> tuple[jax.Array, dict]:
        if "patches" in batch:
            return self.packed_loss(params, batch, stats, key, t_range)
        k_drop, k_t, k_noise = jax.random.split(key, 3)
        x0 = self.batch_latent(batch, stats)
        tokens = self.drop_captions(self.batch_text(batch, stats), k_drop, stats)
        t = sample_time(k_t, x0.shape[0], self.cfg.diffusion, self.shift, t_range)
        noise = jax.random.normal(k_noise, x0.shape)
        return self.flow_loss(params, x0, noise, t, tokens).mean(), {}

    def token_times(self, t: jax.Array, k: int, latent_shape: tuple[int, ...]) -> jax.Array:
        """Per-token times [B, N] (tokens in (t, h, w) raster order): 0 on the tokens of the
        first k latent frames (clean context), t [B] elsewhere."""
        grid = token_grid(latent_shape, self.cfg.model.patch)
        n, context = grid[0] * grid[1] * grid[2], k // self.cfg.model.patch[0] * grid[1] * grid[2]
        return jnp.where(jnp.arange(n)[None] < context, 0.0, t[:, None])

    def flow_loss(self, params, x0: jax.Array, noise: jax.Array, t: jax.Array,
                  tokens) -> jax.Array:
        """Per-sample velocity loss [B] for latents x0, noise [B, T', H', W', C] at times t [B].

        With diffusion.context_frames = k the first k latent frames are fed clean, their tokens
        get t = 0 (the DiT's adaLN sees per-token times, as for packed rows), and the loss is
        taken over the other frames only: the context is given, not predicted.
        """
        k = self.cfg.diffusion.context_frames
        x_t = noisy(x0, noise, t)
        if not k:
            return velocity_loss(self.apply_dit(params, x_t, t, tokens), x0, noise)
        x_t = x_t.at[:, :k].set(x0[:, :k])
        v = self.apply_dit(params, x_t, self.token_times(t, k, x0.shape[1:]), tokens)
        return velocity_loss(v[:, k:], x0[:, k:], noise[:, k:])

    def packed_loss(self, params, batch: dict, stats: Stats, key: jax.Array,
                    t_range: tuple[float, float] | None = None) -> tuple[jax.Array, dict]:
        """(loss, {}) on packed rows (vdit/data/packing.py): "patches" [B, L, P] of stored
        latents, "positions" [B, L, 3], "segment_ids" [B, L], "tokens" and "text_segment_ids"
        [B, K * S]. Each clip draws its own time, noise and caption dropout; the loss is the
        mean over real (non-padding) tokens; `t_range`: an expert's (flow.sample_time)."""
        k_drop, k_t, k_noise = jax.random.split(key, 3)
        ids, patches = batch["segment_ids"], batch["patches"]
        b, length, p = patches.shape
        c = stats["mean"].shape[0]  # patches are (pt ph pw c): channels are the fastest axis
        x0 = ((patches.reshape(b, length, p // c, c).astype(jnp.float32) - stats["mean"])
              / stats["std"]).reshape(b, length, p)
        s = self.cfg.text.max_length
        clips = batch["tokens"].shape[1] // s  # caption k belongs to segment k + 1
        # Each caption on its own: [B, K * S, ...] -> [B * K, S, ...] -> back.
        per_caption = jax.tree.map(lambda x: x.reshape(b * clips, s, *x.shape[2:]),
                                   self.batch_text(batch, stats))
        tokens = jax.tree.map(lambda x: x.reshape(b, clips * s, *x.shape[2:]),
                              self.drop_captions(per_caption, k_drop, stats))
        t_clip = sample_time(k_t, b * (clips + 1), self.cfg.diffusion, self.shift, t_range)
        t = jnp.take_along_axis(t_clip.reshape(b, clips + 1), ids, axis=1)  # [B, L]
        noise = jax.random.normal(k_noise, x0.shape)
        x_t = (1 - t[..., None]) * x0 + t[..., None] * noise
        v = self.apply_dit(params, x_t, t, tokens, positions=batch["positions"],
                           segment_ids=ids, text_segment_ids=batch["text_segment_ids"])
        err = jnp.square(v - (noise - x0)).mean(-1)  # [B, L]
        real = (ids > 0).astype(jnp.float32)
        return (err * real).sum() / jnp.maximum(real.sum(), 1.0), {}

    def evaluate(self, params, batch: dict, stats: Stats, key: jax.Array) -> dict:
        """{"loss": mean over the eval timesteps, "loss_by_t": [num_t]}."""
        by_t = self.eval_losses(params, batch, stats, key)
        return {"loss": by_t.mean(), "loss_by_t": by_t}

    def eval_losses(self, params, batch: dict, stats: Stats, key: jax.Array) -> jax.Array:
        """Loss at each fixed eval timestep with fixed noise (no caption dropout): [num_t]; an
        expert run's timesteps (experts.eval_times), `both` each with its expert."""
        x0 = self.batch_latent(batch, stats)
        noise = jax.random.normal(key, x0.shape)
        text = self.batch_text(batch, stats)

        def at(t_scalar, p=params):
            t = jnp.full((x0.shape[0],), t_scalar)
            return self.flow_loss(p, x0, noise, t, text).mean()

        if self.expert == "both":
            return jnp.stack([at(t, params[experts.expert_at(t, self.boundary)])
                              for t in self.eval_timesteps])
        return jax.lax.map(at, jnp.asarray(self.eval_timesteps))

    # --- generation ------------------------------------------------------------------------
    def generate(self, params, tokens, stats: Stats, key: jax.Array, *, steps: int,
                 guidance: float, method: str, context: jax.Array | None = None,
                 clean_context: bool = False, uncond=None) -> jax.Array:
        """Captions (int32 tokens [B, S], or (embeddings [B, S, E], mask [B, S]) for a run with
        a pretrained encoder) -> uint8 videos [B, T, H, W, 3]; deterministic for `key`.
        Guidance pushes away from `uncond` (a caption of the same kind: a negative prompt),
        by default the empty caption.

        Continuation: `context` is the normalised latent of the first k frames [B, k, H', W',
        C]. With `clean_context` (a model trained with diffusion.context_frames) it is fed clean
        with t = 0 on its tokens at every step; otherwise by replacement (Ho et al. 2022): at
        each step the context frames are overwritten by the ground truth noised to the current
        t with the sampler's own initial noise. Either way the result keeps the context exactly.
        """
        empty = self.null_text(tokens, stats) if uncond is None else uncond
        batch = (tokens[0] if isinstance(tokens, tuple) else tokens).shape[0]
        noise = jax.random.normal(key, (batch, *self.latent_shape))
        k = 0 if context is None else context.shape[1]

        def velocity(x, t, cond):
            t_model = t
            if k:
                tb = t[:, None, None, None, None]
                given = context if clean_context else (1 - tb) * context + tb * noise[:, :k]
                x = x.at[:, :k].set(given)
                if clean_context:
                    t_model = self.token_times(t, k, x.shape[1:])
            return self.apply_expert(params, t, x, t_model, tokens if cond else empty)

        latent = sample_ode(velocity, noise, steps=steps, guidance=guidance, shift=self.shift,
                            method=method)
        if k:
            latent = latent.at[:, :k].set(context)
        return self.decode(latent, stats)


ARCHITECTURE_KEYS = ("kind", "factors", "latent_channels", "stem", "channels", "res_blocks")


def check_autoencoder_matches(wanted, found) -> None:
    """Refuse a trained autoencoder whose architecture differs from the DiT config's section."""
    from vdit.config import ConfigError

    bad = [f"autoencoder.{k}: config {getattr(wanted, k)!r}, checkpoint {getattr(found, k)!r}"
           for k in ARCHITECTURE_KEYS if getattr(wanted, k) != getattr(found, k)]
    if bad:
        raise ConfigError(f"autoencoder.checkpoint {wanted.checkpoint!r} does not match the "
                          "config:\n  " + "\n  ".join(bad))
