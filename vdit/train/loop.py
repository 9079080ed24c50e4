"""`vdit train` and `vdit train-ae`: the one training loop around the pure train_step.

Data (Grain) -> sharded global batch -> jitted, donated train_step -> metrics one step late (so
the host never waits on the device) -> periodic eval, orbax checkpoints -> samples (DiT) or a
reconstruction GIF (autoencoder) at the end. What is trained is the `system`.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from vdit.config import Config, ConfigError, to_dict
from vdit.data.physics import physics_tokenizer
from vdit.data.pipeline import fixed_batch, train_iterator
from vdit.io.checkpoint import Checkpointer
from vdit.io.run_dir import check_resume_compatible, save_config
from vdit.parallel.distributed import align_processes, is_primary
from vdit.scaling.flops import packed_train_flops, step_flops
from vdit.train.guards import NonFiniteGuard, PreemptionWatch, TrainingStopped
from vdit.train.metrics import MetricsWriter, plot_losses, read_metrics
from vdit.train.state import System, TrainState, count_params
from vdit.train.throughput import device_peak
from vdit.train.trainer import build_trainer


def _evaluate(eval_fn, state: TrainState, eval_batch: dict, key) -> dict:
    """The system's eval metrics for the raw and the EMA params: eval_NAME, eval_NAME_ema."""
    out = {}
    for suffix, params in (("", state.params), ("_ema", state.ema_params)):
        for name, value in jax.device_get(eval_fn(params, eval_batch, state.stats, key)).items():
            value = np.asarray(value)
            rounded = float(value) if value.ndim == 0 else value.round(5).tolist()
            out[f"eval_{name}{suffix}"] = rounded
    return out


def _describe(system: System, ev: dict) -> str:
    name, unit, _ = system.primary_metric
    unit = f" {unit}" if unit else ""
    return (f"eval {name} {ev[f'eval_{name}']:.4f}{unit} "
            f"(EMA {ev[f'eval_{name}_ema']:.4f}{unit})")


def _summarise(system: System, records: list[dict], run_dir: Path, log) -> dict:
    name, unit, _ = system.primary_metric
    key = f"eval_{name}"
    evals = [r for r in records if key in r]
    summary: dict = {"run_dir": str(run_dir)}
    if evals:
        start, end = evals[0][key], evals[-1][key]
        summary.update({f"{key}_start": start, f"{key}_end": end, f"{key}_ratio": end / start})
        if f"{key}_ema" in evals[-1]:
            summary[f"{key}_ema_end"] = evals[-1][f"{key}_ema"]
        log(f"eval {name}: step {evals[0]['step']} = {start:.4f}, step {evals[-1]['step']} = "
            f"{end:.4f}{' ' + unit if unit else ''} ({100 * end / start:.1f} % of the start)")
    return summary


def _validation_samples(samples, step: int, state: TrainState, log) -> None:
    t0 = time.perf_counter()
    out = samples.write(step, state)
    if out is not None:
        log(f"step {step}: validation samples in {time.perf_counter() - t0:.1f} s -> {out}")


