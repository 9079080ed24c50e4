"""`vdit tokenize`: videos -> autoencoder latents in ArrayRecord shards (vdit/data/shards.py).

    source item i (sources.py) -> decode -> resample fps -> fit to a bucket (buckets.py)
      -> encode, a jitted batch per bucket sharded over local devices -> record -> shard
    caption -> word tokens, or (text.encoder t5 / precomputed, `text.checkpoint`) T5 token
      ids and embeddings in jitted batches (vdit/data/captions.py), real tokens only

`--pipeline PATH` (a diffusers WanPipeline folder, read once into a PipelineSpec) is that
pipeline's VAE (`autoencoder.kind: wan` on vae/; training normalises with its latents_mean /
latents_std) and its UMT5 (text_encoder/ + tokenizer/) in one flag (`pipeline_config`), with
text.max_length 512: Wan's pipeline zero-pads its captions to 512 tokens and its transformer
attends to that padding, so a run reading these shards (padded by the reader) computes what
the pipeline does. Buckets must fit the pipeline's models (`PipelineSpec.clip_problems`).

Inputs are split into shards of `shard_size` consecutive items; process p of n owns the shards
with index % n == p, skips the ones already written (resume), and whoever finds every shard
written assembles `index.json`. An input that cannot become a clip is skipped and counted by
reason in its shard's sidecar; one bad file never stops the job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from vdit.config import Config, ConfigError
from vdit.data.buckets import Bucket, SkipClip, prepare_clip
from vdit.data.physics import physics_tokenizer
from vdit.data.shards import (
    DTYPES,
    ClipRecord,
    shard_done,
    shard_name,
    write_index,
    write_shard,
)
from vdit.io.atomic import write_text
from vdit.io.wan_pipeline import RECIPE, PipelineSpec
from vdit.models.autoencoder import make_autoencoder

log = logging.getLogger(__name__)


@dataclass
class TokenizeOptions:
    out: Path
    buckets: list[Bucket]
    fps: float | None = None  # resample to this frame rate (None: keep the source's)
    shard_size: int = 256  # input items per shard
    batch: int = 8  # clips per encoder call (rounded up to a multiple of the local devices)
    dtype: str = "bfloat16"  # stored latent dtype
    process: int = 0
    processes: int = 1
    info: dict = field(default_factory=dict)  # extra index.json fields (source description)
    pipeline: PipelineSpec | None = None  # --pipeline: the WanPipeline the shards are for
    # Filled in: seconds and counts of this process's encoding (clips, autoencoder_s,
    # captions, text_s), for the report and tools/bench_text.py.
    timings: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if not 0 <= self.process < self.processes:
            raise ConfigError(f"tokenize: process {self.process} of {self.processes}: the "
                              f"process number must be in 0..{self.processes - 1}")


PIPELINE_TEXT_LENGTH = RECIPE["max_sequence_length"]  # WanPipeline's caption padding: 512


def pipeline_config(cfg: Config, spec: PipelineSpec, max_length: int | None = None) -> Config:
    """`cfg` with the autoencoder and text sections of `vdit tokenize --pipeline`: the spec's
    Wan VAE (kind wan, its factors and z_dim) and UMT5 (text.encoder precomputed, or t5 when the
    config says t5; its width) at `max_length` tokens (None: 512, the pipeline's padding)."""
    ae = dataclasses.replace(cfg.autoencoder, kind="wan", checkpoint=str(spec.vae),
                             factors=spec.vae_factors,
                             latent_channels=spec.transformer.in_channels)
    text = dataclasses.replace(
        cfg.text, encoder="t5" if cfg.text.encoder == "t5" else "precomputed",
        checkpoint=str(spec.text_encoder), checkpoint_sha256="", width=spec.transformer.text_dim,
        max_length=max_length or PIPELINE_TEXT_LENGTH)
    return dataclasses.replace(cfg, autoencoder=ae, text=text)


def check_buckets(spec: PipelineSpec, buckets: list[Bucket]) -> None:
    """Refuse, naming each, the buckets the pipeline's VAE and transformer cannot take."""
    bad = [f"{'x'.join(map(str, b))}: " + "; ".join(p) for b in buckets
           if (p := spec.clip_problems(*b))]
    if bad:
        raise ConfigError(f"--buckets: {len(bad)} bucket(s) do not fit the pipeline {spec.path} "
                          "(frames 1 + 4k, sizes multiples of the VAE factor x patch):\n  "
                          + "\n  ".join(bad))


def pipeline_record(spec: PipelineSpec) -> dict:
    """The pipeline's entry in index.json: its folder, experts' boundary, VAE factors, patch."""
    return {"path": str(spec.path.resolve()), "boundary_ratio": spec.boundary_ratio,
            "experts": len(spec.expert_folders()), "vae_factors": list(spec.vae_factors),
            "patch": list(spec.transformer.model.patch)}


class BatchEncoder:
    """uint8 videos [B, F, H, W, 3] of one bucket -> latents [B, T', H', W', C] in `dtype`,
    a jitted call per bucket shape with the batch split over this host's devices."""

    def __init__(self, cfg: Config, dtype: str):
        self.cfg = cfg.autoencoder
        self.ae = None if self.cfg.kind == "wan" else make_autoencoder(self.cfg)
        self.params: dict = {}
        if self.cfg.kind == "wan":  # the architecture and weights of a diffusers folder
            from vdit.io.autoencoders import load_wan

            self.ae, self.params, _ = load_wan(self.cfg)
        elif self.cfg.kind == "causal_vae":
            from vdit.diffusion.text_to_video import check_autoencoder_matches
            from vdit.io.run_dir import load_autoencoder

            ae_cfg, self.params, _ = load_autoencoder(self.cfg.checkpoint)
            check_autoencoder_matches(self.cfg, ae_cfg.autoencoder)
        self.dtype = DTYPES[dtype]
        devices = jax.local_devices()
        self.sharding = NamedSharding(Mesh(np.array(devices), ("batch",)),
                                      PartitionSpec("batch"))
        self.devices = len(devices)

        def encode(params, video):
            return self.ae.encode(params, video.astype(jnp.float32) / 127.5 - 1.0)

        self.fn = jax.jit(encode)

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        n = len(videos)
        if self.cfg.kind != "space_to_depth" and max(videos.shape[2:4]) > self.cfg.tile:
            from vdit.models.tiling import encode_tiled  # large frames: bounded memory

            lat = encode_tiled(self.ae, self.params, jnp.asarray(videos) / 127.5 - 1.0)
            return np.asarray(lat).astype(self.dtype)
        pad = -n % self.devices  # equal shares per device; the padding is dropped below
        if pad:
            videos = np.concatenate([videos, np.zeros((pad, *videos.shape[1:]), videos.dtype)])
        lat = self.fn(self.params, jax.device_put(videos, self.sharding))
        return np.asarray(jax.device_get(lat))[:n].astype(self.dtype)


def _encode_shard(clips: list, encoder: BatchEncoder, batch: int) -> list[np.ndarray]:
    """Latents of fitted clips [(video, bucket)], in input order, batched per bucket."""
    out: list = [None] * len(clips)
    by_bucket: dict[Bucket, list[int]] = {}
    for i, (_, bucket) in enumerate(clips):
        by_bucket.setdefault(bucket, []).append(i)
    for idx in by_bucket.values():
        for s in range(0, len(idx), batch):
            part = idx[s: s + batch]
            for i, lat in zip(part, encoder(np.stack([clips[i][0] for i in part])), strict=True):
                out[i] = lat
    return out


def _captions(texts: list[str], tokenizer, opts: TokenizeOptions) -> tuple[list, list, int]:
    """(tokens per caption, embeddings per caption or Nones, truncated count): word tokens,
    or a CaptionEncoder's ids and embeddings cut to each caption's real tokens."""
    from vdit.data.captions import CaptionEncoder

    if not isinstance(tokenizer, CaptionEncoder):
        return [tokenizer.encode(t) for t in texts], [None] * len(texts), 0
    t0 = time.perf_counter()
    emb, mask, ids, truncated = tokenizer.embed(texts) if texts else ([], [], [], 0)
    opts.timings.update(text_s=time.perf_counter() - t0, captions=len(texts))
    lengths = [int(m.sum()) for m in mask]
    return ([i[:n] for i, n in zip(ids, lengths, strict=True)],
            [e[:n] for e, n in zip(emb, lengths, strict=True)], truncated)


def _tokenize_shard(source, items: range, opts: TokenizeOptions, encoder: BatchEncoder,
                    tokenizer, pbar) -> tuple[list[ClipRecord], Counter, int]:
    skipped: Counter = Counter()
    kept, fitted = [], []
    for i in items:
        try:
            raw = source.load(i)
            video, bucket = prepare_clip(raw.frames, raw.fps, opts.fps, opts.buckets)
        except SkipClip as e:
            skipped[e.reason] += 1
            log.warning("skipping item %d: %s", i, e)
        except Exception as e:  # any failure of one input is counted, never fatal
            skipped["unreadable"] += 1
            log.warning("skipping item %d: %s: %s", i, type(e).__name__, e)
        else:
            kept.append((raw, video.shape))
            fitted.append((video, bucket))
        pbar.update(1)
    t0 = time.perf_counter()
    latents = _encode_shard(fitted, encoder, opts.batch)
    opts.timings.update(autoencoder_s=time.perf_counter() - t0, clips=len(fitted))
    tokens, texts, truncated = _captions([raw.caption for raw, _ in kept], tokenizer, opts)
    records = [ClipRecord(lat, tok, raw.caption, raw.source_id, opts.fps or raw.fps,
                          tuple(raw.frames.shape[:3]), bucket, raw.license, text)
               for (raw, _), (_, bucket), lat, tok, text in zip(kept, fitted, latents, tokens,
                                                                 texts, strict=True)]
    return records, skipped, truncated


SETTINGS = "tokenize.json"  # what the shards of a folder were written with


def settings(cfg: Config, opts: TokenizeOptions, captions=None) -> dict:
    """What decides the records of a folder: the source (and its world), buckets, frame rate,
    latent dtype, the autoencoder and the caption encoder (by content hash)."""
    out = {"source": opts.info, "buckets": ["x".join(map(str, b)) for b in opts.buckets],
           "fps": opts.fps, "latent_dtype": opts.dtype, "shard_size": opts.shard_size,
           "autoencoder": {k: getattr(cfg.autoencoder, k) for k in
                           ("kind", "factors", "latent_channels", "checkpoint")},
           "text_max_length": cfg.text.max_length, "text_encoder": None,
           "pipeline": None if opts.pipeline is None else str(opts.pipeline.path.resolve())}
    if opts.info.get("source") == "physics":
        out["world"] = dataclasses.asdict(cfg.data.world)
    if captions is not None:
        out["text_encoder"] = {"sha256": captions.sha256, "width": captions.width,
                               "dtype": captions.dtype,
                               "tokenizer_sha256": captions.tokenizer_sha256()}
    return json.loads(json.dumps(out))  # tuples as lists, as they read back


def check_settings(out: Path, current: dict, *, resumed: bool) -> None:
    """A resumed `vdit tokenize` must write what the folder's shards were written with: a
    difference is refused, naming each setting and both values. Records the settings on the
    first run (a folder from before this check has shards and no record: not checked)."""
    path = Path(out) / SETTINGS
    if path.exists():
        saved = json.loads(path.read_text())
        diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if diff:
            lines = "; ".join(f"{k}: {json.dumps(saved.get(k))} there, {json.dumps(current.get(k))}"
                              f" now" for k in diff)
            raise ConfigError(f"{out}: its shards were written with other settings ({lines}). "
                              "Tokenize into a new folder, or rerun with the same settings")
    elif not resumed:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(current, indent=1))


