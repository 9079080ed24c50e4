"""Run on 8 fake CPU devices by tests/test_parallel.py (a fresh process: the device count is
fixed at JAX start-up). Trains the tiny DiT 3 steps under each parallel layout, with gradient
accumulation on a sharded batch as one more layout, from perturbed parameters (so attention,
MLP, cross-attention and the text encoder shape the loss from the first step) at the full
learning rate from the first step. Prints one JSON line of the losses and writes each layout's
final state (params, optimizer state, EMA) to OUT_DIR/NAME.npz."""

from __future__ import annotations  # noqa: I001  (vdit must be imported before jax)

import json
import math
import sys
from pathlib import Path

import vdit  # noqa: F401
import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_dict
from state_checks import LIVE_TRAIN, perturbed_state, save_state

from vdit.config import from_dict
from vdit.data.physics import physics_tokenizer
from vdit.data.pipeline import train_iterator
from vdit.train.trainer import build_trainer

LAYOUTS = {
    "single": {"data": 1},  # on one device of the eight: the reference
    "dp": {"data": 8, "rules": "dp"},
    "fsdp": {"data": 1, "fsdp": 8, "rules": "fsdp"},
    "fsdp_tp": {"data": 1, "fsdp": 4, "tensor": 2, "rules": "fsdp_tp"},
    "context": {"data": 2, "fsdp": 2, "context": 2, "rules": "context"},
    "multislice": {"data": 1, "fsdp": 2, "tensor": 2, "dcn_data": 2},
}


def train_layout(mesh: dict, out: Path, steps: int = 3, microbatches: int = 1) -> list[float]:
    """The losses of `steps` steps under `mesh`; the final state goes to `out`."""
    d = tiny_dict("/nonexistent")
    d["train"].update(batch_size=8, microbatches=microbatches, **LIVE_TRAIN)
    d["mesh"] = mesh
    cfg = from_dict(d)
    sizes = [mesh.get(axis, 1) for axis in ("data", "fsdp", "tensor", "context", "dcn_data")]
    trainer = build_trainer(cfg, devices=jax.devices()[:math.prod(sizes)])
    data = train_iterator(cfg.data, physics_tokenizer(cfg.text.max_length), 8, shuffle_seed=0)
    state, losses = perturbed_state(trainer.state), []
    with trainer.context():
        for _ in range(steps):
            state, metrics = trainer.step_fn(state, trainer.device_batch(next(data)))
            losses.append(float(metrics["loss"]))
    save_state(out, state)
    return losses


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    out_dir = Path(sys.argv[1])
    result = {name: train_layout(mesh, out_dir / f"{name}.npz") for name, mesh in LAYOUTS.items()}
    result["single_micro2"] = train_layout(LAYOUTS["single"], out_dir / "single_micro2.npz",
                                           microbatches=2)
    result["dp_micro2"] = train_layout({"data": 4, "rules": "dp"}, out_dir / "dp_micro2.npz",
                                       microbatches=2)
    print("RESULT " + json.dumps(result))
