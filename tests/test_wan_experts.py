"""Wan 2.2's two experts (`train.expert`, vdit/diffusion/experts.py): t stays in each expert's
range (a property over many draws) with the full run's density there; `both` routes each
sample's loss to the expert of its t (each expert's gradient comes from its own rows only) and
samples with the expert of each step; the boundary comes from the config, the init_from
pipeline or 0.875; and a trained `both` run exports as transformer/ + transformer_2/ with the
boundary in model_index.json, a WanPipeline folder that resolve_pipeline accepts (a one-expert
run takes the other expert from a two-expert --pipeline)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from state_checks import checkpoint_state, perturbed
from wan_tool import TOOL

from vdit.config import ConfigError, DiffusionConfig, from_dict
from vdit.diffusion import experts
from vdit.diffusion.flow import sample_time

ROOT = Path(__file__).resolve().parents[1]
WAN22 = ROOT / "tests" / "fixtures" / "wan_pipeline" / "wan22"


# --- t per expert ----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(shift=st.floats(1.0, 16.0), boundary=st.floats(0.02, 0.98),
       t_mean=st.floats(-1.0, 1.0), t_std=st.floats(0.3, 2.0), seed=st.integers(0, 2 ** 31))
def test_expert_times_stay_in_their_range(shift, boundary, t_mean, t_std, seed):
    cfg = DiffusionConfig(t_mean=t_mean, t_std=t_std)
    for expert in experts.EXPERTS:
        t = np.asarray(sample_time(jax.random.key(seed), 4096, cfg, shift,
                                   experts.t_range(expert, boundary)))
        high = np.asarray(experts.is_high(jnp.asarray(t), boundary))
        assert t.dtype == np.float32 and np.isfinite(t).all()
        if expert == "high":
            assert high.all() and t.max() <= 1.0, (t.min(), boundary)
        else:
            assert not high.any() and t.min() >= 0.0, (t.max(), boundary)


@pytest.mark.parametrize("shift,boundary", [(1.0, 0.9), (3.0, 0.875), (12.0, 0.875),
                                            (5.0, 0.3)])
def test_expert_times_follow_the_full_distribution_within_their_range(shift, boundary):
    """Conditioned, not clipped: two-sample Kolmogorov-Smirnov against the full-range draws
    that fall in the range (1 % level)."""
    cfg = DiffusionConfig()
    full = np.asarray(sample_time(jax.random.key(0), 400_000, cfg, shift))
    for expert in experts.EXPERTS:
        t = np.sort(np.asarray(sample_time(jax.random.key(1), 100_000, cfg, shift,
                                           experts.t_range(expert, boundary))))
        ref = np.sort(full[(full >= np.float32(boundary)) == (expert == "high")])
        grid = np.concatenate([t, ref])
        ks = np.abs(np.searchsorted(t, grid, "right") / len(t)
                    - np.searchsorted(ref, grid, "right") / len(ref)).max()
        assert ks < 1.63 * np.sqrt(1 / len(t) + 1 / len(ref)), (expert, ks, len(ref))


# --- a tiny both-experts system --------------------------------------------------------------

def _cfg(**train) -> object:
    return from_dict({
        "model": {"kind": "wan", "width": 16, "depth": 1, "heads": 2, "ffn_dim": 16,
                  "freq_dim": 8, "patch": [1, 2, 2]},
        "text": {"encoder": "precomputed", "width": 8, "max_length": 4},
        "autoencoder": {"kind": "space_to_depth", "factors": [1, 2, 2]},
        "data": {"world": {"frames": 2, "height": 8, "width": 8}, "source": "shards",
                 "shards": "unused"},
        "diffusion": {"caption_dropout": 0.0, "shift": 3.0, "eval_timesteps": [0.3, 0.9]},
        "train": {"expert": "both", "batch_size": 4, "boundary_ratio": 0.5, **train}})


def _system():
    import flax.linen as nn

    from vdit.diffusion.text_to_video import TextToVideo

    system = TextToVideo(_cfg())
    params = perturbed(nn.unbox(system.init(jax.random.key(0)))["params"])
    latent = jax.random.normal(jax.random.key(1), (4, *system.latent_shape))
    text = jax.random.normal(jax.random.key(2), (4, 4, 8))
    batch = {"latent": latent, "text": text, "text_mask": jnp.ones((4, 4), jnp.int32)}
    c = system.latent_shape[-1]
    stats = {"mean": jnp.zeros(c), "std": jnp.ones(c), "autoencoder": {},
             "null_text": jnp.zeros((4, 8)), "null_mask": jnp.zeros(4, jnp.int32)}
    return system, params, batch, stats


def test_both_routes_each_samples_loss_to_the_expert_of_its_t(monkeypatch):
    system, params, batch, stats = _system()
    assert set(params) == {"high", "low"}
    seen = []
    flow_loss = type(system).flow_loss

    def recording(self, p, x0, noise, t, tokens):
        seen.append(("high" if p is params["high"] else "low", np.asarray(t),
                     np.asarray(x0)))
        return flow_loss(self, p, x0, noise, t, tokens)

    monkeypatch.setattr(type(system), "flow_loss", recording)
    loss, aux = system.loss(params, batch, stats, jax.random.key(5))
    assert [s[0] for s in seen] == ["high", "low"]
    for name, t, x0 in seen:  # each expert: its rows (0, 2 / 1, 3), its range of t
        assert (t >= 0.5).all() if name == "high" else (t < 0.5).all()
        rows = [0, 2] if name == "high" else [1, 3]
        np.testing.assert_array_equal(x0, np.asarray(batch["latent"])[rows])
    np.testing.assert_allclose(loss, (aux["loss_high"] + aux["loss_low"]) / 2, rtol=1e-6)
    monkeypatch.undo()

    def grads(b):
        return jax.grad(lambda p: system.loss(p, b, stats, jax.random.key(5))[0])(params)

    base = grads(batch)
    for expert, rows in (("high", [0, 2]), ("low", [1, 3])):
        assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(base[expert])
                   if g.size > 1), expert
        moved = dict(batch, latent=batch["latent"].at[jnp.asarray(rows)].multiply(-2.0))
        other = "low" if expert == "high" else "high"
        g = grads(moved)
        jax.tree.map(np.testing.assert_array_equal, g[other], base[other])  # untouched
        assert any(not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(g[expert]), jax.tree.leaves(base[expert]), strict=True)), expert


def test_both_evaluates_each_timestep_with_its_expert():
    system, params, batch, stats = _system()
    got = np.asarray(system.eval_losses(params, batch, stats, jax.random.key(4)))
    x0 = system.batch_latent(batch, stats)
    noise = jax.random.normal(jax.random.key(4), x0.shape)
    text = system.batch_text(batch, stats)
    for i, (t, expert) in enumerate(((0.3, "low"), (0.9, "high"))):
        want = system.flow_loss(params[expert], x0, noise, jnp.full((4,), t), text).mean()
        np.testing.assert_allclose(got[i], want, rtol=1e-6)


def test_sampling_a_both_run_runs_the_expert_of_each_step():
    """generate's latent = Euler steps taken by hand, each with the expert of its t."""
    from vdit.diffusion.schedulers import vdit_schedule

    system, params, batch, stats = _system()
    text = (batch["text"][:1], batch["text_mask"][:1] > 0)
    uncond = system.null_text(text, stats)
    key = jax.random.key(9)
    video = np.asarray(jax.jit(lambda p, k: system.generate(
        p, text, stats, k, steps=6, guidance=2.0, method="euler"))(params, key))
    x = jax.random.normal(key, (1, *system.latent_shape))
    schedule = vdit_schedule("euler", 6, system.shift)
    used = []
    for sigma, sigma_next in zip(schedule.sigmas[:-1], schedule.sigmas[1:], strict=True):
        expert = experts.expert_at(float(sigma), 0.5)
        used.append(expert)
        t = jnp.full((1,), sigma)
        cond = system.apply_dit(params[expert], x, t, text)
        v = system.apply_dit(params[expert], x, t, uncond)
        x = x + (sigma_next - sigma) * (v + 2.0 * (cond - v))
    assert "high" in used and "low" in used
    want = np.asarray(system.decode(x, stats))
    assert np.abs(video.astype(int) - want.astype(int)).max() <= 1