def tokenize(source, cfg: Config, opts: TokenizeOptions, *, log_fn=print) -> dict | None:
    """Tokenize this process's unfinished shards of `source`; returns the index once every
    shard exists (None while other processes are still writing theirs)."""
    num_shards = max(1, math.ceil(len(source) / opts.shard_size))
    names = [shard_name(i, num_shards) for i in range(num_shards)]
    mine = [i for i in range(num_shards) if i % opts.processes == opts.process]
    todo = [i for i in mine if not shard_done(opts.out, names[i])]
    if opts.pipeline is not None:
        check_buckets(opts.pipeline, opts.buckets)
    log_fn(f"tokenize: {len(source)} inputs in {num_shards} shards; process {opts.process}/"
           f"{opts.processes} owns {len(mine)}, {len(mine) - len(todo)} already written")
    captions = None
    if cfg.text.encoder != "transformer":  # loaded (and checked) before any video is read
        from vdit.data.captions import CaptionEncoder

        captions = CaptionEncoder(cfg.text.checkpoint, cfg.text.max_length, cfg.text.dtype)
    check_settings(opts.out, settings(cfg, opts, captions), resumed=len(mine) > len(todo))
    if todo:
        encoder = BatchEncoder(cfg, opts.dtype)
        tokenizer = captions or physics_tokenizer(cfg.text.max_length)
        ranges = {i: range(i * opts.shard_size, min(len(source), (i + 1) * opts.shard_size))
                  for i in todo}
        with tqdm(total=sum(len(r) for r in ranges.values()), desc="tokenize",
                  dynamic_ncols=True, mininterval=1.0) as pbar:
            for i in todo:
                records, skipped, cut = _tokenize_shard(source, ranges[i], opts, encoder,
                                                        tokenizer, pbar)
                write_shard(opts.out, names[i], records, skipped, cut)
    if not all(shard_done(opts.out, n) for n in names):
        log_fn("tokenize: other processes' shards are not all written yet; the last one to "
               "finish writes index.json")
        return None
    info = {"latent_dtype": opts.dtype, "fps": opts.fps,
            "buckets_requested": ["x".join(map(str, b)) for b in opts.buckets],
            "autoencoder": {k: getattr(cfg.autoencoder, k) for k in
                            ("kind", "factors", "latent_channels", "checkpoint")},
            "text_max_length": cfg.text.max_length, **opts.info}
    if captions is not None:
        info["text_encoder"] = captions.record()
    if opts.pipeline is not None:
        info["pipeline"] = pipeline_record(opts.pipeline)
    index = write_index(opts.out, names, info)
    log_fn(report(index, opts.timings))
    return index


