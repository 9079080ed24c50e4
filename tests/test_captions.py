"""Captions through a pretrained text encoder (issue #24): config keys, the record format,
refusals, the precomputed route against the in-step T5, and your own encoder's shards.

The real-footage run from mp4 to sample and export is tests/test_real_data.py."""

from __future__ import annotations

import json
import re
import shutil

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import tiny_dict
from real_clips import T5_FIXTURE, make_clips

from vdit.config import ConfigError, from_dict

UMT5_FIXTURE = T5_FIXTURE.parent / "umt5"


def _text(encoder: str = "precomputed", **kw) -> dict:
    return {"encoder": encoder, "checkpoint": str(T5_FIXTURE), "width": 32, "max_length": 64,
            "dtype": "float32", **kw}


@pytest.fixture(scope="module")
def t5_shards(tmp_path_factory):
    """Six real clips (9x32x32, 9x32x48) tokenized with the T5 fixture in float32; -> (dict of
    the tiny config reading them, shards folder)."""
    from vdit.data.buckets import parse_buckets
    from vdit.data.sources import FolderSource
    from vdit.data.tokenize import TokenizeOptions, tokenize

    tmp = tmp_path_factory.mktemp("captions")
    captions = make_clips(tmp)
    d = tiny_dict(tmp / "run")
    d["text"] = _text()
    d["model"].update(depth=1)
    d["data"].update(world={"frames": 9, "height": 32, "width": 32}, source="shards",
                     shards=str(tmp / "shards"))
    d["diffusion"]["caption_dropout"] = 0.5  # both routes must drop to the same empty caption
    tokenize(FolderSource(tmp / "clips", captions), from_dict(d),
             TokenizeOptions(tmp / "shards", parse_buckets("9x32x32,9x32x48"), shard_size=4,
                             dtype="float32"), log_fn=lambda s: None)
    return d, tmp / "shards"


def test_text_config_keys_are_checked_and_named(tmp_path):
    from vdit.data.captions import resolve_text

    d = tiny_dict(tmp_path / "run")
    d["text"] = {"encoder": "t5", "width": 32}
    with pytest.raises(ConfigError, match=r"text\.checkpoint: text\.encoder 't5' needs"):
        from_dict(d)
    d["data"].update(source="shards", shards=str(tmp_path / "none"))
    d["text"]["checkpoint"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"text\.checkpoint: .*missing does not exist"):
        resolve_text(from_dict(d))
    d["text"].update(checkpoint=str(T5_FIXTURE), width=48)
    with pytest.raises(ConfigError, match=r"text\.width: 48, .* has d_model 32"):
        resolve_text(from_dict(d))


def test_record_keeps_real_tokens_and_length(t5_shards):
    """Each record holds the embeddings of its caption's real tokens only (bit-equal to the
    encoder's output), its length, and index.json names the encoder and counts truncation."""
    from vdit.data.captions import CaptionEncoder
    from vdit.data.shards import decode_record, read_index, read_shard, shard_paths
    from vdit.io.hf_t5 import checkpoint_sha256

    _, shards = t5_shards
    index = read_index(shards)
    enc = index["text_encoder"]
    assert enc["kind"] == "t5" and enc["sha256"] == checkpoint_sha256(T5_FIXTURE)
    assert (enc["width"], enc["max_length"], enc["dtype"]) == (32, 64, "float32")
    assert index["captions_truncated"] == 1  # the one long caption of make_clips
    records = [decode_record(r) for p in shard_paths(shards, index) for r in read_shard(p)]
    encoder = CaptionEncoder(str(T5_FIXTURE), 64, "float32")
    emb, mask, ids, cut = encoder.embed([r.caption for r in records])
    assert cut == 1
    for rec, e, m, i in zip(records, emb, mask, ids, strict=True):
        n = int(m.sum())
        assert rec.text.shape == (n, 32) and rec.text.dtype == np.float32 and len(rec.tokens) == n
        np.testing.assert_array_equal(rec.tokens, i[:n])
        np.testing.assert_allclose(rec.text, e[:n], atol=1e-6)
    assert max(len(r.tokens) for r in records) == 64 > min(len(r.tokens) for r in records)
    # The empty caption (dropout, guidance) is the encoder's own output for "".
    from vdit.data.captions import null_caption

    null = null_caption(enc, 64, 32)
    empty, empty_mask = encoder.conditioning([""])
    np.testing.assert_array_equal(null["null_mask"], empty_mask[0])
    np.testing.assert_allclose(null["null_text"], empty[0] * empty_mask[0][:, None], atol=1e-6)
    assert null["null_mask"].sum() == 1  # "</s>"


