"""The Grain pipeline over tokenized shards (`data.source: shards`).

    index.json -> record indices -> seeded global shuffle -> repeat -> this process's stride
      -> read + decode (msgpack; a corrupt record is skipped and counted) -> either
         bucket: one stream per bucket, batched, mixed by bucket size (one shape per batch)
         pack:   patches + positions + caption, best-fit packed into a token budget per row
      -> [multiprocess prefetch] -> host-local numpy batches (the loop makes global jax.Arrays)

Everything before prefetch is a deterministic function of (seed, position), so the iterator's
`get_state()` saved in the checkpoint resumes exactly the stream an uninterrupted run sees.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import grain
import numpy as np

from vdit.config import ConfigError
from vdit.data.packing import clip_to_patches, pack
from vdit.data.shards import ShardRecordError, decode_record, read_index, shard_paths

log = logging.getLogger(__name__)
# Records skipped in this process, by reason (each prefetch worker counts its own).
SKIPPED: Counter = Counter()
MAX_CORRUPT_IN_A_ROW = 1000
_IN_A_ROW = [0]  # consecutive corrupt records read by this process


@dataclass(frozen=True)
class ShardReader:
    """Decodes record i of a shard directory; picklable, so prefetch workers can run it."""

    source: grain.sources.ArrayRecordDataSource
    caption_length: int
    patch: tuple[int, int, int] | None = None  # set: emit packing features, not a latent
    embeddings: bool = False  # emit the stored caption embeddings (text.encoder precomputed)

    def __call__(self, index: int) -> dict | None:
        """-> {"latent": [T', H', W', C], "tokens": int32 [S]} (or patches/positions; with
        `embeddings` also "text" [S, E] in the stored dtype, zero-padded, and "text_mask" int32
        [S]), or None for a corrupt record (counted in SKIPPED; the stream goes on)."""
        try:
            rec = decode_record(self.source[int(index)])
            if self.embeddings and rec.text is None:
                raise ShardRecordError("no caption embeddings (text) in the record")
        except ShardRecordError as e:
            SKIPPED["corrupt_record"] += 1
            _IN_A_ROW[0] += 1
            log.warning("skipping record %d: %s", index, e)
            # An endless stream of nothing but bad records would spin forever: stop loudly.
            if _IN_A_ROW[0] >= MAX_CORRUPT_IN_A_ROW:
                raise ShardRecordError(
                    f"{MAX_CORRUPT_IN_A_ROW} corrupt records in a row (the last: record "
                    f"{index}: {e}); the shards are damaged — re-run vdit tokenize") from None
            return None
        _IN_A_ROW[0] = 0
        tokens = np.zeros(self.caption_length, np.int32)  # PAD = 0, truncate or pad
        n = min(len(rec.tokens), self.caption_length)
        tokens[:n] = rec.tokens[:n]
        text = {}
        if self.embeddings:
            n = min(len(rec.text), self.caption_length)
            emb = np.zeros((self.caption_length, rec.text.shape[1]), rec.text.dtype)
            emb[:n] = rec.text[:n]
            text = {"text": emb, "text_mask": (np.arange(self.caption_length) < n).astype(
                np.int32)}
        if self.patch is None:
            return {"latent": rec.latent, "tokens": tokens, **text}
        return {**clip_to_patches(rec.latent, self.patch), "tokens": tokens, **text}


def _check_patch_divides(directory: str, index: dict, source, patch) -> None:
    """Packing cuts every clip into patches: refuse, before training, a bucket whose latent
    the patch does not divide (a one-frame image latent under model.patch [2, ...]), naming
    it; one readable record per bucket shows its latent shape."""
    for bucket, indices in record_buckets(index).items():
        for i in indices[:4]:
            try:
                shape = decode_record(source[int(i)]).latent.shape[:3]
            except ShardRecordError:
                continue  # a corrupt record: the next one of the bucket tells
            if any(n % p for n, p in zip(shape, patch, strict=True)):
                raise ConfigError(
                    f"{directory}: bucket {bucket} gives latents of {shape[0]}x{shape[1]}x"
                    f"{shape[2]}, which model.patch {list(patch)} does not divide; packing "
                    "needs a patch that divides every bucket's latent (model.patch [1, ...] "
                    "for one-frame images)")
            break


def record_buckets(index: dict) -> dict[str, np.ndarray]:
    """Bucket key -> global record indices (in shard order) of the clips in that bucket."""
    keys = [b for s in index["shards"] for b in s["buckets"]]
    out: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return {k: np.asarray(v, np.int64) for k, v in sorted(out.items())}


def _stream(indices: np.ndarray, reader: ShardReader, seed: int, process: int,
            processes: int, read: grain.ReadOptions) -> grain.IterDataset:
    """Shuffled (seeded, global), endless, this process's stride, decoded, bad records dropped."""
    return (
        grain.MapDataset.source(indices)
        .seed(seed)
        .shuffle()
        .repeat()
        .slice(slice(process, None, processes))  # disjoint strides of one global order
        .map(reader)
        .to_iter_dataset(read_options=read)
        .filter(lambda ex: ex is not None)
    )


def shard_dataset(directory: str, *, batch: int, caption_length: int, seed: int,
                  mode: str = "bucket", patch: tuple[int, int, int] = (1, 2, 2),
                  budget: int = 4096, clips_per_row: int = 16, process: int = 0,
                  processes: int = 1, read_threads: int = 2,
                  read_ahead: int = 16, embeddings: bool = False) -> grain.IterDataset:
    """This process's batches of a shard directory: `batch` clips per batch ("bucket"), or
    `batch` packed rows of `budget` patch tokens each ("pack"). Each stream reads records on
    `read_threads` threads, `read_ahead` records ahead (0: synchronously). `embeddings`: each
    clip also brings its stored caption embeddings ("text", "text_mask"; packed per caption)."""
    # Grain's default (16 threads, 500 records ahead, per stream) would swamp a small host.
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_ahead)
    index = read_index(directory)
    source = grain.sources.ArrayRecordDataSource(shard_paths(directory, index))
    if mode == "bucket":
        reader = ShardReader(source, caption_length, embeddings=embeddings)
        buckets = record_buckets(index)
        streams = [_stream(idx, reader, seed + i, process, processes, read).batch(
                   batch, drop_remainder=True) for i, idx in enumerate(buckets.values())]
        if len(streams) == 1:
            return streams[0]
        # Each batch comes from one bucket; buckets are drawn in proportion to their size.
        return grain.IterDataset.mix(streams, [len(v) for v in buckets.values()])
    if mode == "pack":
        _check_patch_divides(directory, index, source, patch)
        reader = ShardReader(source, caption_length, patch, embeddings)
        clips = _stream(np.arange(index["num_records"]), reader, seed, process, processes,
                        read)
        clips = clips.filter(lambda ex: len(ex["patches"]) <= budget)
        return pack(clips, budget=budget, caption_length=caption_length,
                    clips_per_row=clips_per_row, rows=batch, seed=seed, embeddings=embeddings)
    raise ValueError(f"data.batching: 'bucket' or 'pack', got {mode!r}")


