"""Run on 8 fake CPU devices by tests/test_context_parallel.py (a fresh process: the device count
is fixed when JAX starts). Prints one line, `RESULT {json}`:

- attention[mode/context/tensor]: the largest |difference| from one-device attention over the
  output and the q, k, v gradients, without masks ("plain") and with packed segment ids plus
  key padding ("masked"), and whether the compiled program holds the mode's collective;
- pallas_ring: the same, masked, for ring attention over vdit's Pallas kernel (context 2);
- ring_lse: the same for the gradients of a loss on both o and lse (ring, context 4);
- cross[context/tensor]: the same for cross-attention with split queries and whole K/V;
- dit: the tiny DiT's first 3 training losses from perturbed parameters under mesh.context=4
  (ring), and whether its compiled step rotates K/V; its final state goes to ARGV[1] (.npz).
"""

from __future__ import annotations  # noqa: I001  (vdit must be imported before jax)

import json
import sys
from pathlib import Path

import vdit  # noqa: F401
import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_dict
from state_checks import LIVE_TRAIN, perturbed_state, save_state

from vdit.config import MeshConfig, from_dict
from vdit.data.pipeline import fixed_batch
from vdit.ops.attention import MASK_VALUE, attention, attention_with_lse
from vdit.parallel.mesh import make_mesh
from vdit.parallel.rules import get_rules
from vdit.train.trainer import build_trainer

B, L, S, H, D = 2, 16, 6, 8, 8  # H = 8: Ulysses at context 4 x tensor 2
MESHES = ((2, 1), (4, 1), (4, 2))  # (context, tensor); data fills the 8 devices
COLLECTIVE = {"ring": "collective_permute", "ulysses": "all_to_all"}