def test_shards_of_another_text_encoder_are_refused(t5_shards, tmp_path):
    from vdit.data.captions import resolve_text

    d, _ = t5_shards
    other = json.loads(json.dumps(d))
    other["text"] = _text(checkpoint=str(UMT5_FIXTURE))
    with pytest.raises(ConfigError, match=r"(?s)umt5 \(SHA-256 .*t5_v11 \(SHA-256"):
        resolve_text(from_dict(other))
    words = json.loads(json.dumps(d))
    words["text"] = {"max_length": 32}  # the jointly trained word encoder
    with pytest.raises(ConfigError, match=r"text\.encoder 'transformer' .* hold t5 encoder"):
        resolve_text(from_dict(words))
    wide = json.loads(json.dumps(d))
    wide["text"] = _text(width=48, checkpoint="")
    with pytest.raises(ConfigError, match=r"text\.width: config 48, data\.shards .* 32"):
        resolve_text(from_dict(wide))
    # A precomputed run takes the encoder its shards name, with its checksum.
    plain = json.loads(json.dumps(d))
    plain["text"] = _text(checkpoint="")
    text = resolve_text(from_dict(plain)).text
    assert text.checkpoint == str(T5_FIXTURE.resolve()) and len(text.checkpoint_sha256) == 64


@pytest.mark.parametrize("mode", ["bucket", "pack"])
def test_precomputed_embeddings_give_the_in_step_encoders_loss(t5_shards, mode):
    """The same batch, params and key: text.encoder precomputed (f32 embeddings read from the
    shards) and t5 (the frozen encoder run in the loss on the stored token ids) agree within
    1e-5, caption dropout (to the empty caption) included; in packed rows too."""
    from vdit.data.captions import resolve_text
    from vdit.data.shard_pipeline import first_clips, shard_dataset
    from vdit.diffusion.text_to_video import TextToVideo

    d, shards = t5_shards
    d = json.loads(json.dumps(d))
    d["data"].update(batching=mode, pack_budget=432, pack_clips=3)
    systems, stats = {}, {}
    latents = first_clips(str(shards), 4, 64)["latent"]
    for route in ("precomputed", "t5"):
        d["text"] = _text(route)
        cfg = resolve_text(from_dict(d))
        systems[route] = TextToVideo(cfg)
        stats[route] = systems[route].initial_stats(latents)
    assert "text_encoder" in stats["t5"] and "text_encoder" not in stats["precomputed"]
    np.testing.assert_allclose(stats["t5"]["null_text"], stats["precomputed"]["null_text"])
    batch = next(iter(shard_dataset(str(shards), batch=2, caption_length=64, seed=0, mode=mode,
                                    budget=432, clips_per_row=3, embeddings=True)))
    if mode == "pack":  # rows of several clips: each caption must be encoded on its own
        assert (batch["text_segment_ids"].max(axis=1) >= 2).all()
    params = jax.jit(systems["t5"].init)(jax.random.key(0))["params"]
    # Random weights everywhere (at init the cross-attention's output is zero: text unseen).
    leaves, tree = jax.tree.flatten(nn.unbox(params))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape)
                             for p, k in zip(leaves, keys, strict=True)])
    # A key that drops some captions (to the empty one) and keeps others.
    rows = batch["tokens"].size // 64  # captions in the batch
    key = next(k for k in map(jax.random.key, range(100)) if 0 < int(jax.random.bernoulli(
        jax.random.split(k, 3)[0], 0.5, (rows,)).sum()) < rows)
    loss_pre, _ = jax.jit(systems["precomputed"].loss)(params, batch, stats["precomputed"], key)
    words = {k: v for k, v in batch.items() if k not in ("text", "text_mask")}
    loss_t5, _ = jax.jit(systems["t5"].loss)(params, words, stats["t5"], key)
    assert abs(float(loss_pre) - float(loss_t5)) <= 1e-5 * max(1.0, abs(float(loss_t5)))
    # The embeddings matter: other captions change the loss.
    shuffled = {**batch, "text": batch["text"][::-1], "text_mask": batch["text_mask"][::-1]}
    loss_other, _ = jax.jit(systems["precomputed"].loss)(params, shuffled,
                                                         stats["precomputed"], key)
    assert abs(float(loss_other) - float(loss_pre)) > 1e-4


