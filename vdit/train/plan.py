"""`vdit plan`: will this config fit that pod, and how fast will it step?

For a TPU target the real train step (the one `vdit/train/trainer.py` jits: same system,
optimizer, state shardings, step function, mesh and logical-axis rules) is lowered on libtpu's
compile-only devices for the slice and compiled ahead of time on this host, from abstract
values only (`jax.eval_shape`, ShapeDtypeStructs with shardings): nothing of the model is
allocated. The TPU compiler's `memory_analysis()` gives per-chip bytes; parameter and optimizer
bytes are also counted from the sharded abstract state and checked against the compiled
program's argument bytes. GPU targets have no compiler here: their figures are an analytic
estimate (vdit/train/plan_estimate.py), labelled so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from vdit.config import Config, ConfigError
from vdit.diffusion.text_to_video import TextToVideo
from vdit.parallel.mesh import axis_sizes, batch_sharding, make_mesh
from vdit.parallel.rules import MESH_AXES, get_rules
from vdit.parallel.topologies import Target, parse_target, tpu_devices
from vdit.scaling.flops import train_flops_per_step
from vdit.train.plan_estimate import estimate_temporaries, suggestions
from vdit.train.state import TrainState, make_optimizer, opt_state_shardings, param_shardings
from vdit.train.step import train_step

# The runtime keeps part of HBM for itself (program, collectives' buffers, fragmentation): a
# plan whose peak is above this fraction of a chip's HBM is reported as not fitting.
USABLE_HBM = 0.92


def _pallas_fits_tpu(head_dim: int) -> bool:
    return head_dim == 64 or head_dim % 128 == 0  # as vdit/ops/attention.py's dispatch


def for_target(cfg: Config, target: Target) -> tuple[Config, str]:
    """The config as it will run on `target`: `auto`/`pallas` attention resolved the way the
    dispatch resolves them on that platform (this host's backend is a CPU)."""
    impl, head_dim = cfg.model.attention, cfg.model.width // cfg.model.heads
    if target.platform == "tpu" and impl in ("auto", "pallas"):
        resolved = "pallas_tpu" if _pallas_fits_tpu(head_dim) or impl == "pallas" else "xla"
        note = f"{resolved} ({impl} on TPU)"
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                  attention=resolved)), note
    return cfg, impl


def abstract_stats(cfg: Config, system: TextToVideo) -> dict:
    """Shapes of TrainState.stats: per-channel latent mean/std, the frozen autoencoder's
    params (their shapes from its init; no checkpoint is read) and, for caption embeddings
    (`text.encoder` t5 or precomputed), the empty caption (+ the in-step T5's params, whose
    shapes come from its config.json)."""
    channels = system.latent_shape[-1]
    w = cfg.data.world
    video = jax.ShapeDtypeStruct((1, w.frames, w.height, w.width, 3), jnp.float32)
    ae = {} if cfg.autoencoder.kind == "space_to_depth" else nn.unbox(
        jax.eval_shape(system.autoencoder.init, jax.random.key(0), video))
    vec = jax.ShapeDtypeStruct((channels,), jnp.float32)
    text = {}
    if system.embedded:
        from vdit.data.captions import text_stats_shapes

        text = text_stats_shapes(cfg)
    return {"mean": vec, "std": vec, "autoencoder": ae, **text}


def abstract_state(cfg: Config, system: TextToVideo, tx: optax.GradientTransformation,
                   mesh, rules) -> TrainState:
    """The TrainState `create_state` would build, as ShapeDtypeStructs carrying the shardings
    the trainer gives it: params and EMA by the logical-axis table, optimizer moments mirroring
    the params (`opt_state_shardings`), everything else replicated."""
    # Shapes do not depend on the attention kernel; tracing XLA attention keeps Pallas (its
    # interpret mode on this host) out of the remat'd init. Outside the mesh: keys live here.
    shaper = TextToVideo(dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, attention="xla")))
    p_shard = param_shardings(shaper, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def init(key, stats):
        params = nn.unbox(shaper.init(key))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.fold_in(key, 1)), stats=stats)

    shapes = jax.eval_shape(init, jax.random.key(cfg.train.seed), abstract_stats(cfg, shaper))
    shardings = jax.tree.map(lambda _: replicated, shapes)
    opt_shard = opt_state_shardings(tx, shapes.opt_state, p_shard, replicated)
    shardings = shardings.replace(params=p_shard, ema_params=p_shard, opt_state=opt_shard)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)