def _inputs(kv_len: int, heads: int = H, dim: int = D) -> tuple:
    """q [B, L, heads, dim], k and v [B, kv_len, heads, dim], output cotangent like q."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, kv = (B, L, heads, dim), (B, kv_len, heads, dim)
    shapes = (q, kv, kv, q)
    return tuple(jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True))


# Row 0 packs three clips across the device boundaries, the last one's keys all padded (its
# queries see no key: fully masked rows); row 1 is one clip with 3 padded keys.
IDS = jnp.asarray([[0] * 5 + [1] * 7 + [2] * 4, [0] * L], jnp.int32)
KEY_MASK = jnp.asarray([[True] * 12 + [False] * 4, [True] * (L - 3) + [False] * 3])
# Cross-attention: captions 0 and 1 of row 0 (ids against the queries' ids), row 1 padded text.
TEXT_IDS = jnp.asarray([[0, 0, 1, 1, 2, 2], [0] * S], jnp.int32)
TEXT_MASK = jnp.asarray([[True] * S, [True] * 4 + [False] * 2])


def _value_and_grads(mode: str | None, masks: dict, impl: str = "xla"):
    """jit-able (q, k, v, ct) -> [o, dq, dk, dv] of attention with `masks`."""

    def f(q, k, v, ct):
        o, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, impl=impl, context_parallel=mode,
                                                   **masks), q, k, v)
        return [o, *vjp(ct)]

    return f


def _max_diff(a: list, b: list) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True))


def _mesh(context: int, tensor: int):
    return make_mesh(MeshConfig(data=-1, context=context, tensor=tensor))


def attention_checks() -> dict:
    """Ring and Ulysses self-attention against one device, per mesh, unmasked and masked."""
    args = _inputs(L)
    cases = {"plain": {}, "masked": {"segment_ids": IDS, "kv_mask": KEY_MASK}}
    ref = {c: jax.jit(_value_and_grads(None, m))(*args) for c, m in cases.items()}
    out = {}
    for mode in ("ring", "ulysses"):
        for context, tensor in MESHES:
            with jax.set_mesh(_mesh(context, tensor)), nn.logical_axis_rules(get_rules("default")):
                fn = jax.jit(lambda *a, mode=mode: {c: _value_and_grads(mode, m)(*a)
                                                    for c, m in cases.items()})
                compiled = fn.lower(*args).compile()
                got = compiled(*args)
            out[f"{mode}/{context}/{tensor}"] = {
                **{c: _max_diff(got[c], ref[c]) for c in cases},
                "collective": COLLECTIVE[mode] in compiled.as_text().replace("-", "_")}
    return out


def pallas_ring_check() -> float:
    """Ring attention at context 2 whose blocks are vdit's Pallas flash kernel (interpret mode
    off its device), masked: the merge's lse cotangent flows through the kernel's backward."""
    args = _inputs(L, heads=2, dim=16)  # a head dim the Triton tiles take
    masks = {"segment_ids": IDS, "kv_mask": KEY_MASK}
    ref = jax.jit(_value_and_grads(None, masks))(*args)
    with jax.set_mesh(_mesh(2, 1)), nn.logical_axis_rules(get_rules("default")):
        got = jax.jit(_value_and_grads("ring", masks, impl="pallas"))(*args)
    return _max_diff(got, ref)


def lse_gradient_check() -> float:
    """Ring attention at context 4 with a loss on the lse as well as the output (masked): the
    q, k, v gradients through the lse cotangent path of the ring's custom VJP, against one
    device."""
    q, k, v, ct = _inputs(L)
    c_lse = jnp.swapaxes(ct[..., 0], 1, 2)  # [B, H, L]

    def grads(mode):
        def loss(q, k, v):
            o, lse = attention_with_lse(q, k, v, segment_ids=IDS, kv_mask=KEY_MASK, impl="xla",
                                        context_parallel=mode)
            seen = lse > 0.5 * MASK_VALUE  # a row that saw no key has the constant MASK_VALUE
            return jnp.sum(o * ct) + jnp.sum(jnp.where(seen, lse, 0.0) * c_lse)
        # Gradients only: o and lse themselves are compared by attention_checks, and the
        # scalar sum of ~500 terms differs from one device by float32 summation order.
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    ref = grads(None)
    with jax.set_mesh(_mesh(4, 1)), nn.logical_axis_rules(get_rules("default")):
        got = grads("ring")
    return _max_diff(jax.tree.leaves(got), jax.tree.leaves(ref))


def cross_checks() -> dict:
    """Cross-attention with the queries split over context and K/V whole, against one device."""
    args = _inputs(S)
    masks = {"segment_ids": (IDS, TEXT_IDS), "kv_mask": TEXT_MASK}
    ref = jax.jit(_value_and_grads(None, masks))(*args)
    out = {}
    for context, tensor in ((2, 1), (4, 2)):
        with jax.set_mesh(_mesh(context, tensor)), nn.logical_axis_rules(get_rules("default")):
            got = jax.jit(_value_and_grads("queries", masks))(*args)
        out[f"{context}/{tensor}"] = _max_diff(got, ref)
    return out


def dit_train(mesh: dict, out: str | Path | None = None, steps: int = 3,
              ) -> tuple[list[float], str]:
    """The tiny DiT (tests/conftest.py: 16 tokens per clip, ring attention) trained `steps`
    steps from perturbed parameters at the full learning rate from the first step
    (tests/state_checks.py) on one fixed batch of 4 clips under `mesh`: its losses, and the
    compiled step's text (to see which collectives it uses). The final state (params, optimizer
    state, EMA) goes to `out` (.npz) when given."""
    d = tiny_dict("/nonexistent")
    d["model"]["context_parallel"] = "ring"
    d["train"].update(LIVE_TRAIN)
    d["mesh"] = mesh
    cfg = from_dict(d)
    trainer = build_trainer(cfg)
    batch = trainer.device_batch(fixed_batch(cfg.data, trainer.system.tokenizer, "train",
                                             cfg.train.batch_size))
    state, losses = perturbed_state(trainer.state), []
    with trainer.context():
        step = trainer.step_fn.lower(state, batch).compile()  # traced and compiled once
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    if out is not None:
        save_state(out, state)
    return losses, step.as_text()


DIT_MESH = {"data": 2, "context": 4}


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    result = {"attention": attention_checks(), "pallas_ring": pallas_ring_check(),
              "ring_lse": lse_gradient_check(), "cross": cross_checks()}
    losses, text = dit_train(DIT_MESH, out=sys.argv[1] if len(sys.argv) > 1 else None)
    result["dit"] = {"losses": losses, "collective": COLLECTIVE["ring"] in text.replace("-", "_")}
    print("RESULT " + json.dumps(result))
