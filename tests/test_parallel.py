"""Parallel layouts, gradient accumulation, multi-slice meshes and multi-host training.

Multi-device checks run in fresh processes (the CPU device count is fixed at JAX start-up):
tests/parallel_layouts.py on 8 fake devices, and two `vdit train` processes of 4 devices each
joined by `jax.distributed`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from conftest import tiny_dict
from state_checks import (
    ACROSS_LAYOUTS,
    LIVE_TRAIN,
    assert_every_parameter_reached_the_loss,
    assert_states_equal,
    checkpoint_state,
    load_state,
)

from vdit.config import ConfigError, MeshConfig, TrainConfig, from_dict
from vdit.parallel.distributed import DistributedError, cluster_from_env
from vdit.parallel.mesh import axis_sizes
from vdit.train.metrics import read_metrics
from vdit.train.state import TrainState
from vdit.train.step import train_step

TESTS = Path(__file__).resolve().parent


def _env(devices: int, **extra: str) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={devices}", **extra}


def test_every_layout_gives_the_single_device_state_on_8_devices(tmp_path):
    """3 steps from perturbed parameters at the full learning rate (tests/state_checks.py):
    every layout's losses, params, Adam moments and EMA equal one device's within float32
    reduction-order noise, and every parameter had a gradient (attention, MLP, cross-attention
    and the text encoder all reach the loss)."""
    out = subprocess.run([sys.executable, str(TESTS / "parallel_layouts.py"), str(tmp_path)],
                         env=_env(8), capture_output=True, text=True, timeout=600)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    states = {name: load_state(tmp_path / f"{name}.npz") for name in result}
    reference = states["single"]
    assert_every_parameter_reached_the_loss(reference)
    assert int(reference["step"][""]) == 3
    for name in ("dp", "fsdp", "fsdp_tp", "context", "multislice"):
        np.testing.assert_allclose(result[name], result["single"], rtol=0, atol=1e-5,
                                   err_msg=name)
        assert_states_equal(states[name], reference, tolerances=ACROSS_LAYOUTS, what=name)
    # Accumulating 2 micro-batches: the same on 1 device as on a 4-way sharded batch, and close
    # to (not equal to: each micro-batch draws its own noise) the whole-batch loss.
    np.testing.assert_allclose(result["dp_micro2"], result["single_micro2"], atol=1e-5)
    assert_states_equal(states["dp_micro2"], states["single_micro2"], tolerances=ACROSS_LAYOUTS,
                        what="dp_micro2")
    np.testing.assert_allclose(result["single_micro2"], result["single"], rtol=0.05)


class _LeastSquares:
    """A deterministic system (its loss ignores the key): accumulation must then be exact."""

    kind, primary_metric = "toy", ("loss", "", "lower")

    def loss(self, params, batch, stats, key, step):
        err = batch["x"] @ params["w"] - batch["y"]
        return jnp.mean(err ** 2), {"err": jnp.mean(jnp.abs(err))}


def test_gradient_accumulation_equals_the_whole_batch_update():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    outputs = []
    for micro in (1, 2, 4):
        cfg = TrainConfig(lr=0.1, warmup_steps=0, steps=10, microbatches=micro)
        tx = optax.sgd(0.1)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                           opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)),
                           stats={})
        new, metrics = jax.jit(lambda s, b, c=cfg, t=tx: train_step(
            s, b, system=_LeastSquares(), tx=t, cfg=c))(state, batch)
        outputs.append((new.params["w"], metrics["loss"], metrics["err"]))
    for w, loss, err in outputs[1:]:
        np.testing.assert_allclose(w, outputs[0][0], atol=1e-6)
        np.testing.assert_allclose(loss, outputs[0][1], rtol=1e-6)
        np.testing.assert_allclose(err, outputs[0][2], rtol=1e-6)
    assert not np.allclose(outputs[0][0], params["w"])  # the update did happen


def test_mesh_and_accumulation_errors_name_the_problem():
    assert axis_sizes(MeshConfig(fsdp=2, dcn_data=2), 8) == (2, 2, 1, 1)
    with pytest.raises(ConfigError, match="3 slices"):
        axis_sizes(MeshConfig(dcn_data=3), 8)
    with pytest.raises(ConfigError, match="never shard over"):
        from_dict({**tiny_dict(), "mesh": {"tensor": 2, "rules": "fsdp"}})
    with pytest.raises(ConfigError, match="microbatches: 3 does not divide batch_size 4"):
        from_dict({**tiny_dict(), "train": {**tiny_dict()["train"], "microbatches": 3}})
    with pytest.raises(ConfigError, match=r"rule_overrides\[0\]"):
        from_dict({**tiny_dict(), "mesh": {"rule_overrides": [["embed", "nodes"]]}})
    ok = from_dict({**tiny_dict(), "mesh": {"rules": "dp", "rule_overrides": [["embed", "fsdp"]],
                                            "fsdp": 2}})
    assert ok.mesh.rule_overrides == (("embed", "fsdp"),)


def test_cluster_environment_is_read_and_checked():
    assert cluster_from_env({}) is None
    assert cluster_from_env({"VDIT_DISTRIBUTED": "auto"}) == {}
    env = {"VDIT_COORDINATOR": "10.0.0.1:1234", "VDIT_NUM_PROCESSES": "4", "VDIT_PROCESS_ID": "3"}
    assert cluster_from_env(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                     "process_id": 3}
    with pytest.raises(DistributedError, match="VDIT_PROCESS_ID missing"):
        cluster_from_env({k: v for k, v in env.items() if k != "VDIT_PROCESS_ID"})
    with pytest.raises(DistributedError, match="outside"):
        cluster_from_env({**env, "VDIT_PROCESS_ID": "4"})


def test_two_processes_train_and_checkpoint_then_one_process_resumes(tmp_path):
    """2 processes x 4 devices (FSDP over all 8) train 4 steps at the full learning rate from
    the first step; one process on one device resumes from step 2 and logs the same losses for
    steps 3 and 4, and ends in the same state (params, Adam moments, EMA) as the 2 processes
    did."""
    run = tmp_path / "run"
    d = tiny_dict(run)
    d["train"].update(batch_size=8, steps=4, checkpoint_every=2, eval_every=100, **LIVE_TRAIN)
    d["mesh"] = {"fsdp": 2}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "vdit.cli", "train", str(tmp_path / "cfg.yaml")],
        env=_env(4, VDIT_COORDINATOR=f"localhost:{port}", VDIT_NUM_PROCESSES="2",
                 VDIT_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    two = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert sorted(two) == [1, 2, 3, 4]  # process 0 alone writes the metrics

    import shutil

    from vdit.train.loop import train

    two_state = checkpoint_state(run, 4)
    shutil.rmtree(run / "checkpoints" / "4")
    assert jax.device_count() == 1
    d["mesh"] = {"fsdp": 1}
    summary = train(from_dict(d))
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    one = {r["step"]: r["loss"] for r in records[4:]}
    assert sorted(one) == [3, 4] and summary["run_dir"] == str(run)
    np.testing.assert_allclose([one[3], one[4]], [two[3], two[4]], atol=1e-5)
    assert_states_equal(checkpoint_state(run, 4), two_state, tolerances=ACROSS_LAYOUTS,
                        what="resumed on 1 device")