def check_shards(directory: str, autoencoder) -> dict:
    """The index of `directory`, refused (ConfigError naming the key) when its latents come
    from another autoencoder than the config's `autoencoder` section."""
    from vdit.config import ConfigError

    index = read_index(directory)
    stored = index.get("autoencoder", {})
    bad = [f"autoencoder.{k}: config {getattr(autoencoder, k)!r}, shards {stored[k]!r}"
           for k in ("kind", "factors", "latent_channels") if k in stored
           and list(np.atleast_1d(stored[k])) != list(np.atleast_1d(getattr(autoencoder, k)))]
    if bad:
        raise ConfigError(f"data.shards {directory!r} were encoded by another autoencoder:\n  "
                          + "\n  ".join(bad))
    return index


def first_clips(directory: str, count: int, caption_length: int,
                embeddings: bool = False) -> dict:
    """The first `count` clips of the most common bucket, stacked: {"latent" [N, T', H', W', C],
    "tokens" int32 [N, S]} (+ "text", "text_mask" with `embeddings`; eval batches and latent
    statistics)."""
    index = read_index(directory)
    buckets = record_buckets(index)
    indices = max(buckets.values(), key=len)
    reader = ShardReader(grain.sources.ArrayRecordDataSource(shard_paths(directory, index)),
                         caption_length, embeddings=embeddings)
    clips = [ex for ex in map(reader, indices[: count]) if ex is not None]
    if not clips:
        raise ValueError(f"{directory}: no readable clips")
    return {k: np.stack([c[k] for c in clips]) for k in clips[0]}


def shard_iterator(directory: str, *, batch: int, caption_length: int, seed: int,
                   workers: int = 0, prefetch: int = 4, **kw) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this host's share of each global batch."""
    import jax

    hosts, host = jax.process_count(), jax.process_index()
    if batch % hosts:
        raise ValueError(f"train.batch_size {batch} is not divisible by {hosts} hosts")
    ds = shard_dataset(directory, batch=batch // hosts, caption_length=caption_length,
                       seed=seed, process=host, processes=hosts, **kw)
    if workers > 0:
        _parse_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=prefetch))
    return iter(ds)


def _parse_absl_flags() -> None:
    """Grain's multiprocess prefetch reads absl flags, which are unparsed outside absl.app."""
    import sys

    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])
