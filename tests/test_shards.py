"""Tokenized shards: record format, index, the Grain pipeline (shuffle, buckets, packing,
resume, corrupt records). Tiny shapes: each test runs in about a second on 2 cores."""

from __future__ import annotations

import itertools
import json

import ml_dtypes
import numpy as np
import pytest

from vdit.config import ConfigError
from vdit.data.packing import efficiency, segment_mask
from vdit.data.shard_pipeline import SKIPPED, shard_dataset
from vdit.data.shards import (
    ClipRecord,
    ShardRecordError,
    decode_record,
    encode_record,
    read_index,
    read_shard,
    shard_name,
    write_index,
    write_shard,
)

BUCKETS = [(2, 4, 4), (4, 4, 4), (1, 4, 8)]


def make_record(i: int, bucket=None, dtype=ml_dtypes.bfloat16) -> ClipRecord:
    rng = np.random.default_rng(i)
    bucket = bucket or BUCKETS[i % len(BUCKETS)]
    latent = rng.standard_normal((*bucket, 4)).astype(dtype)
    latent.flat[0] = i  # the clip's identity, readable from any batch
    return ClipRecord(latent, rng.integers(3, 50, size=1 + i % 5).astype(np.int32),
                      f"clip {i}", f"src/{i}.mp4", 8.0, (30, 48, 64), bucket, "CC-BY-4.0")


