"""The config sections: one frozen dataclass per section, each with `validate()`, and `Config`
with the checks across sections (shapes that must divide, modes that must agree).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from vdit.config.fine_tune import LoraConfig
from vdit.config.world import WorldConfig
from vdit.parallel.rules import MESH_AXES, RULE_TABLES, axes_used, get_rules


def _positive(section: Any, *names: str) -> list[str]:
    return [f"{n}: must be > 0, got {getattr(section, n)}" for n in names
            if getattr(section, n) <= 0]


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its dotted key."""


@dataclass(frozen=True)
class ModelConfig:
    """The diffusion transformer: `dit` (vdit's own, vdit/models/dit.py) or `wan` (the Wan
    2.1 / 2.2 DiT of diffusers' WanTransformer3DModel, vdit/models/wan_dit.py; its captions
    are embeddings of text.width channels, text.encoder t5 or precomputed)."""

    kind: Literal["dit", "wan"] = "dit"
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    ffn_dim: int = 0  # MLP hidden width; 0: width * mlp_ratio (Wan configs state it: 8960)
    freq_dim: int = 256  # wan: sinusoidal time features
    cross_attn_norm: bool = True  # wan: affine LayerNorm before cross-attention
    patch: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) over the latent
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params stay float32
    remat: Literal["none", "full", "dots"] = "none"
    scan_layers: bool = True
    attention: Literal["auto", "xla", "cudnn", "pallas", "pallas_gpu", "pallas_tpu"] = "auto"
    attention_blocks: tuple[int, int] = (0, 0)  # Pallas (query, key) tiles; 0: backend default
    rope_theta: float = 10000.0
    # How self-attention splits the video tokens over mesh.context > 1 (vdit/ops/
    # context_parallel.py): ring rotates K/V blocks (any head count); ulysses re-shards
    # sequence <-> heads by all-to-all (heads per tensor shard must divide by mesh.context).
    context_parallel: Literal["ring", "ulysses"] = "ring"

    def hidden_dim(self) -> int:
        """The MLP's hidden width."""
        return self.ffn_dim or int(self.width * self.mlp_ratio)

    def validate(self) -> list[str]:
        problems = _positive(self, "width", "depth", "heads", "mlp_ratio", "rope_theta",
                             "freq_dim")
        if self.ffn_dim < 0:
            problems.append(f"ffn_dim: must be >= 0 (0: width * mlp_ratio), got {self.ffn_dim}")
        problems += [f"patch: every entry must be >= 1, got {self.patch}"] * any(
            p < 1 for p in self.patch
        )
        problems += [f"attention_blocks: multiples of 8 (0: default), got "
                     f"{self.attention_blocks}"] * any(b < 0 or b % 8 for b in
                                                       self.attention_blocks)
        if self.heads > 0 and self.width % self.heads:
            problems.append(f"width: {self.width} is not divisible by heads={self.heads}")
        elif self.kind == "wan" and self.heads > 0 and (self.width // self.heads) % 2:
            problems.append(f"heads: head dim width/heads = {self.width // self.heads} must be "
                            "even (Wan's 3D RoPE rotates channel pairs)")
        elif self.kind == "dit" and self.heads > 0 and (self.width // self.heads) % 8:
            problems.append(
                f"heads: head dim width/heads = {self.width // self.heads} must be a multiple of 8 "
                "(3D RoPE splits it across t, h, w)"
            )
        return problems


@dataclass(frozen=True)
class TextConfig:
    """Caption tokenizer and text encoder.

    transformer: a small encoder over the physics vocabulary, trained with the DiT (the demo).
    t5: a frozen pretrained T5-family encoder (`checkpoint`: a Hugging Face folder) run in the
    train step on the tokens stored in the shards. precomputed: embeddings that `vdit tokenize
    --text-encoder` (or your own script, docs/real-data.md) stored in the shards. For t5 and
    precomputed, `width` is the embedding width (the encoder's d_model) and `dtype` the
    precision the embeddings are stored in and rounded to; `checkpoint_sha256` is filled in
    by `vdit train` (vdit.data.captions) so a run names the exact encoder it needs."""

    encoder: Literal["transformer", "t5", "precomputed"] = "transformer"
    max_length: int = 32  # tokens, including the leading BOS (transformer) or </s> (t5)
    width: int = 128
    depth: int = 2
    heads: int = 4
    checkpoint: str = ""  # t5 / precomputed: the encoder's Hugging Face folder
    checkpoint_sha256: str = ""  # "": computed when training starts; else must match
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # caption embeddings (t5, precomputed)

    def validate(self) -> list[str]:
        problems = _positive(self, "max_length", "width", "depth", "heads")
        if self.encoder == "transformer" and self.heads > 0 and self.width % self.heads:
            problems.append(f"width: {self.width} is not divisible by heads={self.heads}")
        if self.encoder == "t5" and not self.checkpoint:
            problems.append("checkpoint: text.encoder 't5' needs a pretrained encoder folder "
                            "(text.checkpoint=PATH with config.json, model.safetensors and a "
                            "tokenizer)")
        return problems


@dataclass(frozen=True)
class AutoencoderConfig:
    """Pixels <-> latent: the learned causal VAE (vdit/models/causal_vae.py), `wan` (the Wan
    2.1 / 2.2 video VAE, vdit/models/wan_vae.py, docs/autoencoders.md), or `space_to_depth`, a
    lossless parameter-free stand-in used by fast tests.

    A DiT config names the trained autoencoder in `checkpoint` (an autoencoder run directory or
    an exported `.safetensors` file; for `wan` a diffusers AutoencoderKLWan folder, whose
    config.json is the architecture); its architecture fields must match that checkpoint's.
    """

    kind: Literal["causal_vae", "wan", "space_to_depth"] = "causal_vae"
    factors: tuple[int, int, int] = (4, 8, 8)  # (time, height, width) compression
    latent_channels: int = 16
    stem: int = 2  # pixels folded into channels before the first convolution (s x s)
    channels: tuple[int, ...] = (32, 64, 128, 128)  # widths: stem, then after each downsampling
    res_blocks: int = 1  # residual blocks per level
    checkpoint: str = ""  # the trained autoencoder a DiT uses
    # Training (vdit train-ae): l1_weight L1 + mse_weight MSE + ssim_weight (1 - SSIM)
    # + kl_weight KL (+ adversarial). MSE keeps small bright objects from being traded for the
    # background, which L1 alone does early in training (measured on the physics world).
    kl_weight: float = 1e-6
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    ssim_weight: float = 0.2
    disc_weight: float = 0.0  # 0 switches the 3D patch discriminator off
    disc_start: int = 2000  # steps of warm-up before the discriminator's loss counts
    # Tiled encode/decode (long or large videos): time chunks and blended spatial tiles.
    chunk_frames: int = 16  # video frames per chunk after the first frame
    tile: int = 256  # spatial tile edge in pixels
    tile_overlap: int = 64  # pixels shared by neighbouring tiles, blended linearly

    def validate(self) -> list[str]:
        p: list[str] = []
        if any(f < 1 or f & (f - 1) for f in self.factors):
            p.append(f"factors: every entry must be a power of two, got {self.factors}")
        if self.kind == "wan":
            return p + self._wan_problems()
        if self.kind != "causal_vae" or p:
            return p
        ft, fh, fw = self.factors
        if fh != fw:
            p.append(f"factors: height and width compression must agree, got {self.factors}")
        elif self.stem < 1 or fh % self.stem or (fh // self.stem) & (fh // self.stem - 1):
            p.append(f"stem: must divide factors[1]={fh} by a power of two, got {self.stem}")
        elif ft > fh // self.stem:
            p.append(f"factors: time compression {ft} needs at least log2({ft}) spatial "
                     f"downsamplings after the stem (factors[1] / stem = {fh // self.stem})")
        if not self.channels or any(c < 1 for c in self.channels):
            p.append(f"channels: must be a non-empty list of positive widths, got {self.channels}")
        p += _positive(self, "latent_channels", "res_blocks", "chunk_frames", "tile")
        p += self._tiling_problems()
        weights = ("kl_weight", "l1_weight", "mse_weight", "ssim_weight", "disc_weight",
                   "disc_start", "tile_overlap")
        p += [f"{n}: must be >= 0, got {getattr(self, n)}" for n in weights
              if getattr(self, n) < 0]
        return p

    def _tiling_problems(self) -> list[str]:
        ft, fh, _ = self.factors
        p = []
        if self.chunk_frames % ft:
            p.append(f"chunk_frames: must be a multiple of factors[0]={ft}, got "
                     f"{self.chunk_frames}")
        if self.tile % fh or self.tile_overlap % fh or self.tile_overlap >= self.tile:
            p.append(f"tile, tile_overlap: must be multiples of {fh} with overlap < tile, got "
                     f"{self.tile}, {self.tile_overlap}")
        return p

    def _wan_problems(self) -> list[str]:
        """`wan`: the architecture is the checkpoint's config.json, read when the model is
        built (vdit/io/autoencoders.py refuses factors or latent_channels that differ from it)."""
        p = [] if self.checkpoint else [
            "checkpoint: autoencoder.kind 'wan' needs the path of a diffusers AutoencoderKLWan "
            "folder (config.json + diffusion_pytorch_model.safetensors)"]
        p += _positive(self, "latent_channels", "chunk_frames", "tile")
        if self.tile_overlap < 0:
            p.append(f"tile_overlap: must be >= 0, got {self.tile_overlap}")
        return p or self._tiling_problems()


@dataclass(frozen=True)
class DataConfig:
    """Where clips come from. The physics world generates clip i from seed (seed, i);
    `shards` reads latents written by `vdit tokenize` (vdit/data/shards.py)."""

    source: Literal["physics", "shards"] = "physics"
    world: WorldConfig = field(default_factory=WorldConfig)
    num_clips: int = 1_000_000  # size of the training index space (an epoch)
    num_eval_clips: int = 16  # fixed held-out clips for the eval loss
    stats_clips: int = 64  # clips used to estimate per-channel latent mean and std
    seed: int = 0
    prefetch: int = 4  # batches rendered ahead on a background thread
    # data.source: shards
    shards: str = ""  # training shards (a `vdit tokenize` output folder)
    eval_shards: str = ""  # held-out shards for the eval loss ("": the first training clips)
    # bucket: one latent shape per batch; pack: clips of any shape share rows of pack_budget
    # patch tokens (at most pack_clips per row), kept apart by segment ids.
    batching: Literal["bucket", "pack"] = "bucket"
    pack_budget: int = 4096
    pack_clips: int = 16
    workers: int = 0  # Grain prefetch processes (0: threads in the training process)

    def validate(self) -> list[str]:
        problems = [f"world.{p}" for p in self.world.validate()]
        if self.source == "shards" and not self.shards:
            problems.append("shards: data.source 'shards' needs the folder written by "
                            "`vdit tokenize` (data.shards=PATH)")
        if self.workers < 0:
            problems.append(f"workers: must be >= 0, got {self.workers}")
        if self.batching == "pack" and self.source != "shards":
            problems.append("batching: 'pack' needs data.source 'shards'")
        return problems + _positive(self, "num_clips", "num_eval_clips", "stats_clips",
                                    "pack_budget", "pack_clips")


@dataclass(frozen=True)
class DiffusionConfig:
    """Rectified flow: x_t = (1 - t) x0 + t eps, target v = eps - x0."""

    t_mean: float = 0.0  # logit-normal location
    t_std: float = 1.0  # logit-normal scale
    shift: float | None = None  # None: sqrt(tokens / shift_base_tokens)
    shift_base_tokens: int = 256
    caption_dropout: float = 0.1
    eval_timesteps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    # Continuation training: the first k latent frames of each clip stay clean (t = 0 on their
    # tokens) and carry no loss, so the model learns to continue a given start (`vdit sample
    # --context`). 0: plain text-to-video.
    context_frames: int = 0

    def validate(self) -> list[str]:
        problems = _positive(self, "t_std", "shift_base_tokens")
        if self.context_frames < 0:
            problems.append(f"context_frames: must be >= 0, got {self.context_frames}")
        if self.shift is not None and self.shift <= 0:
            problems.append(f"shift: must be > 0 or null (auto), got {self.shift}")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not self.eval_timesteps or any(not 0.0 < t < 1.0 for t in self.eval_timesteps):
            problems.append(f"eval_timesteps: need values in (0, 1), got {self.eval_timesteps}")
        return problems


@dataclass(frozen=True)
class RewriteConfig:
    """`vdit sample --rewrite-prompt`: each prompt is first expanded into a detailed caption by
    a language model the user runs behind an OpenAI-compatible chat-completions `endpoint`
    (vdit/sample/rewrite.py; docs/sampling.md). Nothing is sent without the flag."""

    endpoint: str = ""  # e.g. http://127.0.0.1:8000/v1 (or .../v1/chat/completions)
    model: str = ""  # the model name the endpoint serves
    system: str = ""  # the instruction; "": vdit's (one detailed visual caption)
    api_key_env: str = ""  # the NAME of an environment variable holding the key ("": none)
    timeout_s: float = 60.0  # per try; one retry at most
    max_tokens: int = 300  # of the answer
    seed: int | None = 0  # null: not sent
    temperature: float = 0.0
    on_error: Literal["stop", "original"] = "stop"  # original: warn, sample the prompt as given

    def validate(self) -> list[str]:
        problems = _positive(self, "timeout_s", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature: must be in [0, 2], got {self.temperature}")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            problems.append("endpoint: must be an http:// or https:// URL")
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # Not echoed: what is given here may be the key itself.
            problems.append("api_key_env: must be the NAME of an environment variable that "
                            "holds the key (letters, digits, _), never the key itself")
        return problems


@dataclass(frozen=True)
class SampleConfig:
    """Generation from prompts: at the end of training and in `vdit sample`."""

    sampler: Literal["euler", "heun", "unipc", "flow_euler"] = "euler"  # diffusion/schedulers.py
    steps: int = 32
    guidance: float = 4.0
    prompts: tuple[str, ...] = (
        "a large red ball falls and bounces twice",
        "a medium blue ball rolls right",
    )
    num_per_prompt: int = 2
    seed: int = 0
    fps: float = 8.0
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)

    def validate(self) -> list[str]:
        problems = [f"rewrite.{p}" for p in self.rewrite.validate()]
        problems += _positive(self, "steps", "num_per_prompt", "fps")
        if self.guidance < 0:
            problems.append(f"guidance: must be >= 0, got {self.guidance}")
        return problems


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging, evaluation and checkpoint cadence."""

    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = True
    sample_at_end: bool = True
    # Validation samples every N steps (0: off) from the sample section's prompts, seed and
    # settings: RUN/samples/step_N and TensorBoard (vdit/train/validation.py).
    sample_every: int = 0
    max_bad_steps: int = 10  # consecutive non-finite steps (skipped) before the run stops
    microbatches: int = 1  # gradient accumulation: the batch is cut into this many slices
    # Wan 2.2's two experts (vdit/diffusion/experts.py): none trains the whole range of t;
    # high (t >= boundary) or low (t < boundary) one expert; both one run holding the two, each
    # trained on half of every batch. boundary_ratio null: init_from's pipeline's, else 0.875.
    expert: Literal["none", "high", "low", "both"] = "none"
    boundary_ratio: float | None = None
    # The DiT's starting weights (docs/fine-tuning.md): a diffusers Wan transformer or
    # WanPipeline folder, a vdit run directory or export; "" a fresh init. Read at the first
    # start only: a resume takes everything from its checkpoint.
    init_from: str = ""
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> list[str]:
        problems = _positive(
            self, "steps", "batch_size", "lr", "log_every", "eval_every", "checkpoint_every",
            "keep_checkpoints", "grad_clip", "max_bad_steps", "microbatches",
        )
        problems += [f"lora.{p}" for p in self.lora.validate()]
        if self.microbatches > 0 and self.batch_size % self.microbatches:
            problems.append(f"microbatches: {self.microbatches} does not divide batch_size "
                            f"{self.batch_size}")
        for name in ("warmup_steps", "sample_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "ema_decay", "b1", "b2"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        return problems + self._expert_problems()

    def _expert_problems(self) -> list[str]:
        p = []
        if self.boundary_ratio is not None and not 0.0 < self.boundary_ratio < 1.0:
            p.append(f"boundary_ratio: must be in (0, 1) or null, got {self.boundary_ratio}")
        rows = self.batch_size // max(self.microbatches, 1)
        if self.expert == "both" and rows % 2:
            p.append(f"expert: 'both' trains each expert on half of every (micro)batch; "
                     f"{rows} rows (batch_size / microbatches) do not halve")
        if self.expert == "both" and self.lora.enabled:
            p.append("expert: 'both' with lora.rank > 0 is not supported; train one expert per "
                     "run (high, then low)")
        return p


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes within a slice (-1: the devices left over) and across slices
    (`dcn_*`: multi-slice TPU pods, or GPU nodes); `rules` names a logical-axis table
    (vdit/parallel/rules.py) and `rule_overrides` adjusts it: [[logical, mesh_axis, ...], ...]."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1
    dcn_data: int = 1  # slices (or nodes) holding data-parallel replicas
    dcn_fsdp: int = 1  # slices (or nodes) a parameter shard spans
    rules: Literal["default", "dp", "fsdp", "fsdp_tp", "context"] = "default"
    rule_overrides: tuple[tuple[str, ...], ...] = ()

    def validate(self) -> list[str]:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor,
                 "context": self.context}
        problems = [f"{k}: must be >= 1 or -1, got {v}" for k, v in sizes.items()
                    if v == 0 or v < -1]
        problems += _positive(self, "dcn_data", "dcn_fsdp")
        if sum(v == -1 for v in sizes.values()) > 1:
            problems.append("data: at most one mesh axis may be -1")
        for i, override in enumerate(self.rule_overrides):
            bad = [a for a in override[1:] if a not in MESH_AXES]
            if not override or bad:
                problems.append(f"rule_overrides[{i}]: expected [logical_name, mesh_axis...] "
                                f"with mesh axes from {', '.join(MESH_AXES)}, got {list(override)}")
        if problems or self.rules not in RULE_TABLES:
            return problems
        used = axes_used(get_rules(self.rules, self.rule_overrides))
        for axis, size in sizes.items():
            if size > 1 and axis not in used:
                problems.append(
                    f"{axis}: {size} devices on an axis that rules '{self.rules}' never shard "
                    "over (they would hold identical copies); pick a table that uses it "
                    "(default uses every axis) or set it to 1")
        return problems

    @property
    def num_slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def validate(self) -> list[str]:
        problems = []
        for f in dataclasses.fields(self):
            problems += [f"{f.name}.{p}" for p in getattr(self, f.name).validate()]
        if problems:
            return problems
        if self.model.kind == "wan" and self.text.encoder == "transformer":
            problems.append("text.encoder: model.kind 'wan' reads caption embeddings (Wan's "
                            "UMT5): use 't5' or 'precomputed' with shards written by `vdit "
                            "tokenize --text-encoder PATH`")
        if self.text.encoder in ("precomputed", "t5") and self.data.source != "shards":
            problems.append(
                f"text.encoder: '{self.text.encoder}' needs data.source 'shards' written by "
                "`vdit tokenize --text-encoder PATH`; data.source "
                f"'{self.data.source}' supplies physics-vocabulary tokens (use 'transformer')"
            )
        # Cross-section checks: the video must cut evenly into latents, the latents into patches.
        w, ae, p = self.data.world, self.autoencoder, self.model.patch
        causal = ae.kind in ("causal_vae", "wan")
        if causal and (w.frames - 1) % ae.factors[0]:
            problems.append(
                f"data.world.frames: the causal autoencoder needs 1 + {ae.factors[0]}k frames "
                f"(factors[0]={ae.factors[0]}), got {w.frames}"
            )
        latent = self.latent_shape()
        k = self.diffusion.context_frames
        if k and not (k < latent[0] and k % p[0] == 0):
            problems.append(f"diffusion.context_frames: must be < the {latent[0]} latent frames "
                            f"(leaving some to generate) and a multiple of model.patch[0]="
                            f"{p[0]}, got {k}")
        if k and self.data.batching == "pack":
            problems.append("diffusion.context_frames: needs data.batching 'bucket' (packed "
                            "rows have no fixed first frames)")
        for axis, size, f, lat, pp in zip(
            "thw", (w.frames, w.height, w.width), ae.factors, latent[:3], p, strict=True
        ):
            if size % f and not (causal and axis == "t"):
                problems.append(
                    f"autoencoder.factors: data.world size {size} along {axis} is not "
                    f"divisible by factor {f}"
                )
            elif lat % pp:
                problems.append(
                    f"model.patch: latent size {lat} along {axis} is not divisible by "
                    f"patch {pp}"
                )
        return problems + self._tensor_problems() + self._context_problems()

    def _tensor_problems(self) -> list[str]:
        """Tensor parallelism splits the heads and the MLP's hidden units mesh.tensor ways
        (Wan 2.1 1.3B: 12 heads, so tensor 8 is out; 14B: 40 heads, 16 is out)."""
        t, m = self.mesh.tensor, self.model
        if t <= 1:
            return []
        problems = [f"mesh.tensor: {t} does not divide model.heads={m.heads} (each tensor "
                    f"shard holds whole heads); use one of "
                    f"{[n for n in range(1, m.heads + 1) if m.heads % n == 0]}"] * bool(
                        m.heads % t)
        if m.hidden_dim() % t:
            problems.append(f"mesh.tensor: {t} does not divide the MLP hidden width "
                            f"{m.hidden_dim()}")
        return problems

    def _context_problems(self) -> list[str]:
        """Context parallelism splits every clip's tokens (and, for ulysses, the heads of each
        tensor shard) mesh.context ways. Shapes read from shards are checked when traced."""
        c, t, m = self.mesh.context, self.mesh.tensor, self.model
        if c <= 1:  # 1, or -1 (known only once the devices are counted)
            return []
        problems = []
        if self.data.batching == "pack" and self.data.pack_budget % c:
            problems.append(f"data.pack_budget: {self.data.pack_budget} tokens per packed row "
                            f"do not split over mesh.context={c}; use a multiple of {c}")
        elif self.data.source == "physics" and self.num_tokens() % c:
            problems.append(f"mesh.context: {self.num_tokens()} tokens per clip do not split "
                            f"{c} ways; use a context size that divides {self.num_tokens()}")
        shards = c * max(t, 1)  # tensor -1: checked when traced
        if m.context_parallel == "ulysses" and m.heads % shards:
            problems.append(f"model.heads: ulysses splits the {m.heads} heads over mesh.context "
                            f"{c} x mesh.tensor {max(t, 1)} = {shards} devices; use a multiple "
                            f"of {shards} or model.context_parallel=ring")
        return problems

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(T', H', W', C) of one clip's latent: T' = 1 + (T - 1) / ft for the causal VAE."""
        w, ae = self.data.world, self.autoencoder
        ft, fh, fw = ae.factors
        if ae.kind in ("causal_vae", "wan"):
            return (1 + (w.frames - 1) // ft, w.height // fh, w.width // fw, ae.latent_channels)
        return (w.frames // ft, w.height // fh, w.width // fw, 3 * ft * fh * fw)

    def num_tokens(self) -> int:
        """Spacetime tokens per clip: T'/pt * H'/ph * W'/pw."""
        t, h, w, _ = self.latent_shape()
        pt, ph, pw = self.model.patch
        return (t // pt) * (h // ph) * (w // pw)
