"""`vdit tokenize --pipeline PATH` (issue 34): a WanPipeline folder's own VAE and UMT5 in one
flag, captions recorded at text.max_length 512 as the pipeline pads them; buckets that do not
fit its VAE and patch refused by name; and a run on the stored embeddings (real tokens only,
zero-padded by the reader) has the loss of the pipeline's 512-token text fed to the
transformer directly, as WanPipeline feeds it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from wan_tool import TOOL

from vdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "fixtures" / "wan_pipeline" / "wan21"
TI2V = ROOT / "tests" / "fixtures" / "wan_ti2v"


def _config(tmp: Path, shards: Path) -> Path:
    """The tiny wan run's config (tools/make_wan_export_sample.py), its text.max_length 8."""
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(TOOL.run_config(tmp / "run", shards)))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(tmp, shards by --pipeline, shards by --text-encoder + autoencoder overrides): 4
    physics clips (5 x 32 x 32) each way."""
    tmp = tmp_path_factory.mktemp("tokenize_pipeline")
    config = _config(tmp, tmp / "unused")
    assert main(["tokenize", str(tmp / "pipeline"), str(config), "--physics", "4",
                 "--pipeline", str(PIPELINE), "--shard-size", "2"]) == 0
    assert main(["tokenize", str(tmp / "flags"), str(config),
                 f"autoencoder.checkpoint={PIPELINE / 'vae'}", "text.max_length=512",
                 "--physics", "4", "--text-encoder", str(PIPELINE / "text_encoder"),
                 "--shard-size", "2"]) == 0
    return tmp, tmp / "pipeline", tmp / "flags"


def test_pipeline_flag_records_its_vae_umt5_and_512_tokens(shards):
    from vdit.io.hf_t5 import checkpoint_sha256

    _, by_pipeline, _ = shards
    index = json.loads((by_pipeline / "index.json").read_text())
    assert index["autoencoder"] == {"kind": "wan", "factors": [4, 8, 8], "latent_channels": 4,
                                    "checkpoint": str(PIPELINE / "vae")}
    text = index["text_encoder"]
    assert text["max_length"] == 512 == index["text_max_length"]
    assert text["sha256"] == checkpoint_sha256(PIPELINE / "text_encoder") and text["width"] == 16
    assert index["pipeline"] == {"path": str(PIPELINE.resolve()), "boundary_ratio": None,
                                 "experts": 1, "vae_factors": [4, 8, 8], "patch": [1, 2, 2]}
    settings = json.loads((by_pipeline / "tokenize.json").read_text())
    assert settings["pipeline"] == str(PIPELINE.resolve())


def test_pipeline_flag_writes_what_the_separate_flags_write(shards):
    """--pipeline PATH = --text-encoder PATH/text_encoder + autoencoder.kind wan on PATH/vae
    (+ text.max_length 512): the same records, latents and embeddings bit for bit."""
    from vdit.data.shard_pipeline import first_clips

    _, by_pipeline, by_flags = shards
    a, b = (first_clips(str(d), 4, 512, embeddings=True) for d in (by_pipeline, by_flags))
    assert a.keys() == b.keys() and len(a["latent"]) == 4
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_training_normalises_with_the_pipelines_latent_statistics(shards):
    from vdit.config import from_dict
    from vdit.diffusion.text_to_video import TextToVideo

    tmp, by_pipeline, _ = shards
    d = TOOL.run_config(tmp / "stats", by_pipeline)
    d["text"]["max_length"] = 512
    stats = TextToVideo(from_dict(d)).initial_stats(np.zeros((1,), np.float32))
    vae = json.loads((PIPELINE / "vae" / "config.json").read_text())
    np.testing.assert_array_equal(stats["mean"], np.float32(vae["latents_mean"]))
    np.testing.assert_array_equal(stats["std"], np.float32(vae["latents_std"]))


@pytest.mark.parametrize("pipeline,bad,good,rule", [
    (PIPELINE, ["5x24x32", "6x32x32", "5x32x40"], "5x32x32,1x16x48",
     "not a multiple of 16 (VAE 8 x patch 2)"),
    (TI2V, ["5x16x32", "5x32x48"], "5x32x64,9x64x32", "not a multiple of 32 (VAE 16 x patch 2)"),
])
def test_buckets_that_do_not_fit_the_pipeline_are_refused_by_name(tmp_path, capsys, pipeline,
                                                                  bad, good, rule):
    config = _config(tmp_path, tmp_path / "unused")
    out = tmp_path / "shards"
    code = main(["tokenize", str(out), str(config), "--physics", "2", "--pipeline",
                 str(pipeline), "--buckets", ",".join([*bad, good])])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and rule in err, err
    for b in bad:
        assert f"\n  {b}: " in err, (b, err)
    for b in good.split(","):
        assert b not in err
    assert "6x32x32: 6 frames are not 1 + 4k" in err or pipeline == TI2V
    assert not (out / "index.json").exists()


def test_pipeline_and_text_encoder_flags_are_exclusive(tmp_path, capsys):
    config = _config(tmp_path, tmp_path / "unused")
    assert main(["tokenize", str(tmp_path / "s"), str(config), "--physics", "1", "--pipeline",
                 str(PIPELINE), "--text-encoder", str(PIPELINE / "text_encoder")]) == 2
    assert "drop --text-encoder" in capsys.readouterr().err


def test_stored_embeddings_give_the_loss_of_the_pipelines_512_token_text(shards):
    """The run side: the shards' embeddings (real tokens), padded to text.max_length 512 by the
    reader, through `TextToVideo.flow_loss` (t in [0, 1], embeddings and mask). The pipeline
    side: its UMT5 on the same captions at 512 tokens, zero past the real ones
    (sample/pipeline.py as WanPipeline), into the pipeline's transformer with timestep 1000 t
    and no mask. Same params, latents, noise and t: the same loss. The padding length is part
    of the computation (the transformer attends to the zeros), so 8 tokens would differ."""
    from vdit.config import from_dict
    from vdit.data.captions import CaptionEncoder
    from vdit.data.shard_pipeline import first_clips
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.io.wan_transformer import load_params
    from vdit.models.wan_dit import WanDiT

    tmp, by_pipeline, _ = shards
    spec, params = load_params(PIPELINE / "transformer")
    d = TOOL.run_config(tmp / "parity", by_pipeline)
    d["model"] = {k: v for k, v in dataclasses.asdict(spec.model).items()}
    d["text"]["max_length"] = 512
    cfg = from_dict(d)
    system = TextToVideo(cfg)
    stats = system.initial_stats(np.zeros((1,), np.float32))
    clips = first_clips(str(by_pipeline), 4, 512, embeddings=True)
    x0 = system.batch_latent({"latent": jnp.asarray(clips["latent"])}, stats)
    noise = jax.random.normal(jax.random.key(3), x0.shape)
    t = jnp.asarray([0.1, 0.4, 0.7, 0.95], jnp.float32)
    text = system.batch_text({k: jnp.asarray(clips[k]) for k in ("text", "text_mask")}, stats)
    run_loss = np.asarray(system.flow_loss(params, x0, noise, t, text))

    from vdit.data.shards import read_index

    captions = [r.caption for r in _records(by_pipeline)]
    assert len(captions) == 4 and read_index(str(by_pipeline))["text_encoder"]["dtype"] == \
        cfg.text.dtype
    encoder = CaptionEncoder(str(PIPELINE / "text_encoder"), 512, cfg.text.dtype)
    emb, mask, ids, _ = encoder.embed(captions)
    np.testing.assert_array_equal(ids * mask, clips["tokens"])  # the same captions, in order
    assert emb.shape == (4, 512, 16) and 0 < mask.sum() < 4 * 32  # short captions, long padding
    module = WanDiT(spec.model, dataclasses.replace(cfg.text, encoder="precomputed"),
                    latent_shape=(0, 0, 0, spec.in_channels), time_scale=1.0)

    def pipeline_loss(embeddings):
        v = module.apply({"params": params}, (1 - t[:, None, None, None, None]) * x0
                         + t[:, None, None, None, None] * noise, 1000 * t,
                         jnp.asarray(embeddings, jnp.float32))
        return np.asarray(jnp.square(v - (noise - x0)).reshape(4, -1).mean(1))

    want = pipeline_loss(emb)
    np.testing.assert_allclose(run_loss, want, rtol=1e-6)
    short = pipeline_loss(emb[:, :8])  # the same captions padded to 8 tokens only
    assert np.abs(short - want).max() > 100 * np.abs(run_loss - want).max() + 1e-6


def _records(directory: Path) -> list:
    """The records of a shard folder, in index order (captions and all)."""
    import grain

    from vdit.data.shards import decode_record, read_index, shard_paths

    index = read_index(str(directory))
    source = grain.sources.ArrayRecordDataSource(shard_paths(str(directory), index))
    return [decode_record(source[i]) for i in range(len(source))]