def test_your_own_encoder_writes_shards_and_trains(tmp_path):
    """docs/real-data.md, "Bring your own encoder": shards written by a script with random
    latents and random 24-wide bf16 caption embeddings (no vdit encoder) train, packed."""
    from vdit.data.shards import ClipRecord, shard_name, write_index, write_shard
    from vdit.io.run_dir import run_config
    from vdit.train.loop import train
    from vdit.train.metrics import read_metrics

    rng = np.random.default_rng(0)
    out = tmp_path / "shards"
    records = []
    for i in range(8):
        n = int(rng.integers(1, 9))  # real caption tokens
        records.append(ClipRecord(
            latent=rng.normal(size=(4, 4, 4, 48)).astype(np.float32),
            tokens=np.zeros(n, np.int32), caption=f"clip {i}", source_id=f"mine/{i}", fps=8.0,
            original_size=(4, 16, 16), bucket=(4, 16, 16),
            text=rng.normal(size=(n, 24)).astype(ml_dtypes.bfloat16)))
    names = [shard_name(i, 2) for i in range(2)]
    for i, name in enumerate(names):
        write_shard(out, name, records[4 * i: 4 * i + 4])
    write_index(out, names, {"latent_dtype": "float32", "text_max_length": 8, "text_encoder": {
        "kind": "external", "name": "my-clip-text-encoder", "width": 24, "max_length": 8,
        "dtype": "bfloat16", "sha256": "0" * 64,
        "null_text": rng.normal(size=(1, 24)).astype(np.float32).tolist()}})
    d = tiny_dict(tmp_path / "run")
    d["model"]["depth"] = 1
    d["text"] = {"encoder": "precomputed", "width": 24, "max_length": 8}
    d["data"].update(source="shards", shards=str(out), batching="pack", pack_budget=40,
                     pack_clips=3)
    d["train"].update(steps=2, eval_every=100)
    train(from_dict(d), log=lambda s: None)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert run_config(tmp_path / "run").text.checkpoint_sha256 == "0" * 64


def test_cli_names_missing_caption_columns(tmp_path, capsys):
    from vdit.cli import main

    (tmp_path / "clips").mkdir()
    captions = tmp_path / "captions.csv"
    captions.write_text("file,text\na.mp4,a cat\n")
    code = main(["tokenize", str(tmp_path / "out"), "--videos", str(tmp_path / "clips"),
                 "--captions", str(captions)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("vdit tokenize: error: --captions:")
    assert "needs columns 'path' and 'caption', has ['file', 'text']" in err


@pytest.mark.parametrize("damage, named", [
    ("drop", r"model\.safetensors.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"),
    ("shape", r"model\.safetensors.*encoder\.final_layer_norm\.weight"),
    ("arch", r"config\.json: model_type: 'bert'"),
    ("tokenizer", r"no tokenizer"),
])
def test_cli_refuses_a_broken_text_checkpoint(tmp_path, capsys, damage, named):
    from safetensors.numpy import load_file, save_file

    from vdit.cli import main

    bad = tmp_path / "t5"
    shutil.copytree(T5_FIXTURE, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    if damage == "drop":
        del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    elif damage == "shape":
        tensors["encoder.final_layer_norm.weight"] = np.ones(7, np.float32)
    elif damage == "arch":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    else:
        (bad / "tokenizer.json").unlink()
    save_file(tensors, str(bad / "model.safetensors"))
    code = main(["tokenize", str(tmp_path / "out"), "--physics", "2", "--text-encoder",
                 str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("vdit tokenize: error:")
    assert re.search(named, err, re.S), err