def write_dataset(directory, n: int = 24, per_shard: int = 8, corrupt: int = 0,
                  bucket=None) -> dict:
    names = [shard_name(s, (n + per_shard - 1) // per_shard)
             for s in range((n + per_shard - 1) // per_shard)]
    for s, name in enumerate(names):
        write_shard(directory, name, [make_record(i, bucket) for i in range(
            s * per_shard, min(n, (s + 1) * per_shard))])
    if corrupt:  # replace the last shard by one with garbage records among good ones
        from array_record.python.array_record_module import ArrayRecordWriter

        first = (len(names) - 1) * per_shard
        recs = [encode_record(make_record(i, bucket)) for i in range(first, n)]
        for j in range(corrupt):
            recs[j] = recs[j][: len(recs[j]) // 2] if j % 2 else b"\xc1garbage"
        w = ArrayRecordWriter(str(directory / names[-1]), "group_size:1")
        for r in recs:
            w.write(r)
        w.close()
    return write_index(directory, names, {"latent_channels": 4})


def clip_ids(batch: dict) -> list[int]:
    return [int(x) for x in np.asarray(batch["latent"]).reshape(len(batch["latent"]), -1)[:, 0]
            .astype(np.float32)]


def test_record_round_trip_is_bit_exact(tmp_path):
    recs = [make_record(i) for i in range(5)] + [make_record(9, dtype=np.float32)]
    write_shard(tmp_path, "a.array_record", recs, {"zero_frames": 1})
    index = write_index(tmp_path, ["a.array_record"], {})
    assert index["num_records"] == 6 and index["skipped"] == {"zero_frames": 1}
    assert sum(index["buckets"].values()) == 6
    for raw, rec in zip(read_shard(tmp_path / "a.array_record"), recs, strict=True):
        got = decode_record(raw)
        assert got.latent.dtype == rec.latent.dtype and got.latent.shape == rec.latent.shape
        assert got.latent.tobytes() == rec.latent.tobytes()
        np.testing.assert_array_equal(got.tokens, rec.tokens)
        assert (got.caption, got.source_id, got.fps, got.original_size, got.bucket, got.license) \
            == (rec.caption, rec.source_id, rec.fps, rec.original_size, rec.bucket, rec.license)
    read_index(tmp_path, verify=True)
    with open(tmp_path / "a.array_record", "r+b") as f:  # flip one byte: the checksum sees it
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ValueError, match="checksums"):
        read_index(tmp_path, verify=True)


@pytest.mark.parametrize("data, why", [
    (b"\xc1", "not a msgpack"), (b"\x93\x01\x02\x03", "not a map"), (b"\x80", "lacks"),
])
def test_malformed_records_are_named(data, why):
    with pytest.raises(ShardRecordError, match=why):
        decode_record(data)
    good = encode_record(make_record(0))
    with pytest.raises(ShardRecordError):
        decode_record(good[:-7])


def test_shuffle_is_deterministic_and_disjoint_across_processes(tmp_path):
    write_dataset(tmp_path, n=24, bucket=(2, 4, 4))  # one bucket: one global order

    def first_epoch(seed, process, processes):
        ds = shard_dataset(str(tmp_path), batch=1, caption_length=8, seed=seed,
                           process=process, processes=processes)
        return [clip_ids(b)[0] for b in itertools.islice(iter(ds), 24 // processes)]

    a = first_epoch(0, 0, 1)
    assert a == first_epoch(0, 0, 1) and a != first_epoch(1, 0, 1)
    parts = [first_epoch(0, p, 3) for p in range(3)]
    assert sorted(itertools.chain(*parts)) == list(range(24))  # disjoint, and all of it


def test_bucketed_batches_have_one_shape(tmp_path):
    write_dataset(tmp_path, n=24)
    for b in itertools.islice(iter(shard_dataset(str(tmp_path), batch=2, caption_length=8,
                                                 seed=0)), 8):
        assert b["latent"].shape[1:4] in [tuple(x) for x in BUCKETS]
        assert b["latent"].dtype == ml_dtypes.bfloat16 and b["tokens"].shape == (2, 8)


def test_iterator_resumes_exactly_mid_epoch(tmp_path):
    write_dataset(tmp_path, n=24)
    for mode in ("bucket", "pack"):
        kw = dict(batch=2, caption_length=8, seed=3, mode=mode, budget=48, clips_per_row=4)
        it = iter(shard_dataset(str(tmp_path), **kw))
        for _ in range(5):
            next(it)
        state = it.get_state()
        want = [next(it) for _ in range(6)]
        resumed = iter(shard_dataset(str(tmp_path), **kw))
        resumed.set_state(state)
        for a, b in zip(want, (next(resumed) for _ in range(6)), strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), (mode, k)


def test_corrupt_records_are_skipped_and_counted(tmp_path):
    write_dataset(tmp_path, n=24, corrupt=3, bucket=(2, 4, 4))
    SKIPPED.clear()
    it = iter(shard_dataset(str(tmp_path), batch=1, caption_length=8, seed=0, read_ahead=0))
    seen = {clip_ids(next(it))[0] for _ in range(21)}
    assert len(seen) == 21 and not seen & {16, 17, 18}
    assert SKIPPED["corrupt_record"] == 3


def test_packing_keeps_clips_apart_and_fills_the_budget(tmp_path):
    write_dataset(tmp_path, n=48, per_shard=16)
    with pytest.raises(ConfigError, match=r"bucket 1x4x8 gives latents of 1x4x8, which "
                       r"model.patch \[3, 2, 2\] does not divide"):
        shard_dataset(str(tmp_path), batch=4, caption_length=8, seed=0, mode="pack",
                      patch=(3, 2, 2))
    ds = shard_dataset(str(tmp_path), batch=4, caption_length=8, seed=0, mode="pack",
                       patch=(1, 2, 2), budget=64, clips_per_row=8)
    batches = list(itertools.islice(iter(ds), 6))
    b = batches[0]
    assert b["patches"].shape == (4, 64, 16) and b["positions"].shape == (4, 64, 3)
    assert b["tokens"].shape == (4, 64) and b["segment_ids"].shape == (4, 64)
    ids = b["segment_ids"]
    for row in range(4):  # segments are contiguous runs 1, 2, ..., then padding 0
        runs = [k for k, _ in itertools.groupby(ids[row])]
        assert runs == [*range(1, len(runs) + (0 not in runs)), *([0] if 0 in runs else [])]
        # each video segment has its caption under the same id
        assert set(ids[row]) - {0} == set(b["text_segment_ids"][row]) - {0}
    mask = segment_mask(ids)
    assert not mask[ids == 0].any()
    assert np.mean([efficiency(x) for x in batches]) > 0.9


# --- vdit tokenize ----------------------------------------------------------------------------


def _config():
    from vdit.config import load_config

    return load_config(None, ["autoencoder.kind=space_to_depth", "autoencoder.factors=[1,4,4]",
                              "text.max_length=8"])


def test_tokenize_folder_skips_bad_inputs_and_resumes(tmp_path):
    from vdit.data.buckets import parse_buckets
    from vdit.data.sources import FolderSource
    from vdit.data.tokenize import TokenizeOptions, tokenize
    from vdit.data.video_io import write_mp4

    videos = tmp_path / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    for name, (t, h, w) in {"a.mp4": (12, 32, 48), "b.mp4": (9, 48, 32), "c.mp4": (12, 32, 32),
                            "short.mp4": (2, 32, 32), "nocap.mp4": (8, 32, 32)}.items():
        write_mp4(videos / name, rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8), fps=8)
    (videos / "garbage.mp4").write_bytes(b"\x00not a video" * 50)
    data = (videos / "a.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 3])
    rows = [{"path": n, "caption": "a red ball falls", "license": "CC0"}
            for n in ("a.mp4", "b.mp4", "c.mp4", "short.mp4", "garbage.mp4", "truncated.mp4")]
    (tmp_path / "captions.jsonl").write_text("\n".join(map(json.dumps, rows)))
    source = FolderSource(videos, tmp_path / "captions.jsonl")
    opts = TokenizeOptions(tmp_path / "shards", parse_buckets("4x16x16,4x16x32,4x32x16"),
                           fps=4.0, shard_size=4, batch=2)
    index = tokenize(source, _config(), opts, log_fn=lambda s: None)
    assert index["num_records"] == 3
    assert index["buckets"] == {"4x16x16": 1, "4x16x32": 1, "4x32x16": 1}
    assert index["skipped"].get("missing_caption") == 1 and index["skipped"]["too_short"] == 1
    assert sum(index["skipped"].values()) == 4  # + garbage and truncated: unreadable/zero frames
    read_index(tmp_path / "shards", verify=True)
    rec = decode_record(read_shard(tmp_path / "shards" / index["shards"][0]["name"])[0])
    assert rec.source_id == "a.mp4" and rec.license == "CC0" and rec.original_size == (12, 32, 48)
    assert rec.latent.shape == (4, 4, 8, 48) and rec.latent.dtype == ml_dtypes.bfloat16
    # re-running skips finished shards: nothing is rewritten
    stamp = (tmp_path / "shards" / index["shards"][0]["name"]).stat().st_mtime_ns
    logs = []
    tokenize(source, _config(), opts, log_fn=logs.append)
    assert "2 already written" in logs[0]
    assert (tmp_path / "shards" / index["shards"][0]["name"]).stat().st_mtime_ns == stamp


def test_tfds_builder_builds_and_reads_back_without_tensorflow(tmp_path):
    import importlib.util
    import sys

    import tensorflow_datasets as tfds

    from vdit.data.buckets import parse_buckets
    from vdit.data.physics import WorldConfig, simulate
    from vdit.data.pipeline import clip_seed
    from vdit.data.sources import TfdsSource
    from vdit.data.tfds_physics import build
    from vdit.data.tokenize import TokenizeOptions, tokenize

    assert importlib.util.find_spec("tensorflow") is None  # the point: no TensorFlow at all
    world = WorldConfig(frames=4, height=16, width=16)
    build(tmp_path / "tfds", world=world, seed=5, num_train=3, num_eval=1)
    src = tfds.data_source("vdit_physics", data_dir=str(tmp_path / "tfds"), split="train")
    assert len(src) == 3
    clip = simulate(world, clip_seed(5, "train", 2))
    np.testing.assert_array_equal(src[2]["frames"], clip.frames)
    assert src[2]["caption"].decode() == clip.caption
    index = tokenize(TfdsSource("vdit_physics", str(tmp_path / "tfds")), _config(),
                     TokenizeOptions(tmp_path / "shards", parse_buckets("4x16x16")),
                     log_fn=lambda s: None)
    assert index["num_records"] == 3 and "tensorflow" not in sys.modules


def _physics_shards(tmp_path, buckets: str = "4x16x16") -> dict:
    """Tokenize 12 tiny physics clips; -> the tiny config dict reading them."""
    from conftest import tiny_dict

    from vdit.config import from_dict
    from vdit.data.buckets import parse_buckets
    from vdit.data.physics import WorldConfig
    from vdit.data.sources import PhysicsSource
    from vdit.data.tokenize import TokenizeOptions, tokenize

    d = tiny_dict(tmp_path / "run")
    source = PhysicsSource(WorldConfig(**d["data"]["world"]), 0, 12)
    tokenize(source, from_dict(d), TokenizeOptions(tmp_path / "shards", parse_buckets(buckets),
                                                   shard_size=4, dtype="float32"),
             log_fn=lambda s: None)
    d["data"].update(source="shards", shards=str(tmp_path / "shards"))
    return d


def test_training_on_shards_resumes_the_exact_stream(tmp_path):
    """`data.source: shards` through the real loop: a run stopped at step 2 and resumed saves
    at step 4 the iterator state of an uninterrupted stream that has given 4 batches."""
    from vdit.config import from_dict
    from vdit.data.physics import physics_tokenizer
    from vdit.data.pipeline import train_iterator
    from vdit.io.checkpoint import Checkpointer
    from vdit.train.loop import train
    from vdit.train.metrics import read_metrics
    from vdit.train.trainer import load_run

    d = _physics_shards(tmp_path)
    for steps in (2, 4):  # stop at 2, resume to 4
        d["train"].update(steps=steps, eval_every=100)
        train(from_dict(d), log=lambda s: None)
    cfg = from_dict(d)
    fresh = train_iterator(cfg.data, physics_tokenizer(cfg.text.max_length), 4, shuffle_seed=0)
    for _ in range(4):
        next(fresh)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    _, meta = ckpt.restore_raw(4)
    ckpt.close()
    assert meta["data_iterator"] == fresh.get_state()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) >= 3 and np.isfinite(losses).all()
    # What sampling reads: the run without its shards (the checkpoint holds the latent stats).
    (tmp_path / "shards").rename(tmp_path / "shards_moved")
    _, _, state = load_run(tmp_path / "run")
    assert int(state.step) == 4 and state.stats["mean"].shape == (cfg.latent_shape()[-1],)


def test_packed_dit_keeps_clips_apart():
    """Through the model: in a packed row, changing clip B (patches, caption, time) leaves clip
    A's output unchanged, and A packed equals A run alone."""
    import grain
    import jax
    import jax.numpy as jnp
    from conftest import tiny_dict

    from vdit.config import from_dict
    from vdit.data.packing import clip_to_patches, pack
    from vdit.diffusion.text_to_video import TextToVideo

    cfg = from_dict(tiny_dict())
    system = TextToVideo(cfg)
    params = jax.jit(system.init)(jax.random.key(0))["params"]  # jitted: 1 s, eager: 10 s
    # Random weights everywhere: at init the zero gates would make every output 0.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, jnp.shape(x))
                                       for k, x in zip(keys, leaves, strict=True)])
    apply = jax.jit(lambda *a, **kw: system.dit.apply({"params": params}, *a, **kw))
    s, c = cfg.text.max_length, cfg.latent_shape()[-1]
    rng = np.random.default_rng(0)
    lat_a = rng.standard_normal((2, 4, 4, c)).astype(np.float32)  # 8 tokens
    tok_a = system.tokenizer.encode("a red ball falls")

    def packed_row(lat_b, caption_b):
        clips = [{**clip_to_patches(lat, (1, 2, 2)), "tokens": system.tokenizer.encode(cap)}
                 for lat, cap in ((lat_a, "a red ball falls"), (lat_b, caption_b))]
        ds = grain.MapDataset.source(clips).to_iter_dataset()
        return next(iter(pack(ds, budget=20, caption_length=s, clips_per_row=3, rows=1, seed=0)))

    def run(row, t_b):
        t = jnp.where(row["segment_ids"] == 1, 0.3, t_b)
        return apply(jnp.asarray(row["patches"]), t, jnp.asarray(row["tokens"]),
                     positions=jnp.asarray(row["positions"]),
                     segment_ids=jnp.asarray(row["segment_ids"]),
                     text_segment_ids=jnp.asarray(row["text_segment_ids"]))

    row1 = packed_row(rng.standard_normal((1, 4, 8, c)).astype(np.float32), "a blue ball rolls")
    row2 = packed_row(rng.standard_normal((2, 4, 4, c)).astype(np.float32), "a green ball")
    assert list(row1["segment_ids"][0]) == [1] * 8 + [2] * 8 + [0] * 4
    out1, out2 = run(row1, 0.9), run(row2, 0.5)
    a = row1["segment_ids"][0] == 1
    np.testing.assert_array_equal(np.asarray(out1)[0, a], np.asarray(out2)[0, a])
    alone = apply(jnp.asarray(lat_a[None]), jnp.full((1,), 0.3), jnp.asarray(tok_a[None]))
    assert float(jnp.abs(alone).mean()) > 0.1  # the check below is not a comparison of zeros
    np.testing.assert_allclose(np.asarray(out1)[0, a],
                               clip_to_patches(np.asarray(alone[0]), (1, 2, 2))["patches"],
                               rtol=1e-4, atol=1e-4)


def test_training_on_packed_shards(tmp_path):
    """`data.batching: pack` through the real loop: packed rows train, the loss is finite."""
    from vdit.config import from_dict
    from vdit.train.loop import train
    from vdit.train.metrics import read_metrics

    d = _physics_shards(tmp_path)  # clips of 16 patch tokens: 2 per 40-token row
    d["data"].update(batching="pack", pack_budget=40, pack_clips=4)
    d["train"].update(steps=2, eval_every=100, checkpoint_every=100)
    train(from_dict(d), log=lambda s: None)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and np.isfinite(losses).all()
    # Throughput counts real tokens, not the rows' padding: 2 clips of 16 in each 40-token row.
    timed = [r for r in records if "tokens_per_s" in r]
    rows = d["train"]["batch_size"]
    assert timed and timed[0]["tokens_per_s"] * timed[0]["step_time_s"] == pytest.approx(
        rows * 32)


def test_multiprocess_prefetch_resumes_exactly(tmp_path):
    """With Grain prefetch processes (data.workers) the stream is deterministic and resumes
    exactly from a saved state (its order depends on the number of workers)."""
    from vdit.data.shard_pipeline import shard_iterator

    write_dataset(tmp_path, n=24, bucket=(2, 4, 4))
    kw = dict(batch=2, caption_length=8, seed=0, workers=1, prefetch=1)
    it = shard_iterator(str(tmp_path), **kw)
    first = [clip_ids(next(it)) for _ in range(3)]
    state = it.get_state()
    rest = [clip_ids(next(it)) for _ in range(4)]
    again = shard_iterator(str(tmp_path), **kw)
    assert [clip_ids(next(again)) for _ in range(3)] == first
    again.set_state(state)
    assert [clip_ids(next(again)) for _ in range(4)] == rest
    assert sorted(itertools.chain(*first, *rest)) == sorted(set(itertools.chain(*first, *rest)))


def test_cli_tokenize(tmp_path, capsys):
    from vdit.cli import main

    args = ["tokenize", str(tmp_path / "out"), "autoencoder.kind=space_to_depth",
            "autoencoder.factors=[1,4,4]", "data.world.frames=4", "data.world.height=16",
            "data.world.width=16", "--physics", "3", "--buckets"]
    assert main([*args, "4x16"]) == 2
    assert "--buckets" in capsys.readouterr().err
    assert main([*args, "4x16x16"]) == 0
    assert "tokenized 3 clips" in capsys.readouterr().out
    assert read_index(tmp_path / "out", verify=True)["buckets"] == {"4x16x16": 3}
    # A resume must write what the folder holds: another autoencoder or world is refused,
    # naming the setting and both values, and nothing there changes.
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    cut = args.index("--physics")  # overrides go before the options
    assert main([*args[:cut], "autoencoder.factors=[1,2,2]", *args[cut:], "4x16x16"]) == 2
    err = capsys.readouterr().err
    assert "autoencoder" in err and "[1, 4, 4]" in err and "[1, 2, 2]" in err, err
    assert main([*args[:cut], "data.world.gravity=5.0", *args[cut:], "4x16x16"]) == 2
    assert "world:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert main([*args, "4x16x16"]) == 0  # the same settings resume (all already written)
    assert "owns 1, 1 already written" in capsys.readouterr().out


def test_tokenize_splits_shards_over_processes(tmp_path):
    from vdit.data.buckets import parse_buckets
    from vdit.data.physics import WorldConfig
    from vdit.data.sources import PhysicsSource
    from vdit.data.tokenize import TokenizeOptions, tokenize

    source = PhysicsSource(WorldConfig(frames=4, height=16, width=16), 0, 7)

    def opts(p):
        return TokenizeOptions(tmp_path, parse_buckets("4x16x16"), shard_size=2, process=p,
                               processes=2)

    assert tokenize(source, _config(), opts(1), log_fn=lambda s: None) is None  # 1 and 3
    assert sorted(p.name for p in tmp_path.glob("*.array_record")) == [
        "shard-00001-of-00004.array_record", "shard-00003-of-00004.array_record"]
    index = tokenize(source, _config(), opts(0), log_fn=lambda s: None)  # 0 and 2, then index
    assert index["num_records"] == 7 and [s["records"] for s in index["shards"]] == [2, 2, 2, 1]
    ids = [decode_record(r).source_id for s in index["shards"]
           for r in read_shard(tmp_path / s["name"])]
    assert ids == [source.load(i).source_id for i in range(7)]  # input order


def test_shards_of_another_autoencoder_are_refused(tmp_path):
    from vdit.config import ConfigError, load_config
    from vdit.data.shard_pipeline import check_shards

    write_index(tmp_path, [], {"autoencoder": {"kind": "space_to_depth", "factors": [1, 4, 4],
                                               "latent_channels": 16}})
    check_shards(str(tmp_path), _config().autoencoder)
    other = load_config(None, ["autoencoder.kind=space_to_depth", "autoencoder.factors=[2,4,4]",
                               "data.world.frames=8"]).autoencoder
    with pytest.raises(ConfigError, match=r"autoencoder\.factors"):
        check_shards(str(tmp_path), other)


def test_tokenize_cli_defaults_to_the_configs_clip_shape(tmp_path, capsys):
    """`vdit tokenize OUT CONFIG --physics N` with no --buckets writes clips of the shape the
    config trains on (data.world), so none of the config's own clips is skipped as too short."""
    import yaml
    from conftest import tiny_dict

    from vdit.cli import main

    d = tiny_dict(tmp_path / "run")
    d["data"]["world"].update(frames=5, height=16, width=16)  # 5 frames: below any fixed default
    d["autoencoder"] = {"kind": "space_to_depth", "factors": [1, 4, 4]}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(d))
    assert main(["tokenize", str(tmp_path / "shards"), str(config), "--physics", "3"]) == 0
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["buckets_requested"] == ["5x16x16"]
    assert index["num_records"] == 3 and index["skipped"] == {}
    assert "skipped 0 inputs" in capsys.readouterr().out
