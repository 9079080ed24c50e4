"""`vdit bench`: compile and time the train step; report tokens/s, FLOPs, MFU and memory.

A config on shards that are not here (data.source shards, no index.json at data.shards) is
benched on a synthetic batch of its shapes (random latents and caption embeddings, unit latent
statistics, zero frozen-autoencoder params): the step reads stored latents either way, so its
work and memory are the same, and a published-architecture model (model.kind wan on the Wan
VAE's published architecture, experiments/bench_gpu_wan.yaml) benches without downloads.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import Config
from vdit.data.pipeline import fixed_batch
from vdit.diffusion.lora_system import make_system
from vdit.diffusion.text_to_video import TextToVideo
from vdit.scaling.flops import step_flops
from vdit.train.state import count_params
from vdit.train.throughput import compiled_flops, device_peak
from vdit.train.trainer import build_trainer


def _peak_memory(compiled) -> tuple[float, str]:
    """Peak device memory in bytes: the allocator's figure where there is one (GPU, TPU), else
    XLA's static estimate of the compiled step (arguments + outputs + temporaries - aliased)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "allocator peak"
    m = compiled.memory_analysis()
    if m is None:
        return float("nan"), "unavailable"
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return float(total), "XLA estimate"


def synthetic(cfg: Config) -> bool:
    """Whether the bench runs on a synthetic batch: data.source shards that are not here."""
    return cfg.data.source == "shards" and not (Path(cfg.data.shards) / "index.json").is_file()


def synthetic_stats(system: TextToVideo) -> dict:
    """TrainState.stats of `system` without data or files: latent mean 0 and std 1, zero
    frozen-autoencoder params (a step on stored latents never runs them) and, for caption
    embeddings, the fully masked empty caption (`null_caption`'s default). (`text.encoder:
    t5` still reads its folder's config.json.) A LoRA run's frozen base is left to the
    trainer, which makes it on its shardings (train/init_from.py)."""
    shapes = {k: v for k, v in system.stats_shapes().items() if k not in system.sharded_stats()}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: np.full(x.shape, jax.tree_util.keystr(path) == "['std']", x.dtype),
        shapes)


def synthetic_batch(cfg: Config, count: int, seed: int = 0) -> dict:
    """`count` clips as shards give them: "latent" bf16 [N, T', H', W', C] (standard normal),
    "tokens" int32 [N, S] and, for precomputed captions, "text" [N, S, text.width] in
    text.dtype (standard normal) with an all-ones "text_mask" (Wan pads to 512 unmasked)."""
    rng = np.random.default_rng(seed)
    s = cfg.text.max_length
    batch = {"latent": rng.standard_normal((count, *cfg.latent_shape()), np.float32).astype(
        jnp.bfloat16), "tokens": np.ones((count, s), np.int32)}
    if cfg.text.encoder == "precomputed":
        batch["text"] = rng.standard_normal((count, s, cfg.text.width), np.float32).astype(
            jnp.dtype(cfg.text.dtype))
        batch["text_mask"] = np.ones((count, s), np.int32)
    return batch


class WarmStep:
    """A compiled train step on a fixed batch, run `warmup` times: `run()` times one more step.
    `compiler_options`: XLA debug options (XLA_FLAGS names without the dashes) for this compile.

    What `vdit bench`, tools/profile_step.py and tools/ab_step.py time. The batch is fixed, so
    only the step is measured (no data loading); state advances with every run."""

    def __init__(self, cfg: Config, warmup: int = 2, compiler_options: dict | None = None):
        self.synthetic = synthetic(cfg)
        if self.synthetic:
            system = make_system(cfg)  # a LoRA config benches its LoRA step
            self.trainer = build_trainer(cfg, system, stats=synthetic_stats(system))
            host = synthetic_batch(cfg, cfg.train.batch_size)
        else:
            self.trainer = build_trainer(cfg)
            host = fixed_batch(cfg.data, self.trainer.system.tokenizer, "train",
                               cfg.train.batch_size, cfg.text.encoder == "precomputed")
        self.batch = self.trainer.device_batch(host)
        with self.trainer.context():
            t0 = time.perf_counter()
            lowered = self.trainer.step_fn.lower(self.trainer.state, self.batch)
            # XLA options for this compile only, e.g. {"xla_cpu_use_onednn": True}
            self.compiled = lowered.compile(compiler_options=compiler_options)
            self.compile_s = time.perf_counter() - t0
        self.state, self.metrics = self.trainer.state, None
        for _ in range(warmup):  # the allocator settles after two steps
            self.run()

    def run(self) -> float:
        """One step; -> its wall time in seconds (dispatch to results ready)."""
        with self.trainer.context():
            t = time.perf_counter()
            self.state, self.metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready((self.state, self.metrics))
            return time.perf_counter() - t