def train(cfg: Config, *, system: System | None = None, log=print) -> dict:
    """Train `system` (default: the text-to-video DiT), resuming from the run's latest
    checkpoint if there is one; returns a summary."""
    from vdit.data.captions import resolve_text
    from vdit.diffusion.experts import resolve_experts

    cfg = resolve_text(cfg)  # the shards' encoder checked; the run names it in config.yaml
    cfg = resolve_experts(cfg)  # an expert run's boundary, named in config.yaml too
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    check_resume_compatible(run_dir, cfg)
    primary = is_primary()  # process 0 writes the run's files; every process trains
    if primary:
        save_config(run_dir, cfg)

    align_processes("checkpointer")
    ckpt = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints,
                        async_save=tc.async_checkpoint)
    # Resuming restores the whole state, stats included: build only its target then.
    trainer = build_trainer(cfg, system, restoring=ckpt.latest_step() is not None)
    system = trainer.system
    if primary and trainer.init_record is not None:  # what train.init_from read, once
        from vdit.train.init_from import write_record

        log(f"init_from: {write_record(run_dir, trainer.init_record)}")
    state, tokenizer = trainer.state, physics_tokenizer(cfg.text.max_length)
    embeddings = cfg.text.encoder == "precomputed"
    data_iter = train_iterator(cfg.data, tokenizer, tc.batch_size, shuffle_seed=tc.seed,
                               patch=cfg.model.patch, embeddings=embeddings)
    eval_batch = trainer.replicated_batch(
        fixed_batch(cfg.data, tokenizer, "eval", cfg.data.num_eval_clips, embeddings))
    eval_key = jax.random.key(tc.seed + 1)
    if system.kind == "autoencoder":
        stats_videos = trainer.replicated_batch(
            fixed_batch(cfg.data, tokenizer, "train", cfg.data.stats_clips))["video"]
        stats_fn = jax.jit(system.latent_stats, out_shardings=jax.tree.map(
            lambda x: x.sharding, trainer.state.stats))
    writer = MetricsWriter(run_dir, tc.tensorboard, enabled=primary)
    samples = None
    if tc.sample_every:
        if system.kind != "dit":
            raise ConfigError("train.sample_every: validation samples are for DiT runs (vdit "
                              "train); set it to 0 (an autoencoder run writes "
                              "reconstructions.gif at the end)")
        from vdit.train.validation import ValidationSamples

        samples = ValidationSamples(cfg, system, trainer.mesh, writer, primary)
        log(samples.describe())

    with trainer.context(), PreemptionWatch() as watch:
        start, sampled = 0, -1  # sampled: the last step whose validation samples were made
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state, log=log)
            data_iter.set_state(meta["data_iterator"])
            start = int(state.step)
            sampled = meta.get("samples_through", start)
            log(f"resumed {run_dir} at step {start}")

        guard = NonFiniteGuard(tc.max_bad_steps)
        host = next(data_iter)
        guard.remember(start + 1, host.get("seed", []))
        batch = trainer.device_batch(host)
        t0 = time.perf_counter()
        compiled = trainer.step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        eval_fn = trainer.eval_fn.lower(state.params, eval_batch, state.stats, eval_key).compile()
        align_processes("compiled")  # every process compiled: the collectives can start
        # Analytic count for the DiT: XLA's cost analysis counts a scanned layer stack only once.
        # Pixel batches also run the frozen encoder in the step, an in-step T5 its forward.
        encoder_flops = 0.0
        if system.kind == "dit":
            dit_flops, encoder_flops = step_flops(cfg, encodes_pixels="video" in host)
            flops = dit_flops + encoder_flops
        else:
            flops = compiled.cost_analysis()["flops"]
        peak, peak_src = device_peak()
        peak *= jax.device_count()
        t_, h_, w_, _ = cfg.latent_shape()  # the autoencoder counts latent positions
        tokens_per_step = tc.batch_size * (cfg.num_tokens() if system.kind == "dit"
                                           else t_ * h_ * w_)
        packed = system.kind == "dit" and cfg.data.batching == "pack"

        def step_work(host: dict) -> tuple[float, int]:
            """(FLOPs, tokens) of the global step on `host`: packed rows count their real
            tokens and clips (this host's rows times the process count)."""
            if not packed:
                return flops, tokens_per_step
            f, n = packed_train_flops(cfg, host["segment_ids"])
            return f * jax.process_count(), n * jax.process_count()

        if system.kind == "dit":
            log(f"model: {count_params(state.params) / 1e6:.2f} M params, "
                f"{cfg.num_tokens()} tokens/clip, latent {cfg.latent_shape()}, "
                f"time shift {system.shift:.2f}")
        else:
            log(f"autoencoder: {count_params(state.params) / 1e6:.2f} M params, video "
                f"{system.video_shape} -> latent {cfg.latent_shape()}")
        per_step = ("GFLOP/step counted from each packed batch's real tokens" if packed
                    else f"{flops / 1e9:.1f} GFLOP/step")
        if encoder_flops:
            per_step += f" (frozen encoders {encoder_flops / 1e9:.1f})"
        log(f"train step: compiled in {compile_s:.1f} s, {per_step}; peak "
            f"{peak / 1e9:.0f} GFLOP/s on {jax.device_count()} device(s) ({peak_src})")

        if start == 0:
            ev = _evaluate(eval_fn, state, eval_batch, eval_key)
            writer.write(0, ev)
            log(f"step 0: {_describe(system, ev)}")
        if samples is not None and samples.due(start) and sampled < start:
            _validation_samples(samples, start, state, log)
            sampled = start

        def meta() -> dict:
            return {"data_iterator": data_iter.get_state(), "config": to_dict(cfg),
                    "system": system.kind, "samples_through": sampled}

        pbar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True,
                    mininterval=1.0, disable=not primary)
        pending, window_t, window_steps = None, time.perf_counter(), 0
        window_flops = window_tokens = 0.0
        preempted = stop_reason = None
        for step in range(start, tc.steps):
            if step > start:
                host = next(data_iter)
                guard.remember(step + 1, host.get("seed", []))
                batch = trainer.device_batch(host)
            state, metrics = compiled(state, batch)
            done = step + 1
            # Read the previous step's metrics: the device is busy with this one meanwhile.
            if pending is not None:
                p_step, p_metrics = pending
                jax.block_until_ready(p_metrics)  # keep at most one step in flight
                stop_reason = guard.observe(p_step, bool(p_metrics["skipped"]))
                if p_step % tc.log_every == 0 or p_step == start + 1:
                    now = time.perf_counter()
                    elapsed = max(now - window_t, 1e-9)
                    sec = elapsed / max(window_steps, 1)
                    flops_per_s = window_flops / elapsed
                    values = {k: float(v) for k, v in jax.device_get(p_metrics).items()}
                    values.update(step_time_s=sec, tokens_per_s=window_tokens / elapsed,
                                  flops_per_s=flops_per_s, mfu=flops_per_s / peak)
                    window_t, window_steps, window_flops, window_tokens = now, 0, 0.0, 0.0
                    writer.write(p_step, values)
                    pbar.set_postfix(loss=f"{values['loss']:.4f}", s_step=f"{sec:.2f}",
                                     tok_s=f"{values['tokens_per_s']:.0f}",
                                     gflops=f"{values['flops_per_s'] / 1e9:.1f}",
                                     mfu=f"{100 * values['mfu']:.1f}%")
            pending = (done, metrics)
            window_steps += 1
            batch_flops, batch_tokens = step_work(host)
            window_flops += batch_flops
            window_tokens += batch_tokens
            pbar.update(1)
            if done % tc.eval_every == 0 or done == tc.steps:
                jax.block_until_ready(state)  # this step's time stays in the window
                eval_start = time.perf_counter()
                ev = _evaluate(eval_fn, state, eval_batch, eval_key)
                writer.write(done, ev)
                pbar.write(f"step {done}: {_describe(system, ev)}")
                # Keep eval out of step time by moving the window's start past it; emptying
                # the window instead made the next logged step report 0 tokens/s and MFU.
                window_t += time.perf_counter() - eval_start
            if watch.requested(done):
                preempted = done
            # Not when stopping: a resumed run samples this step (checkpoints' samples_through).
            if samples is not None and samples.due(done) and not (preempted or stop_reason):
                jax.block_until_ready(state)  # this step's time stays in the window
                sample_start = time.perf_counter()
                _validation_samples(samples, done, state, pbar.write)
                sampled = done
                window_t += time.perf_counter() - sample_start  # kept out of step time
            if (done % tc.checkpoint_every == 0 or done == tc.steps or preempted
                    or stop_reason):
                align_processes("checkpoint")
                if system.kind == "autoencoder":  # latent statistics travel with each checkpoint
                    state = state.replace(stats=stats_fn(state.ema_params, stats_videos))
                try:
                    ckpt.save(done, state, meta())
                except OSError as e:  # a full or failing disk: keep what is saved, stop clean
                    ckpt.abandon()
                    writer.close()
                    raise TrainingStopped(
                        f"saving the checkpoint of step {done} failed ({e}); the previous "
                        f"checkpoint (step {ckpt.latest_step()}) is kept in "
                        f"{run_dir / 'checkpoints'}. Free space, then run the same command "
                        "to resume.") from None
            if preempted or stop_reason:
                break
        pbar.close()
        if pending is not None:
            writer.write(pending[0], {k: float(v) for k, v in jax.device_get(pending[1]).items()})
        ckpt.close()
        writer.close()
        if stop_reason:
            raise TrainingStopped(f"{stop_reason}. The last good state is checkpointed in "
                                  f"{run_dir / 'checkpoints'} at step {done} for inspection.")
        if preempted:
            log(f"preemption notice: stopped at step {preempted}, checkpoint saved; "
                "run the same command to resume")
            return {"run_dir": str(run_dir), "preempted_at": preempted}

        if not primary:
            return {"run_dir": str(run_dir), "process": jax.process_index()}
        records = read_metrics(writer.path)
        plot_losses(records, run_dir / "loss.png")
        summary = _summarise(system, records, run_dir, log)
        summary["compile_s"] = compile_s
        if system.kind == "autoencoder":
            from vdit.data.video_io import write_gif
            from vdit.train.autoencoder_system import side_by_side

            frames = side_by_side(system, state.ema_params, eval_batch["video"][:4])
            gif = write_gif(run_dir / "reconstructions.gif", frames, cfg.data.world.fps)
            log(f"reconstructions (original | reconstruction): {gif}")
            summary["reconstructions"] = str(gif)
        elif tc.sample_at_end:
            from vdit.sample.generate import Marking, free_samples_dir, sample_run

            marking = Marking(run_id=f"{run_dir.resolve().name}@{tc.steps}")
            out = free_samples_dir(run_dir)  # a resumed run keeps its earlier samples
            paths = sample_run(cfg, trainer.system, state.ema_params, state.stats, out,
                               marking=marking)
            log(f"samples: {len(paths)} files in {out}")
            summary["samples"] = [str(p) for p in paths]
    return summary
