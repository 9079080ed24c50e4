"""Context parallelism (vdit/ops/context_parallel.py): ring and Ulysses attention split the token
sequence over the mesh axis `context` and must equal one device, in value and gradient.

The multi-device checks run once, on 8 fake CPU devices in a fresh process
(tests/context_parallel_checks.py: the device count is fixed when JAX starts); this process
(one device) supplies the DiT's reference losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_dict
from context_parallel_checks import DIT_MESH, MESHES, dit_train
from state_checks import (
    ACROSS_LAYOUTS,
    assert_every_parameter_reached_the_loss,
    assert_states_equal,
    load_state,
)

from vdit.config import ConfigError, from_dict
from vdit.ops.attention import MASK_VALUE
from vdit.ops.context_parallel import merge

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    out = tmp_path_factory.mktemp("cp") / "dit_state.npz"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "context_parallel_checks.py"),
                           str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(s for s in proc.stdout.splitlines()[::-1] if s.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "dit_state": str(out)}


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
@pytest.mark.parametrize("context,tensor", MESHES)
def test_context_parallel_attention_matches_one_device(results, mode, context, tensor):
    """Output and q/k/v gradients within 1e-5 of one device, without masks and with packed
    segment ids plus key padding (some queries see no key), on meshes data x context x
    tensor = 8."""
    got = results["attention"][f"{mode}/{context}/{tensor}"]
    assert got["plain"] < TOL and got["masked"] < TOL, got
    # The mode really ran: ring rotates K/V by collective-permute, Ulysses uses all-to-all.
    assert got["collective"], got


def test_ring_attention_over_the_pallas_kernel_matches_one_device(results):
    """Each ring block runs vdit's flash kernel (interpret mode on CPU) through
    attention_with_lse; output and gradients match one device's XLA attention."""
    assert results["pallas_ring"] < TOL, results["pallas_ring"]


def test_ring_lse_is_differentiable_like_one_device(results):
    """A loss on attention_with_lse's lse as well as its output: the ring's custom VJP routes
    the lse cotangent into every block as one device does."""
    assert results["ring_lse"] < TOL, results["ring_lse"]


def test_cross_attention_splits_queries_with_whole_text(results):
    """Video queries split over context, text K/V (masked, with caption ids) whole."""
    assert set(results["cross"]) == {"2/1", "4/2"}
    assert max(results["cross"].values()) < TOL, results["cross"]


def test_dit_training_under_context_parallelism_equals_one_device(results, tmp_path):
    """3 training steps of the tiny DiT from perturbed parameters at the full learning rate
    (attention, forward and backward, shapes the loss and every update) with ring attention over
    mesh.context=4 (data=2, batch 4, 16 tokens per clip): the losses, params, Adam moments and
    EMA of one device within float32 reduction-order noise."""
    assert jax.device_count() == 1, "the reference runs on this process's single device"
    reference, _ = dit_train({"data": 1}, out=tmp_path / "one.npz")
    split = results["dit"]
    assert DIT_MESH["context"] == 4 and split["collective"], split
    assert len(split["losses"]) == len(reference) == 3
    for a, b in zip(split["losses"], reference, strict=True):
        assert abs(a - b) < TOL, (split["losses"], reference)
    one = load_state(tmp_path / "one.npz")
    assert_every_parameter_reached_the_loss(one)
    assert_states_equal(load_state(results["dit_state"]), one, tolerances=ACROSS_LAYOUTS,
                        what="context=4")


def test_merge_of_blocks_gives_no_weight_to_a_block_that_saw_no_key():
    """A block whose keys were all masked (o = 0, lse = MASK_VALUE, as every impl returns)
    leaves the other block's result unchanged, and two such blocks stay (0, ~MASK_VALUE)."""
    o = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))  # [B, Lq, H, D]
    lse = jnp.asarray([[[0.5, -2.0, 3.0], [1.0, 0.0, -1.0]]])  # [B, H, Lq]
    none, none_lse = jnp.zeros_like(o), jnp.full_like(lse, MASK_VALUE)
    (out, out_lse), (empty, empty_lse) = jax.jit(lambda: (
        merge(o, lse, none, none_lse), merge(none, none_lse, none, none_lse)))()
    assert jnp.allclose(out, o) and jnp.allclose(out_lse, lse)
    assert bool(jnp.all(empty == 0)) and bool(jnp.all(empty_lse <= 0.99 * MASK_VALUE))


def _config(**sections):
    d = tiny_dict("/nonexistent")  # 16 tokens per clip, 2 heads
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return from_dict(d)


def test_config_refuses_tokens_that_do_not_split_over_context():
    with pytest.raises(ConfigError, match=r"mesh.context: 16 tokens per clip do not split 3 ways"):
        _config(mesh={"data": 1, "context": 3})


def test_config_refuses_ulysses_when_heads_do_not_split():
    with pytest.raises(ConfigError, match=r"model.heads: ulysses splits the 2 heads over "
                                          r"mesh.context 2 x mesh.tensor 2 = 4"):
        _config(model={"context_parallel": "ulysses"}, mesh={"data": 1, "context": 2,
                                                             "tensor": 2})
    assert _config(model={"context_parallel": "ring"},
                   mesh={"data": 1, "context": 2, "tensor": 2}).model.context_parallel == "ring"