def bench(cfg: Config, *, steps: int = 10, warmup: int = 2, runs: int = 1) -> dict:
    """Median step time over `steps` timed steps after `warmup` untimed ones.

    With `runs` > 1 the timed steps repeat in `runs` rounds (one compile); the step time is the
    median of the rounds' medians, and its MFU (for an odd count, the median round's) is what
    is reported beside each round's: on a machine whose speed drifts (a shared VM) one round
    can be off by a quarter. A CPU's peak is measured before the steps and after each
    round; the highest figure is the one every round divides by."""
    device_peak()
    step = WarmStep(cfg, warmup)
    rounds = []
    for _ in range(runs):
        rounds.append([step.run() for _ in range(steps)])
        peak, peak_src = device_peak(remeasure=True)
    peak *= jax.device_count()
    times = [t for r in rounds for t in r]
    round_s = [statistics.median(r) for r in rounds]
    step_s = statistics.median(round_s)
    dit_flops, encoder_flops = step_flops(cfg, encodes_pixels="video" in step.batch)
    flops = dit_flops + encoder_flops
    xla_flops = compiled_flops(step.compiled) * jax.device_count()
    memory, memory_src = _peak_memory(step.compiled)
    tokens = cfg.train.batch_size * cfg.num_tokens()
    return {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "params": count_params(step.state.params), "tokens_per_step": tokens,
        "step_s": step_s, "step_s_min": min(times), "tokens_per_s": tokens / step_s,
        "flops_per_step": flops, "dit_flops_per_step": dit_flops,
        "encoder_flops_per_step": encoder_flops, "xla_flops_per_step": xla_flops,
        "flops_ratio_xla": flops / xla_flops if xla_flops else float("nan"),
        "flops_per_s": flops / step_s, "peak_flops_per_s": peak, "peak_source": peak_src,
        "mfu": flops / step_s / peak, "mfu_runs": [flops / t / peak for t in round_s],
        "compile_s": step.compile_s, "peak_memory_bytes": memory,
        "memory_source": memory_src, "scan_layers": cfg.model.scan_layers,
        "dtype": cfg.model.dtype, "remat": cfg.model.remat, "loss": float(step.metrics["loss"]),
        "model_kind": cfg.model.kind, "synthetic_batch": step.synthetic,
    }


def format_report(r: dict) -> str:
    xla_note = ("XLA counts a scanned stack once" if r["scan_layers"]
                else f"{100 * r['flops_ratio_xla']:.1f} % of XLA's count")
    encoder_note = (f": DiT {r['dit_flops_per_step'] / 1e9:.1f} analytic + frozen encoders "
                    f"{r['encoder_flops_per_step'] / 1e9:.1f}" if r["encoder_flops_per_step"]
                    else " analytic")
    runs = r.get("mfu_runs", [])
    runs_note = (f"median of {len(runs)} runs: "
                 f"{', '.join(f'{100 * m:.1f}' for m in sorted(runs))} %; " if len(runs) > 1
                 else "")
    step_note = "median of the runs' medians" if len(runs) > 1 else "median"
    return "\n".join([
        f"device        {r['device']} x {r['devices']}",
        f"model         {r['params'] / 1e6:.1f} M params ({r.get('model_kind', 'dit')}), "
        f"{r['dtype']}, remat {r['remat']}, scan {r['scan_layers']}"
        + (", synthetic batch (no shards here)" if r.get("synthetic_batch") else ""),
        f"compile       {r['compile_s']:.1f} s",
        f"step          {r['step_s'] * 1e3:.1f} ms {step_note} (min "
        f"{r['step_s_min'] * 1e3:.1f} ms)",
        f"tokens/s      {r['tokens_per_s']:.0f} ({r['tokens_per_step']} tokens/step)",
        f"FLOPs/step    {r['flops_per_step'] / 1e9:.1f} GFLOP{encoder_note} ({xla_note})",
        f"achieved      {r['flops_per_s'] / 1e9:.1f} GFLOP/s",
        f"peak          {r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({r['peak_source']})",
        f"MFU           {100 * r['mfu']:.1f} % ({runs_note}fastest step "
        f"{100 * r['flops_per_step'] / r['step_s_min'] / r['peak_flops_per_s']:.1f} %)",
        f"peak memory   {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['memory_source']})",
    ])
