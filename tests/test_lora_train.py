"""LoRA training and `train.init_from` (issue 34) on tiny models, on the CPU:

(a) a planted adapter: a teacher is the frozen base plus a known rank-r change of its targeted
    kernels (built here by hand, not by vdit's merge); a rank-r LoRA trained by vdit's own
    train_step on the teacher's velocities drives the loss to ~0, recovers the change (s B A,
    compared as products: the factors are free up to an invertible r x r map) and leaves the
    base bit-identical;
(b) only the adapters are trained: they are the params, the EMA and all of the optimizer
    state; the base is bfloat16 in stats and, on an FSDP mesh, sharded as a full run's params;
(c) init_from: a run started from an export, a diffusers transformer or a pipeline holds the
    source's params at step 0 (optimizer and EMA fresh); a mismatched model is refused by key;
(d) a LoRA run (dropout on, started from an export) stopped and resumed is bit-identical to an
    uninterrupted one, although the source is deleted before the resume.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import tiny_dict
from flax import traverse_util
from state_checks import assert_states_equal, checkpoint_state, flat, perturbed
from wan_tool import TOOL

from vdit.config import ConfigError, from_dict, to_dict
from vdit.diffusion.lora_system import LoraTextToVideo
from vdit.models import lora
from vdit.train.state import TrainState, make_optimizer
from vdit.train.step import train_step

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "fixtures" / "wan_pipeline" / "wan21"
RANK, ALPHA = 2, 8.0  # scale 4: a LoRA that ignored alpha would be 4x off


def _wan_config(tmp: Path, **train):
    """The tiny Wan DiT of tests/test_wan_run.py (width 24, 2 heads, ffn 32)."""
    d = TOOL.run_config(tmp / "run", tmp / "no-shards")
    d["train"].update(train)
    return from_dict(d)


# --- (a) a planted adapter ----------------------------------------------------------------

class _Distill(LoraTextToVideo):
    """The LoRA system with a distillation loss: MSE to a teacher's velocities."""

    def loss(self, params, batch, stats, key, step=None):
        v = self.apply_dit(self.adapted(params, stats), batch["x"], batch["t"],
                           (batch["text"], batch["mask"]))
        return jnp.mean(jnp.square(v - batch["v"])), {}


