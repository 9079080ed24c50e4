"""Where a train step's time goes: per-op times from a profiler trace, by category.

    JAX_PLATFORMS=cpu python tools/profile_step.py experiments/bench_cpu.yaml model.depth=2
    python tools/profile_step.py experiments/bench_gpu.yaml --save trace.json.gz    # a GPU

Runs one traced step (after two untraced ones) with XLA:CPU's per-op trace events on, reads the
Perfetto trace the JAX profiler writes, maps each op to the model code that made it (the HLO
`op_name` metadata) and prints the slowest ops and the time per category: linear-layer matmuls,
the attention core, element-wise work (by primitive). `JAX_PLATFORMS=cpu` keeps libtpu's
profiler plugin out (it crashes the profiler on a machine without a TPU). Op times of ops
that ran concurrently overlap, so they add up to more than the step's wall time. On a GPU the
device's own events (kernels on its streams, named by their HLO op) are counted, not the host's.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):  # XLA:CPU emits no per-op events else
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # after XLA_FLAGS: the flags are read when jax starts

from vdit import host_allocator
from vdit.config import load_config
from vdit.train.bench import WarmStep

_RUNTIME = ("Thunk", "$", "Pjit", "Slinky", "CommonPjRt", "ParseArguments", "end: ")


def op_names(hlo: str) -> dict[str, str]:
    """HLO instruction name -> its `op_name` metadata (the JAX code path that emitted it)."""
    names = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]*)\"", line)
        if m:
            names.setdefault(m.group(1), m.group(2))
    return names


def device_events(events: list[dict]) -> list[dict]:
    """The events of the accelerator's processes (a GPU's streams) where the trace has any, else
    all of them (XLA:CPU runs its ops on host threads)."""
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and re.search(r"/device:(GPU|TPU)", str(e.get("args", {}).get("name", "")))}
    return [e for e in events if e.get("pid") in devices] if devices else events


def op_of(event: dict) -> str:
    """The HLO instruction an event ran. A GPU kernel names its instruction in args.hlo_op,
    unless it ran in a CUDA graph (hlo_op `command_buffer_N`): then the kernel's own name is its
    fusion's name with `_` for `.` (loop_add_fusion_3 is loop_add_fusion.3), or a library
    kernel's (cuBLAS `nvjet_*`, cuDNN `cudnn_*`)."""
    hlo_op = event.get("args", {}).get("hlo_op", "")
    return event["name"] if not hlo_op or hlo_op.startswith("command_buffer") else hlo_op


def category(op_name: str) -> str:
    if re.search(r"sdpa|fmha|flash|cudnn", op_name):
        return "attention core (cuDNN)"
    if re.match(r"(nvjet|sm\d+_xmma|cutlass|.*gemm)", op_name):
        return "matmuls (linear layers, cross-attention)"
    if "self_attn" in op_name:
        inner = op_name.split("self_attn", 1)[1]
        if not re.search(r"/(qkv|out)/|norm|rope", inner):
            return "attention core (self)"
    if op_name.endswith("dot_general"):
        return "matmuls (linear layers, cross-attention)"
    if (op_name.startswith("jit(") and "DiT" not in op_name) or op_name.startswith("state."):
        # fusions named after a state leaf (state.params[...]) are the per-leaf updates
        return "outside the model: optimizer, EMA, loss, noise"
    return "element-wise: " + op_name.rsplit("/", 1)[-1]


def main() -> int:
    host_allocator.ensure()  # the same allocator `vdit bench` runs under (vdit/host_allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--top", type=int, default=15, help="slowest ops to list")
    parser.add_argument("--save", help="copy the Perfetto trace here (open in ui.perfetto.dev)")
    args = parser.parse_args()
    step = WarmStep(load_config(args.config, args.overrides))
    trace_dir = Path(tempfile.mkdtemp(prefix="vdit-profile-"))
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    wall = step.run()
    jax.profiler.stop_trace()
    compiled = step.compiled
    traces = sorted(trace_dir.glob("**/*.trace.json.gz"))
    if not traces:
        print(f"error: the profiler wrote no Perfetto trace under {trace_dir}", file=sys.stderr)
        return 1
    if args.save:
        shutil.copy(traces[-1], args.save)
    with gzip.open(traces[-1]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: collections.Counter[str] = collections.Counter()
    for e in device_events(events):
        if e.get("ph") == "X" and not e["name"].startswith(_RUNTIME):
            per_op[op_of(e)] += e["dur"] / 1e6
    names = op_names(compiled.as_text())
    names.update({re.sub(r"[.\-]", "_", k): v for k, v in names.items()})  # GPU kernel names
    by_category: collections.Counter[str] = collections.Counter()
    for op, seconds in per_op.items():
        # an op without metadata (a copy XLA inserted) counts under its kind: copy.12 -> copy
        by_category[category(names.get(op, re.sub(r"\.\d+$", "", op)))] += seconds
    total = sum(per_op.values())
    print(f"traced step {wall:.2f} s wall, {total:.2f} s of op time ({trace_dir})")
    print(f"\nslowest {args.top} ops:")
    for op, seconds in per_op.most_common(args.top):
        print(f"  {1e3 * seconds:8.1f} ms  {op:24s} {names.get(op, '?')[-90:]}")
    print("\nby category:")
    for name, seconds in by_category.most_common():
        if seconds >= 0.001 * total:
            print(f"  {1e3 * seconds:8.1f} ms  {100 * seconds / total:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