def report(index: dict, timings: dict | None = None) -> str:
    """The end-of-job summary: clips per bucket, skipped inputs by reason, truncated captions,
    the text encoder, and this process's encoding rates."""
    lines = [f"tokenized {index['num_records']} clips into {len(index['shards'])} shards"]
    if index.get("text_encoder"):
        from vdit.data.captions import describe

        lines.append(f"captions: {describe(index['text_encoder'])}")
    lines.append(f"captions truncated to text.max_length {index.get('text_max_length')}: "
                 f"{index.get('captions_truncated', 0)}")
    t = timings or {}
    if t.get("clips"):
        lines.append(f"autoencoder: {t['clips']} clips in {t['autoencoder_s']:.2f} s "
                     f"({t['clips'] / max(t['autoencoder_s'], 1e-9):.1f} clips/s)")
    if t.get("captions"):
        lines.append(f"text encoder: {t['captions']} captions in {t['text_s']:.2f} s "
                     f"({t['captions'] / max(t['text_s'], 1e-9):.1f} captions/s)")
    lines += [f"  bucket {k}: {v}" for k, v in index["buckets"].items()]
    skipped = index["skipped"]
    lines.append(f"skipped {sum(skipped.values())} inputs" + ("" if skipped else " (none)"))
    lines += [f"  {k}: {v}" for k, v in skipped.items()]
    return "\n".join(lines)
