"""Run on 8 fake CPU devices by tests/test_wan_dit.py (the device count is fixed at JAX start-up):
the Wan DiT fixture `b` (2 heads of 20) loaded straight onto each parallel layout's shardings
(vdit/io/wan_transformer.py, per device slice) and run forward and backward under the layout's
logical-axis rules: FSDP x tensor, and context parallel by ring (with FSDP and data). Prints one
JSON line: per layout, whether the loaded shards equal the single-device load, and the max
difference of the output and the gradient from one device's."""

from __future__ import annotations  # noqa: I001  (vdit must be imported before jax)

import dataclasses
import json
import sys
from pathlib import Path

import vdit  # noqa: F401
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from vdit.config import MeshConfig, TextConfig
from vdit.io import wan_transformer as wt
from vdit.models.wan_dit import WanDiT
from vdit.parallel.mesh import make_mesh
from vdit.parallel.rules import get_rules

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wan_dit"
LAYOUTS = {  # FSDP alone and Ulysses are covered by the own DiT's layout tests
    "fsdp_tp": (MeshConfig(data=1, fsdp=4, tensor=2, rules="fsdp_tp"), None),
    "ring": (MeshConfig(data=2, fsdp=2, context=2, rules="context"), "ring"),
}


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    ref = load_file(str(FIXTURES / "reference.safetensors"))
    spec, params = wt.load_params(FIXTURES / "b")
    x = jnp.asarray(np.concatenate([ref["b/hidden_states"]] * 2)).transpose(0, 2, 3, 4, 1)
    t = jnp.asarray(np.concatenate([ref["b/t0/timestep"], ref["b/t1/timestep"]]))
    text = jnp.asarray(np.concatenate([ref["b/encoder_hidden_states"]] * 2))

    def model(cp):
        m = dataclasses.replace(spec.model, context_parallel=cp or "ring")
        return WanDiT(m, TextConfig(encoder="precomputed", width=spec.text_dim),
                      (*x.shape[1:4], spec.in_channels), time_scale=1.0)

    def loss(module, p):
        return jnp.mean(jnp.square(module.apply({"params": p}, x, t, text)))

    single = jax.value_and_grad(lambda p: loss(model(None), p))(params)
    result = {}
    for name, (mesh_cfg, cp) in LAYOUTS.items():
        mesh, rules = make_mesh(mesh_cfg), get_rules(mesh_cfg.rules)
        module = model(cp)
        boxed = jax.eval_shape(module.init, jax.random.key(0), x, t, text)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed)["params"], mesh,
                                                rules)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              nn.unbox(boxed)["params"], shardings)
        _, sharded = wt.load_params(FIXTURES / "b", target, log=lambda *a, **k: None)
        same = jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b),
                                         sharded, params))
        cut = any(len(a.sharding.device_set) > 1 and not a.sharding.is_fully_replicated
                  for a in jax.tree.leaves(sharded))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            value, grad = jax.jit(jax.value_and_grad(lambda p, m=module: loss(m, p)))(sharded)
        grad_err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                       for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(single[1]),
                                       strict=True))
        result[name] = {"loaded_equal": bool(same), "sharded": bool(cut),
                        "loss_err": abs(float(value) - float(single[0])), "grad_err": grad_err}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