def _flat_kernel(target: lora.Target, kernel) -> np.ndarray:
    n_in, n_out = target.dims()
    return np.asarray(kernel, np.float32).reshape(*target.lead, n_in, n_out)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Base: the Wan DiT's init, perturbed, in bf16. Planted: s A_p B_p (numpy) on both FFN
    kernels of both blocks (their products are identifiable from the velocities; attention's
    are only up to its symmetries: a head's V and O compose, q is seen within the keys' span).
    Trained: 1000 AdamW steps on 64 fixed inputs."""
    cfg = _wan_config(tmp_path_factory.mktemp("planted"), lr=1e-2, warmup_steps=0, steps=1000,
                      grad_clip=100.0,
                      lora={"rank": RANK, "alpha": ALPHA, "targets": r"ffn_(in|out)$"})
    system = _Distill(cfg)
    rng = np.random.default_rng(0)
    dit = nn.unbox(jax.jit(system.init_dit)(jax.random.key(0)))["params"]
    base = system.base_from(perturbed(dit, 0.1, seed=3))
    teacher = traverse_util.flatten_dict(jax.tree.map(lambda w: np.asarray(w, np.float32), base))
    deltas = {}
    for t in system.targets:
        n_in, n_out = t.dims()
        a = rng.standard_normal((*t.lead, n_in, RANK)) / np.sqrt(n_in)
        b = 0.1 * rng.standard_normal((*t.lead, RANK, n_out)) / np.sqrt(RANK)
        deltas[t.name] = (ALPHA / RANK) * (a @ b)
        key = (*t.path, "kernel")
        teacher[key] = (_flat_kernel(t, teacher[key]) + deltas[t.name]).reshape(t.shape)
    teacher = traverse_util.unflatten_dict(teacher)
    n = 64
    batch = {"x": rng.standard_normal((n, *system.latent_shape)),
             "t": rng.uniform(0.05, 0.95, n), "text": rng.standard_normal((n, 8, 16)),
             "mask": np.ones((n, 8), bool)}
    batch = {k: jnp.asarray(v, jnp.float32 if v.dtype != bool else bool) for k, v in batch.items()}
    batch["v"] = jax.jit(system.apply_dit)(teacher, batch["x"], batch["t"],
                                           (batch["text"], batch["mask"]))
    tx = make_optimizer(cfg.train)
    adapters = nn.unbox(system.init(jax.random.key(1)))["params"]
    state = TrainState(step=jnp.zeros((), jnp.int32), params=adapters, ema_params=adapters,
                       opt_state=tx.init(adapters), rng=jax.random.key_data(jax.random.key(2)),
                       stats={"base": base})
    base_before = flat(base)
    step = jax.jit(lambda s, b: train_step(s, b, system=system, tx=tx, cfg=cfg.train))
    losses = []
    for _ in range(cfg.train.steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return system, deltas, state, losses, base_before


def test_a_planted_adapter_is_learned_exactly(planted):
    system, deltas, state, losses, base_before = planted
    assert losses[0] > 1e-3  # the change matters
    assert losses[-1] < 1e-5 * losses[0], (losses[0], losses[-1])
    trained = lora.by_name(state.params)
    assert sorted(trained) == sorted(deltas) == ["blocks/ffn_in", "blocks/ffn_out"]
    for t in system.targets:
        a, b = (np.asarray(x) for x in lora.flat_layout(trained, [t])[t.name].values())
        got = (ALPHA / RANK) * (a @ b)
        err = np.linalg.norm(got - deltas[t.name]) / np.linalg.norm(deltas[t.name])
        assert err < 1e-2, (t.name, err)
    for name, value in flat(state.stats["base"]).items():  # the base never moved
        np.testing.assert_array_equal(value, base_before[name], err_msg=name)


def test_a_the_training_branch_equals_the_merged_model(planted):
    """What trains (the branch in each Linear) is what exports and samples (the adapters
    folded into the kernels, `lora.fold`)."""
    system, _, state, _, _ = planted
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, *system.latent_shape)), jnp.float32)
    t, text = jnp.asarray([0.3, 0.8]), jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
    caption = (text, jnp.ones((2, 8), bool))
    branch = system.apply_dit(system.adapted(state.params, state.stats), x, t, caption)
    merged = system.apply_dit(system.merged(state.params, state.stats), x, t, caption)
    base = system.apply_dit(jax.tree.map(lambda w: w.astype(jnp.float32), state.stats["base"]),
                            x, t, caption)
    np.testing.assert_allclose(branch, merged, atol=1e-5)
    assert np.abs(np.asarray(merged - base)).max() > 1e-2


# --- (b) only the adapters train ----------------------------------------------------------

def _tiny_lora(tmp: Path, **lora_keys) -> dict:
    d = tiny_dict(tmp / "run")
    d["train"]["lora"] = {"rank": 4, "alpha": 8.0, **lora_keys}
    return d


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.floating))


def test_b_only_the_adapters_are_trained_and_the_base_is_bf16(tmp_path):
    from vdit.train.state import count_params
    from vdit.train.trainer import build_trainer

    trainer = build_trainer(from_dict(_tiny_lora(tmp_path)))
    state = trainer.state
    names = sorted(lora.by_name(state.params))
    assert names == sorted(f"blocks/{m}" for m in ("self_attn/qkv", "self_attn/out",
                                                   "cross_attn/q", "cross_attn/kv",
                                                   "cross_attn/out", "mlp/fc1", "mlp/fc2"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert not any(np.asarray(ab["b"]).any() for ab in lora.by_name(state.params).values())
    base = state.stats["base"]
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
    full = build_trainer(from_dict(tiny_dict(tmp_path / "full"))).state
    assert count_params(base) == count_params(full.params)  # the whole DiT, frozen
    # Adam's two moments of the adapters, nothing of the base; the EMA is the adapters'.
    adapter_bytes = _nbytes(state.params)
    assert _nbytes(state.opt_state) == 2 * adapter_bytes
    assert _nbytes(state.ema_params) == adapter_bytes < _nbytes(base) / 4
    shapes = {x.shape for x in jax.tree.leaves(base)} - {x.shape for x in
                                                       jax.tree.leaves(state.params)}
    assert not shapes & {x.shape for x in jax.tree.leaves(state.opt_state)}


SHARDED = """
import jax, flax.linen as nn
from vdit.config import from_dict
from vdit.models import lora
from vdit.train.trainer import build_trainer
assert jax.device_count() == 2
cfg = {cfg}
full = build_trainer(from_dict({{**cfg, "train": {{**cfg["train"], "lora": {{}}}}}})).state
state = build_trainer(from_dict(cfg)).state
got = jax.tree.map(lambda x: x.sharding.spec, state.stats["base"])
want = jax.tree.map(lambda x: x.sharding.spec, full.params)
assert got == want, (got, want)
qkv = lora.by_name(state.params)["blocks/self_attn/qkv"]
assert qkv["a"].sharding.spec[1] == "fsdp", qkv["a"].sharding.spec  # [L, embed, r]
assert state.stats["base"]["blocks"]["self_attn"]["qkv"]["kernel"].sharding.spec[1] == "fsdp"
print("sharded ok")
"""


def test_b_the_base_is_sharded_like_a_full_runs_params(tmp_path):
    d = _tiny_lora(tmp_path)
    d["mesh"] = {"fsdp": 2, "rules": "fsdp"}
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", SHARDED.format(cfg=repr(d))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "sharded ok" in out.stdout, out.stderr[-3000:]


def test_lora_config_errors_name_the_key(tmp_path):
    for keys, message in (({"rank": -1}, "train.lora.rank: must be >= 0"),
                          ({"dropout": 1.0}, "train.lora.dropout: must be in [0, 1)"),
                          ({"targets": "("}, "train.lora.targets: '(' is not a regular")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            from_dict(_tiny_lora(tmp_path, **keys))
    with pytest.raises(ConfigError, match=r"train\.lora\.targets: .*match no module; the "
                       r"modules are: .*blocks/self_attn/qkv"):
        LoraTextToVideo(from_dict(_tiny_lora(tmp_path, targets="attn1/to_q")))


# --- (c) init_from ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict]:
    """A safetensors export (`vdit export --to safetensors`'s format) of a TINY DiT with
    perturbed params, so every layer (and every adapter on it) reaches the loss."""
    from vdit.data.pipeline import fixed_batch
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.io.safetensors_io import write_export

    tmp = tmp_path_factory.mktemp("source")
    cfg = from_dict(tiny_dict(tmp / "src"))
    system = TextToVideo(cfg)
    params = jax.device_get(perturbed(nn.unbox(jax.jit(system.init)(jax.random.key(5)))
                                      ["params"], 0.1, seed=9))
    videos = fixed_batch(cfg.data, system.tokenizer, "train", cfg.data.stats_clips)["video"]
    stats = jax.device_get(system.initial_stats(videos))
    out = write_export(tmp / "export", {"params": params, "stats": stats},
                       {"kind": "dit", "config": to_dict(cfg), "step": 7})
    return out, params


def test_c_a_run_from_an_export_starts_at_its_params(source, tmp_path):
    from vdit.train.trainer import build_trainer

    export, params = source
    d = tiny_dict(tmp_path / "run")
    d["train"]["init_from"] = str(export)
    trainer = build_trainer(from_dict(d))
    state = trainer.state
    assert int(state.step) == 0
    want = flat(params)
    for part in (state.params, state.ema_params):
        got = flat(part)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert not any(np.asarray(x).any() for x in jax.tree.leaves(state.opt_state)
                   if jnp.issubdtype(x.dtype, jnp.floating))  # fresh Adam moments
    record = trainer.init_record
    sums = json.loads((export / "config.json").read_text())["sha256"]
    assert record["kind"] == "export" and record["step"] == 7
    assert record["sha256"] == sums["model.safetensors"]

    # A LoRA run takes them as its frozen base, in bf16.
    d["train"]["lora"] = {"rank": 2}
    base = build_trainer(from_dict(d)).state.stats["base"]
    for k, v in flat(base).items():
        np.testing.assert_array_equal(v, want[k].astype(jnp.bfloat16), err_msg=k)


def test_c_a_mismatched_model_is_refused_naming_the_keys(source, tmp_path):
    from vdit.train.trainer import build_trainer

    d = tiny_dict(tmp_path / "run")
    d["train"]["init_from"] = str(source[0])
    d["model"].update(depth=3, width=48, heads=3)
    with pytest.raises(ConfigError, match=r"does not match the config:\n  model\.depth: config "
                       r"3, checkpoint 2\n  model\.ffn_dim: config 192, checkpoint 128\n  "
                       r"model\.heads: config 3, checkpoint 2\n  model\.width: config 48, "
                       r"checkpoint 32$"):
        build_trainer(from_dict(d))
    d = tiny_dict(tmp_path / "run")
    d["train"]["init_from"] = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"train\.init_from: .*nothing does not exist"):
        build_trainer(from_dict(d))


def test_c_diffusers_transformer_and_pipeline_folders(tmp_path):
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.io.hf_folder import folder_sha256
    from vdit.io.wan_transformer import WEIGHTS, load_params
    from vdit.train.init_from import load_source
    from vdit.train.trainer import mesh_and_rules

    _, want = load_params(PIPELINE / "transformer", log=lambda *a, **k: None)
    want = flat(want)
    for path, kind in ((PIPELINE, "pipeline"), (PIPELINE / "transformer", "diffusers")):
        cfg = _wan_config(tmp_path, init_from=str(path))
        cfg = from_dict({**to_dict(cfg), "model": {**to_dict(cfg)["model"], "depth": 1}})
        mesh, rules = mesh_and_rules(cfg)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            params, record = load_source(cfg, TextToVideo(cfg), mesh, rules,
                                         log=lambda *a, **k: None)
        got = flat(params)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want)
        assert record["kind"] == kind
        assert record["sha256"] == {"transformer": folder_sha256(PIPELINE / "transformer",
                                                                 WEIGHTS)}
    cfg = _wan_config(tmp_path, init_from=str(PIPELINE))  # depth 2 against the folder's 1
    mesh, rules = mesh_and_rules(cfg)
    with (pytest.raises(ConfigError, match=r"transformer does not match the config:\n  "
                        r"model\.depth: config 2, checkpoint 1$"),
          jax.set_mesh(mesh), nn.logical_axis_rules(rules)):
        load_source(cfg, TextToVideo(cfg), mesh, rules)


# --- (d) exact resume ---------------------------------------------------------------------

def _train(config: Path) -> str:
    import contextlib
    import io

    from vdit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(config)]) == 0
    return out.getvalue()


def test_d_a_lora_run_resumes_bit_identically_without_its_source(source, tmp_path):
    import shutil

    from test_wan_run import _losses, _preempted_after

    export = tmp_path / "export"
    shutil.copytree(source[0], export)
    configs = {}
    for name in ("straight", "resumed"):
        d = _tiny_lora(tmp_path, dropout=0.1)
        d["train"].update(run_dir=str(tmp_path / name), init_from=str(export), lr=1e-3,
                          warmup_steps=0, async_checkpoint=True, eval_every=2)
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(d))
    _train(configs["straight"])
    with _preempted_after(1):  # stops after step 2, saved
        log = _train(configs["resumed"])
    assert "stopped at step 2, checkpoint saved" in log, log
    record = json.loads((tmp_path / "resumed" / "init_from.json").read_text())
    assert record["sha256"] == json.loads((export / "config.json").read_text())["sha256"][
        "model.safetensors"]
    shutil.rmtree(export)  # a resume reads its checkpoint, never init_from
    log = _train(configs["resumed"])
    assert "resumed" in log and "init_from:" not in log, log
    want = checkpoint_state(tmp_path / "straight")
    assert_states_equal(checkpoint_state(tmp_path / "resumed"), want, what="resumed LoRA run")
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    moved = [k for k, v in want["params"].items() if k.endswith("/b") and np.abs(v).max() > 0]
    assert len(moved) == 7, moved  # every adapter trained
