"""How a LoRA step applies its adapters: the branch in each Linear (what vdit trains with) against
folding s A B into the kernels before the forward (`lora.fold`), with a full fine-tune of the
same model for scale; XLA's memory analysis of the compiled train step and its warm time.

Usage: python tools/bench_lora.py [--width 512] [--depth 4] [--heads 8] [--size 128]
           [--frames 9] [--batch 2] [--rank 16] [--steps 5]

The model is a `model.kind: wan` DiT on the tiny WanPipeline fixture's VAE latents (4 channels,
4 x 8 x 8), captions precomputed; the batch is synthetic stored latents. Columns: the state's
bytes (params, EMA, Adam moments, the frozen base), the step's temporaries and its median warm
time. Recorded in docs/fine-tuning.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _config(args: argparse.Namespace, lora: dict):
    sys.path.insert(0, str(ROOT / "tools"))
    from make_wan_export_sample import run_config

    from vdit.config import from_dict

    d = run_config(Path("/tmp/bench_lora"), Path("/tmp/bench_lora_shards"))
    d["model"].update(width=args.width, depth=args.depth, heads=args.heads,
                      ffn_dim=4 * args.width, freq_dim=64)
    d["text"].update(width=64, max_length=32)
    d["data"]["world"].update(frames=args.frames, height=args.size, width=args.size)
    d["train"].update(batch_size=args.batch, lora=lora)
    return from_dict(d)


def measure(cfg, system, steps: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vdit.diffusion.lora_system import LoraTextToVideo
    from vdit.train.state import TrainState, make_optimizer
    from vdit.train.step import train_step

    tx = make_optimizer(cfg.train)
    shapes = system.stats_shapes()
    stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    stats["std"] = jnp.ones_like(stats["std"])
    if isinstance(system, LoraTextToVideo):
        stats["base"] = system.base_from(nn.unbox(system.init_dit(jax.random.key(0)))["params"])
    params = nn.unbox(jax.jit(system.init)(jax.random.key(1)))["params"]
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       ema_params=jax.tree.map(jnp.copy, params),
                       opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(2)),
                       stats=stats)
    rng = np.random.default_rng(0)
    b, s, e = cfg.train.batch_size, cfg.text.max_length, cfg.text.width
    batch = {"latent": jnp.asarray(rng.standard_normal((b, *system.latent_shape)), jnp.float32),
             "text": jnp.asarray(rng.standard_normal((b, s, e)), jnp.float32),
             "text_mask": jnp.ones((b, s), jnp.int32)}
    step = jax.jit(lambda st, bt: train_step(st, bt, system=system, tx=tx, cfg=cfg.train),
                   donate_argnums=0)
    compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)

    def nbytes(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return {"trained": nbytes(state.params), "optimizer": nbytes(state.opt_state),
            "base": nbytes(state.stats.get("base", {})),
            "temp": mem.temp_size_in_bytes, "step_s": statistics.median(times[1:])}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="frame height = width (px)")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed warm steps (median)")
    args = parser.parse_args()

    from vdit.diffusion.lora_system import LoraTextToVideo
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.models import lora

    class Merged(LoraTextToVideo):
        """The alternative: s A B folded into float32 kernels before each forward."""

        def adapted(self, params, stats, key=None):
            return lora.fold(stats["base"], params, self.scale)

    lora_cfg = _config(args, {"rank": args.rank})
    full_cfg = _config(args, {})
    print(f"Wan DiT width {args.width}, depth {args.depth}, {lora_cfg.num_tokens()} tokens x "
          f"batch {args.batch}, LoRA rank {args.rank} on the default targets")
    print(f"{'variant':<28}{'trained MB':>11}{'optim MB':>10}{'base MB':>9}{'temp MB':>9}"
          f"{'step ms':>9}")
    for name, cfg, cls in (("LoRA branch (vdit)", lora_cfg, LoraTextToVideo),
                           ("LoRA merged kernels", lora_cfg, Merged),
                           ("full fine-tune", full_cfg, TextToVideo)):
        r = measure(cfg, cls(cfg), args.steps)
        print(f"{name:<28}{r['trained'] / 1e6:>11.1f}{r['optimizer'] / 1e6:>10.1f}"
              f"{r['base'] / 1e6:>9.1f}{r['temp'] / 1e6:>9.1f}{r['step_s'] * 1e3:>9.0f}",
              flush=True)


if __name__ == "__main__":
    main()
