"""Grain pipelines over the physics world: clip i of a split is simulated from its own seed, so
the data set needs no storage and the iterator state (a position) resumes the exact stream."""

from __future__ import annotations

import grain
import jax
import numpy as np

from vdit.config import DataConfig
from vdit.data.physics import simulate
from vdit.models.text import WordTokenizer

SPLITS = {"train": 0, "eval": 1}


def clip_seed(data_seed: int, split: str, index: int) -> int:
    """A 63-bit seed for clip `index` of `split`; train and eval clips never share a seed."""
    state = np.random.SeedSequence([data_seed, SPLITS[split], index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1] >> 1)


def make_example(cfg: DataConfig, tokenizer: WordTokenizer, split: str, index: int) -> dict:
    """One clip: {"video": uint8 [T, H, W, 3], "tokens": int32 [S], "seed": int64 []}."""
    seed = clip_seed(cfg.seed, split, index)
    clip = simulate(cfg.world, seed)
    return {"video": clip.frames, "tokens": tokenizer.encode(clip.caption),
            "seed": np.int64(seed)}


def train_iterator(cfg: DataConfig, tokenizer: WordTokenizer, global_batch: int, *,
                   shuffle_seed: int, patch: tuple[int, int, int] = (1, 2, 2),
                   embeddings: bool = False):
    """An endless, checkpointable iterator of this host's share of each global batch: uint8
    videos from the physics world, or latents from shards (`data.source`); packed rows are
    cut into the DiT's `patch`; `embeddings` adds the shards' caption embeddings."""
    if cfg.source == "shards":
        from vdit.data.shard_pipeline import shard_iterator

        return shard_iterator(cfg.shards, batch=global_batch, caption_length=tokenizer.max_length,
                              seed=shuffle_seed, workers=cfg.workers, prefetch=cfg.prefetch,
                              mode=cfg.batching, patch=patch, budget=cfg.pack_budget,
                              clips_per_row=cfg.pack_clips, embeddings=embeddings)
    hosts, host = jax.process_count(), jax.process_index()
    if global_batch % hosts:
        raise ValueError(f"train.batch_size {global_batch} is not divisible by {hosts} hosts")
    ds = (
        grain.MapDataset.range(cfg.num_clips)
        .seed(shuffle_seed)
        .shuffle()
        .repeat()
        .map(lambda i: make_example(cfg, tokenizer, "train", int(i)))
        # Host h of P reads rows [h * B/P, (h + 1) * B/P) of each global batch: the global
        # batch, row order included, is the same for any number of hosts (elastic resume).
        .batch(global_batch // hosts, drop_remainder=True)
        .slice(slice(host, None, hosts))
    )
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(cfg.prefetch, 1))
    return iter(ds.to_iter_dataset(read_options=options))


def fixed_batch(cfg: DataConfig, tokenizer: WordTokenizer, split: str, count: int,
                embeddings: bool = False) -> dict:
    """The first `count` clips of a split, stacked: used for eval and latent statistics.
    Shards give {"latent", "tokens"} instead of {"video", "tokens", "seed"}."""
    if cfg.source == "shards":
        from vdit.data.shard_pipeline import first_clips

        directory = cfg.eval_shards if split == "eval" and cfg.eval_shards else cfg.shards
        return first_clips(directory, count, tokenizer.max_length, embeddings)
    examples = [make_example(cfg, tokenizer, split, i) for i in range(count)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