def abstract_batch(cfg: Config, system: TextToVideo, mesh) -> dict:
    """One global batch as the loop feeds it: uint8 video (physics) or stored latents (shards),
    the caption's token ids, and with `text.encoder: precomputed` its stored embeddings
    [B, S, text.width] in text.dtype and their int32 mask (vdit/data/shard_pipeline.py)."""
    b, s = cfg.train.batch_size, cfg.text.max_length
    shard = batch_sharding(mesh)
    w = cfg.data.world
    if cfg.data.source == "shards":
        clip = jax.ShapeDtypeStruct((b, *system.latent_shape), jnp.bfloat16, sharding=shard)
        key = "latent"
    else:
        clip = jax.ShapeDtypeStruct((b, w.frames, w.height, w.width, 3), jnp.uint8, sharding=shard)
        key = "video"
    batch = {key: clip, "tokens": jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=shard)}
    if cfg.text.encoder == "precomputed":
        batch["text"] = jax.ShapeDtypeStruct((b, s, cfg.text.width), jnp.dtype(cfg.text.dtype),
                                             sharding=shard)
        batch["text_mask"] = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=shard)
    return batch


def per_chip_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def tiled_bytes(tree, formats) -> int:
    """Bytes one device holds of `tree` in the compiled program's layouts: TPU arrays are
    stored in tiles (e.g. (8, 128) over the two most minor dims; a scalar takes a 128-lane
    tile), so small or thin shards take more than their elements."""
    total = 0
    for x, fmt in zip(jax.tree.leaves(tree), jax.tree.leaves(
            formats, is_leaf=lambda f: hasattr(f, "layout")), strict=True):
        shard = x.sharding.shard_shape(x.shape)
        layout = fmt.layout
        if layout is None:  # an input the step never reads (caption ids beside their
            continue  # embeddings): jit drops it from the compiled program
        dims = [shard[i] for i in layout.major_to_minor] or [1]
        tile = layout.tiling[0] if layout.tiling else ()
        for j, t in enumerate(reversed(tile)):
            if j < len(dims):
                dims[-1 - j] = -(-dims[-1 - j] // t) * t
        total += math.prod(dims) * jnp.dtype(x.dtype).itemsize
    return total


@contextlib.contextmanager
def _no_persistent_cache():
    """An executable compiled for a described topology cannot be loaded back without a TPU
    client, so caching it would only make later runs warn."""
    # Disabling the cache alone does not stop a cache that is already in use from writing;
    # a minimum compile time nothing reaches does.
    keys = {"jax_enable_compilation_cache": False,
            "jax_persistent_cache_min_compile_time_secs": 1e9}
    before = {k: getattr(jax.config, k) for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


# The TPU compiler's refusals: "... HLO temporaries (42.88G) exceeds available HBM (15.75G)"
# (libtpu 0.0.5x), or "Used 98.1G of 95.7G hbm" (older releases). Units are binary.
_OOM = (re.compile(r"temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                   r"\(([\d.]+)([KMGT]?)\)"),
        re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.IGNORECASE))
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_oom(error: Exception) -> tuple[float, float, str] | None:
    """(bytes needed, bytes available, which) from a TPU compiler's out-of-HBM refusal, where
    `which` says whether `needed` counts temporaries only or everything; None for other
    errors."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    for pattern, which in zip(_OOM, ("temporaries", "total"), strict=True):
        m = pattern.search(text)
        if m:
            return (float(m.group(1)) * _UNIT[m.group(2).upper()],
                    float(m.group(3)) * _UNIT[m.group(4).upper()], which)
    return None


def mesh_sizes(cfg: Config, chips: int) -> dict[str, int]:
    """{axis: size} of the whole mesh on `chips` devices; across slices (`mesh.dcn_*`, where
    the config has them) the data and fsdp axes multiply."""
    dcn = (getattr(cfg.mesh, "dcn_data", 1), getattr(cfg.mesh, "dcn_fsdp", 1), 1, 1)
    return {a: s * d for a, s, d in zip(MESH_AXES, axis_sizes(cfg.mesh, chips), dcn,
                                        strict=True)}


def _check_context(cfg: Config, sizes: dict[str, int], target: str) -> None:
    """What the config check leaves to tracing, on the mesh as resolved for `target`: the
    planned clip's tokens must split over the context axis (a shards config's clip shape is
    data.world's here), and Ulysses needs the heads to split over context x tensor."""
    c, t, heads, n = sizes["context"], sizes["tensor"], cfg.model.heads, cfg.num_tokens()
    if c > 1 and cfg.data.batching != "pack" and n % c:
        raise ConfigError(f"mesh.context: {n} tokens per clip do not split {c} ways on "
                          f"{target}; use a context size that divides {n}")
    if c > 1 and cfg.model.context_parallel == "ulysses" and heads % (c * t):
        raise ConfigError(f"model.heads: ulysses splits the {heads} heads over mesh.context "
                          f"{c} x mesh.tensor {t} = {c * t} devices on {target}; use a "
                          f"context x tensor that divides {heads} or model.context_parallel="
                          "ring")


def plan(cfg: Config, target_name: str, mfu: float = 0.4) -> dict:
    """Compile (TPU) or estimate (GPU) the train step of `cfg` on `target_name`; one dict of
    per-chip bytes, FLOPs, expected step time and the verdict (see `format_plan`)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu: must be in (0, 1], got {mfu}")
    target = parse_target(target_name)
    cfg, attention = for_target(cfg, target)
    started = time.perf_counter()
    sizes = mesh_sizes(cfg, target.chips)
    batch_shards = sizes["data"] * sizes["fsdp"]
    if cfg.train.batch_size % batch_shards:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} does not split over "
                          f"data x fsdp = {batch_shards} devices of {target.name}; use a "
                          "multiple of it")
    _check_context(cfg, sizes, target.name)
    system, tx, rules = TextToVideo(cfg), make_optimizer(cfg.train), get_rules(cfg.mesh.rules)
    if target.platform == "tpu":
        mesh = make_mesh(cfg.mesh, tpu_devices(target))
    else:
        mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    try:
        state = abstract_state(cfg, system, tx, mesh, rules)
        per_chip_bytes(state)  # an abstract mesh checks divisibility only here
    except ValueError as e:  # jax's IndivisibleError: a parameter dim the mesh cannot split
        raise ConfigError(f"mesh: {' '.join(str(e).split())[:300]}; on {target.name} use a "
                          "smaller fsdp/tensor axis (e.g. mesh.fsdp=8 mesh.data=-1)") from None
    batch = abstract_batch(cfg, system, mesh)
    params_b = per_chip_bytes(state.params) + per_chip_bytes(state.ema_params)
    opt_b = per_chip_bytes(state.opt_state)
    other_b = per_chip_bytes((state.step, state.rng, state.stats))
    batch_b = per_chip_bytes(batch)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    notes = []
    if target.num_slices != getattr(cfg.mesh, "num_slices", 1):
        notes.append(f"{target.name} has {target.num_slices} slices/nodes but the mesh spans "
                     f"{getattr(cfg.mesh, 'num_slices', 1)}: set mesh.dcn_data (or dcn_fsdp) so "
                     "only data-parallel traffic crosses the slow network")
    if target.platform == "gpu" and cfg.model.attention == "pallas_tpu":
        notes.append("model.attention=pallas_tpu is a TPU kernel: use auto (cuDNN / Pallas GPU)")
    result = {
        "notes": notes, "target": target.name, "platform": target.platform,
        "device_kind": target.generation.device_kind, "chips": target.chips,
        "hosts": target.hosts, "slices": target.num_slices, "topology": target.topology,
        "mesh": sizes, "attention": attention, "params": n_params,
        "tokens_per_clip": cfg.num_tokens(), "batch_size": cfg.train.batch_size,
        "dtype": cfg.model.dtype, "remat": cfg.model.remat, "scan_layers": cfg.model.scan_layers,
        "microbatches": getattr(cfg.train, "microbatches", 1),
        "param_bytes": params_b, "opt_bytes": opt_b, "other_state_bytes": other_b,
        "batch_bytes": batch_b, "hbm_bytes": target.generation.hbm_bytes,
        "usable_fraction": USABLE_HBM,
    }
    if target.platform == "tpu":
        result.update(_compile_tpu(cfg, system, tx, mesh, rules, state, batch))
    else:
        temp = estimate_temporaries(cfg, sizes, params_b // 2)
        result.update(source="analytic estimate (no GPU compiler on this host)",
                      temp_bytes=temp, xla_flops=None, args_agree=None, compiled_args=None,
                      peak_bytes=params_b + opt_b + other_b + batch_b + temp)
    flops = train_flops_per_step(cfg)
    peak_flops = target.generation.peak_flops
    result.update(
        flops_per_step=flops, peak_flops_per_chip=peak_flops, mfu=mfu,
        step_s=flops / (target.chips * peak_flops * mfu),
        tokens_per_s=cfg.train.batch_size * cfg.num_tokens()
        / (flops / (target.chips * peak_flops * mfu)),
        fits=result["peak_bytes"] <= USABLE_HBM * target.generation.hbm_bytes,
        plan_s=time.perf_counter() - started,
    )
    result["fixes"] = [] if result["fits"] else suggestions(cfg, result)
    return result


def _compile_tpu(cfg: Config, system, tx, mesh, rules, state, batch) -> dict:
    """Lower and compile the trainer's jitted step for the TPU mesh; memory and cost analysis."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(partial(train_step, system=system, tx=tx, cfg=cfg.train),
                      in_shardings=(shardings, batch_sharding(mesh)),
                      out_shardings=(shardings, None), donate_argnums=0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), _no_persistent_cache():
        t0 = time.perf_counter()
        lowered = step_fn.lower(state, batch)
        lower_s = time.perf_counter() - t0
        try:
            compiled = lowered.compile()
        except Exception as e:  # the TPU compiler refuses programs that exceed HBM
            oom = compile_oom(e)
            if oom is None:
                raise
            needed, available, which = oom
            args = per_chip_bytes((state, batch))
            temp = needed if which == "temporaries" else max(needed - args, 0.0)
            return {"source": "TPU compiler (libtpu): refused, out of HBM", "compiled": False,
                    "compile_error": " ".join(str(e).split())[:300],
                    "compiler_hbm_bytes": available,
                    "temp_bytes": temp, "peak_bytes": args + temp,
                    "xla_flops": None, "args_agree": None, "compiled_args": None,
                    "lower_s": lower_s, "compile_s": time.perf_counter() - t0 - lower_s}
        compile_s = time.perf_counter() - t0 - lower_s
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list | tuple) and cost else cost) or {}
    tiled = tiled_bytes((state, batch), compiled.input_formats[0])
    # Arguments + outputs + temporaries, less the outputs aliased to donated arguments (the new
    # state reuses the old one's buffers): an upper bound on the live bytes, as `vdit bench`
    # reports; XLA's own heap-simulation peak is kept as `xla_peak_bytes`.
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    return {
        "source": "TPU compiler (libtpu), compiled ahead of time", "compiled": True,
        "compiled_args": mem.argument_size_in_bytes, "compiled_outputs": mem.output_size_in_bytes,
        "compiled_alias": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "code_bytes": mem.generated_code_size_in_bytes, "peak_bytes": float(peak),
        "xla_peak_bytes": float(getattr(mem, "peak_memory_in_bytes", 0) or 0),
        "tiled_args": tiled, "args_agree": abs(mem.argument_size_in_bytes - tiled) <= 0.001 * tiled,
        "xla_flops": float(cost.get("flops", float("nan"))) * mesh.size,
        "lower_s": lower_s, "compile_s": compile_s,
    }