# --- config and boundary -----------------------------------------------------------------------

def _pipeline_variant(tmp: Path, *, boundary=None, one_transformer=False) -> Path:
    """A copy of the wan22 fixture (its parts symlinked) with another model_index.json."""
    out = tmp / f"wan22-{boundary}-{one_transformer}"
    out.mkdir()
    for part in WAN22.iterdir():
        if part.is_dir() and not (one_transformer and part.name == "transformer_2"):
            (out / part.name).symlink_to(part)
    index = json.loads((WAN22 / "model_index.json").read_text())
    if boundary is not None:
        index["boundary_ratio"] = boundary
    if one_transformer:
        index.update(transformer_2=[None, None], boundary_ratio=None)
    (out / "model_index.json").write_text(json.dumps(index))
    return out


def test_boundary_from_config_then_init_from_pipeline_then_default(tmp_path):
    pipe = _pipeline_variant(tmp_path, boundary=0.9)
    assert experts.boundary_of(_cfg(boundary_ratio=None)) == 0.875
    assert experts.boundary_of(_cfg(boundary_ratio=None, init_from=str(pipe))) == 0.9
    assert experts.boundary_of(_cfg(boundary_ratio=0.7, init_from=str(pipe))) == 0.7
    resolved = experts.resolve_experts(_cfg(boundary_ratio=None, init_from=str(pipe)))
    assert resolved.train.boundary_ratio == 0.9
    none = _cfg(expert="none", boundary_ratio=None)
    assert experts.resolve_experts(none) is none


