"""`vdit plan`: will this config fit that pod, and how fast will it step?

For a TPU target the real train step (the one `vdit/train/trainer.py` jits: same system,
optimizer, state shardings, step function, mesh and logical-axis rules) is lowered on libtpu's
compile-only devices for the slice and compiled ahead of time on this host, from abstract
values only (`jax.eval_shape`, ShapeDtypeStructs with shardings): nothing of the model is
allocated. The TPU compiler's `memory_analysis()` gives per-chip bytes; parameter and optimizer
bytes are also counted from the sharded abstract state and checked against the compiled
program's argument bytes. GPU targets have no compiler here: their figures are an analytic
estimate (vdit/train/plan_estimate.py), labelled so.

The system and its abstract TrainState are the trainer's own (`make_system`,
`vdit.train.state.abstract_state` over `system.stats_shapes()`), so a LoRA config
(`train.lora`) plans the LoRA step: adapters as the params, their EMA and Adam moments, the
frozen base bf16 in `TrainState.stats["base"]`, sharded like a full run's params. The per-chip
bytes are split into frozen weights (that base, the frozen VAE and text encoder), the trained
params (or adapters) with their EMA, the optimizer state, the rest of the state, the batch and
the temporaries (activations kept for the backward pass by `model.remat`, gradients, update).
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
import numpy as np
import optax

from vdit.config import Config, ConfigError
from vdit.diffusion.lora_system import make_system
from vdit.diffusion.text_to_video import TextToVideo
from vdit.parallel.mesh import axis_sizes, batch_sharding, make_mesh
from vdit.parallel.rules import MESH_AXES, get_rules
from vdit.parallel.topologies import Target, parse_target, tpu_devices
from vdit.scaling.flops import train_flops_per_step
from vdit.train import state as train_state
from vdit.train.plan_estimate import estimate_temporaries, lora_kept_widths, suggestions
from vdit.train.state import TrainState, make_optimizer
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


# Stats that are frozen weights (the rest are latent statistics and the empty caption): a LoRA
# run's DiT base (diffusion/lora_system.py), the frozen autoencoder and the in-step text encoder.
FROZEN_STATS = ("base", "autoencoder", "text_encoder")

# What each `model.remat` keeps for the backward pass (vdit/models/dit.py REMAT_POLICIES).
REMAT_KEEPS = {
    "none": "every activation of every block kept",
    "full": "each block's input kept, the block recomputed in the backward pass",
    "dots": "matmul and fused-attention outputs kept, element-wise work recomputed",
}
# vdit's remat policies keep what they keep in device memory: none offloads to the host, which
# jax's offloading policies (jax.checkpoint_policies.offload_dot_with_no_batch_dims,
# save_and_offload_only_these_names: saved values to the "pinned_host" memory space) would do.
OFFLOAD = "none (vdit's remat policies keep saved values in device memory)"


def _tracing(mesh):
    """Where the system and its state are traced: under a TPU mesh's abstract mesh, so the
    Pallas TPU kernel traces for TPU rather than in its interpret mode (which cannot be
    remat'd), while keys and other eager values stay on this host."""
    abstract = mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh
    return jax.sharding.use_abstract_mesh(abstract)


def plan_system(cfg: Config, target: Target, mesh) -> TextToVideo:
    """The system the trainer builds for `cfg` (`make_system`: LoRA where train.lora is on). A
    GPU plan compiles nothing, so its shapes are traced with XLA attention (a GPU or TPU
    kernel would run in interpret mode on this host)."""
    if target.platform != "tpu":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla"))
    with _tracing(mesh):
        return make_system(cfg)


def abstract_state(system: TextToVideo, tx: optax.GradientTransformation, mesh,
                   rules) -> TrainState:
    """The TrainState the trainer creates, as ShapeDtypeStructs with its shardings: the
    trainer's own layout (`vdit.train.state.abstract_state` over `system.stats_shapes()`):
    params and EMA by the logical-axis table, optimizer moments as their params, the stats the
    system shards (a LoRA run's base) by the table, everything else replicated."""
    with _tracing(mesh), nn.logical_axis_rules(rules):
        return train_state.abstract_state(system, tx, system.stats_shapes(), mesh, rules)


def state_split(state: TrainState) -> dict[str, int]:
    """Per-chip bytes of the state by kind; the parts add up to `per_chip_bytes(state)`."""
    frozen = {k: v for k, v in state.stats.items() if k in FROZEN_STATS}
    rest = {k: v for k, v in state.stats.items() if k not in FROZEN_STATS}
    return {
        "frozen_base_bytes": per_chip_bytes(frozen.pop("base", {})),
        "frozen_encoder_bytes": per_chip_bytes(frozen),
        "param_bytes": per_chip_bytes(state.params) + per_chip_bytes(state.ema_params),
        "opt_bytes": per_chip_bytes(state.opt_state),
        "other_state_bytes": per_chip_bytes((state.step, state.rng, rest)),
    }


def hosts_per_group(mesh, axis: str, hosts: int) -> int:
    """Hosts one group of devices along mesh axis `axis` spans (the most over all groups): 1
    while its collectives stay inside a host; a TPU slice's groups across hosts still talk over
    ICI. A GPU target's abstract mesh has no devices: they are taken node-major, as
    `vdit.parallel.mesh.device_grid` lays them out (slices, i.e. nodes, outermost)."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        per_host = mesh.size // hosts
        grid = np.arange(mesh.size).reshape(mesh.axis_sizes) // per_host
    else:
        grid = np.vectorize(lambda d: d.process_index)(mesh.devices)
    grid = np.moveaxis(grid, mesh.axis_names.index(axis), -1)
    return max(len(set(row.tolist())) for row in grid.reshape(-1, grid.shape[-1]))


def memory_kinds(mesh) -> list[str]:
    """The memory spaces a target's devices offer (TPU: device, pinned_host, unpinned_host);
    empty where no device is described here (GPU)."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return []
    return sorted(m.kind for m in mesh.devices.flat[0].addressable_memories())


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
    tx, rules = make_optimizer(cfg.train), get_rules(cfg.mesh.rules, cfg.mesh.rule_overrides)
    if target.platform == "tpu":
        mesh = make_mesh(cfg.mesh, tpu_devices(target))
    else:
        mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    system = plan_system(cfg, target, mesh)
    try:
        state = abstract_state(system, tx, mesh, rules)
        state_b = per_chip_bytes(state)  # an abstract mesh checks divisibility only here
    except ValueError as e:  # jax's IndivisibleError: a parameter dim the mesh cannot split
        raise ConfigError(f"mesh: {' '.join(str(e).split())[:300]}; on {target.name} use a "
                          "smaller fsdp/tensor axis (e.g. mesh.fsdp=8 mesh.data=-1)") from None
    batch = abstract_batch(cfg, system, mesh)
    split = state_split(state)
    batch_b = per_chip_bytes(batch)
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    lora = cfg.train.lora.enabled
    n_params = (sum(math.prod(x.shape) for x in jax.tree.leaves(state.stats["base"])) if lora
                else trainable)
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
        "trainable_params": trainable,
        "lora": {"rank": cfg.train.lora.rank, "targets": len(system.targets)} if lora else None,
        "tokens_per_clip": cfg.num_tokens(), "batch_size": cfg.train.batch_size,
        "dtype": cfg.model.dtype, "remat": cfg.model.remat, "remat_keeps": REMAT_KEEPS[
            cfg.model.remat], "offload": OFFLOAD, "memory_kinds": memory_kinds(mesh),
        "context_hosts": (hosts_per_group(mesh, "context", target.hosts) if sizes["context"] > 1
                          else None),
        "scan_layers": cfg.model.scan_layers,
        "microbatches": getattr(cfg.train, "microbatches", 1),
        **split, "state_bytes": state_b,
        "batch_bytes": batch_b, "hbm_bytes": target.generation.hbm_bytes,
        "usable_fraction": USABLE_HBM,
    }
    if target.platform == "tpu":
        result.update(_compile_tpu(cfg, system, tx, mesh, rules, state, batch))
    else:
        extra = lora_kept_widths(system.targets, cfg.train.lora.rank, cfg.model) if lora else 0.0
        temp = estimate_temporaries(cfg, sizes, split["param_bytes"] // 2, extra)
        result.update(source="analytic estimate (no GPU compiler on this host)",
                      temp_bytes=temp, xla_flops=None, args_agree=None, compiled_args=None,
                      peak_bytes=state_b + batch_b + temp)
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
        # values a remat policy offloads to host memory (pinned_host) live there, not in HBM
        "host_temp_bytes": getattr(mem, "host_temp_size_in_bytes", 0) or 0,
        "xla_peak_bytes": float(getattr(mem, "peak_memory_in_bytes", 0) or 0),
        "tiled_args": tiled, "args_agree": abs(mem.argument_size_in_bytes - tiled) <= 0.001 * tiled,
        "xla_flops": float(cost.get("flops", float("nan"))) * mesh.size,
        "lower_s": lower_s, "compile_s": compile_s,
    }