def test_expert_settings_are_checked_by_key():
    with pytest.raises(ConfigError, match=r"train\.expert: 'both' trains each expert on half"):
        _cfg(batch_size=6, microbatches=2)
    with pytest.raises(ConfigError, match=r"train\.boundary_ratio: must be in \(0, 1\)"):
        _cfg(boundary_ratio=1.0)
    with pytest.raises(ConfigError, match=r"train\.expert.*one of"):
        _cfg(expert="middle")
    from vdit.diffusion.text_to_video import TextToVideo

    with pytest.raises(ConfigError, match=r"diffusion\.eval_timesteps: none of \[0\.3\]"):
        TextToVideo(dataclasses.replace(_cfg(expert="high"), diffusion=DiffusionConfig(
            eval_timesteps=(0.3,))))


# --- a trained both run: sample and export -------------------------------------------------------

def _run_config(tmp: Path, name: str, shards: Path, **train) -> Path:
    """The tiny wan run on the wan22 fixture's parts and transformer architecture."""
    from vdit.io.wan_transformer import read_spec

    d = TOOL.run_config(tmp / name, shards)
    d["model"] = dataclasses.asdict(read_spec(WAN22 / "transformer").model)
    d["autoencoder"]["checkpoint"] = str(WAN22 / "vae")
    d["text"]["max_length"] = 512
    d["diffusion"]["eval_timesteps"] = [0.5, 0.9]
    d["train"].update(steps=2, checkpoint_every=2, eval_every=2, **train)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _quiet(*argv: str) -> str:
    from vdit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0, argv
    return out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tmp, both run trained 2 steps from a fresh init, boundary from the default; high run
    trained 2 steps from wan22's transformer/ (train.init_from), boundary from wan22): 4
    physics clips tokenized with `--pipeline` wan22."""
    tmp = tmp_path_factory.mktemp("wan_experts")
    shards = tmp / "shards"
    both = _run_config(tmp, "both", shards, expert="both")
    _quiet("tokenize", str(shards), str(both), "--physics", "4", "--pipeline", str(WAN22),
           "--shard-size", "4")
    _quiet("train", str(both))
    high = _run_config(tmp, "high", shards, expert="high", init_from=str(WAN22))
    _quiet("train", str(high))
    return tmp, tmp / "both", tmp / "high"


def test_both_run_trains_both_experts_and_names_its_boundary(runs):
    from vdit.io.run_dir import run_config
    from vdit.train.metrics import read_metrics

    _, both, _ = runs
    cfg = run_config(both)
    assert (cfg.train.expert, cfg.train.boundary_ratio) == ("both", 0.875)
    state = checkpoint_state(both, 2)
    for expert in experts.EXPERTS:  # Adam's first moments: each expert had gradients
        mu = [v for k, v in state["opt_state"].items() if f"mu/{expert}/" in k]
        assert mu and any(np.abs(v).max() > 0 for v in mu), expert
    rows = [r for r in read_metrics(both / "metrics.jsonl") if "loss" in r]
    assert rows and all("loss_high" in r and "loss_low" in r for r in rows)


def test_vdit_sample_a_both_run(runs, capsys):
    tmp, both, _ = runs
    capsys.readouterr()
    _quiet("sample", str(both), "--prompt", "a ball", "--out", str(tmp / "samples-both"))
    assert len(list((tmp / "samples-both").glob("*.mp4"))) == 1


def test_export_both_run_writes_both_experts_and_a_whole_pipeline(runs):
    from vdit.io import wan_transformer as wt
    from vdit.io.wan_pipeline import resolve_pipeline

    tmp, both, _ = runs
    state = checkpoint_state(both)
    _quiet("export", str(both), "--to", "diffusers", "--out", str(tmp / "both-export"))
    for expert, folder in experts.FOLDERS.items():
        _, params = wt.load_params(tmp / "both-export" / folder, log=lambda *_, **__: None)
        got = {"/".join(k): np.asarray(v) for k, v in _flat(params).items()}
        want = {k.split("/", 1)[1]: v for k, v in state["ema_params"].items()
                if k.startswith(f"{expert}/")}
        assert got.keys() == want.keys()
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{folder}/{k}")
    info = json.loads((tmp / "both-export" / "vdit_export.json").read_text())
    assert (info["expert"], info["boundary_ratio"]) == ("both", 0.875)
    # Into a one-transformer pipeline of the same parts: model_index names both experts.
    single = _pipeline_variant(tmp, one_transformer=True)
    out = tmp / "both-pipeline"
    _quiet("export", str(both), "--to", "diffusers", "--pipeline", str(single), "--out", str(out))
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert index["boundary_ratio"] == 0.875
    spec = resolve_pipeline(out)
    assert spec.transformer_2 is not None and spec.boundary_ratio == 0.875
    assert [f.name for f in spec.expert_folders()] == ["transformer", "transformer_2"]


def _flat(tree) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)


def test_high_run_samples_and_exports_with_the_pipelines_low_expert(runs, capsys):
    from vdit.cli import main
    from vdit.io.run_dir import run_config
    from vdit.io.wan_pipeline import resolve_pipeline

    tmp, _, high = runs
    assert run_config(high).train.boundary_ratio == 0.875  # wan22's, written by vdit train
    record = json.loads((high / "init_from.json").read_text())  # the high expert came from
    assert record["folders"] == {"transformer": str((WAN22 / "transformer").resolve())}
    log = _quiet("sample", str(high), "--prompt", "a ball", "--out", str(tmp / "samples-high"))
    assert f"{WAN22 / 'transformer_2'} for the other range" in log
    assert len(list((tmp / "samples-high").glob("*.mp4"))) == 1
    out = tmp / "high-pipeline"
    _quiet("export", str(high), "--to", "diffusers", "--pipeline", str(WAN22), "--out", str(out))
    for f in (WAN22 / "transformer_2").iterdir():
        assert (out / "transformer_2" / f.name).read_bytes() == f.read_bytes()
    spec = resolve_pipeline(out)
    assert spec.boundary_ratio == 0.875 and spec.transformer_2 is not None
    info = json.loads((out / "vdit_export.json").read_text())
    assert info["transformers"] == {"transformer": "run", "transformer_2": "pipeline"}
    # A one-transformer pipeline has no expert for the low range: refused, naming it.
    capsys.readouterr()
    single = _pipeline_variant(tmp, boundary=None, one_transformer=True) if not (
        tmp / "wan22-None-True").exists() else tmp / "wan22-None-True"
    assert main(["export", str(high), "--to", "diffusers", "--pipeline", str(single),
                 "--out", str(tmp / "refused")]) == 2
    err = capsys.readouterr().err
    assert "high-noise expert" in err and "one transformer" in err, err
