"""`vdit plan`'s command line and its table (or one JSON line with --json)."""

from __future__ import annotations

import argparse
import json
import math
import sys


def _gib(b: float | None) -> str:
    """Bytes in GiB; below 1 GiB in MiB, below 1 MiB in KiB (a small model's split reads)."""
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if b == 0 or abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b / 2**10:.2f} KiB"


def format_plan(r: dict) -> str:
    """The plan as a table: per-chip memory, FLOPs, expected step time, the verdict."""
    hbm, usable = r["hbm_bytes"], r["usable_fraction"] * r["hbm_bytes"]
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    estimate = r["platform"] == "gpu"
    lora = r.get("lora")
    trained = "adapters + EMA (f32)  " if lora else "params + EMA (f32)    "
    model = (f"model         {r['params'] / 1e9:.3f} B params"
             + (f" (frozen), LoRA rank {lora['rank']} on {lora['targets']} target kernels: "
                f"{r['trainable_params'] / 1e6:.1f} M trained" if lora else "")
             + f", {r['tokens_per_clip']} tokens/clip, batch {r['batch_size']}, {r['dtype']}, "
             f"attention {r['attention']}")
    offload = (f"{_gib(r['host_temp_bytes'])} of temporaries in pinned_host"
               if r.get("host_temp_bytes") else r["offload"])
    remat = f"remat         {r['remat']}: {r['remat_keeps']}; host offload: {offload}"
    if r.get("memory_kinds"):
        remat += f"; the target's memory spaces: {', '.join(r['memory_kinds'])}"
    context = ""
    if r.get("context_hosts"):
        context = (f" (each context group spans {r['context_hosts']} host"
                   f"{'s' if r['context_hosts'] > 1 else ''})")
    lines = [
        f"target        {r['target']}: {r['chips']} x {r['device_kind']}, {r['hosts']} hosts"
        + (f", {r['slices']} slices" if r["slices"] > 1 else "")
        + (f" (libtpu topology {r['topology']})" if r["topology"] else ""),
        model,
        f"mesh          {mesh}{context}",
        remat,
        f"source        {r['source']}" + (" -- ESTIMATE" if estimate else ""),
        "",
        "per chip                     bytes",
        f"  frozen DiT base (bf16){_gib(r['frozen_base_bytes']):>12}"
        + ("" if lora else "  (none: every DiT weight trains)"),
        f"  frozen VAE / text enc {_gib(r['frozen_encoder_bytes']):>12}",
        f"  {trained}{_gib(r['param_bytes']):>12}",
        f"  optimizer state       {_gib(r['opt_bytes']):>12}",
        f"  other state + batch   {_gib(r['other_state_bytes'] + r['batch_bytes']):>12}",
        f"  = state + batch       {_gib(r['state_bytes'] + r['batch_bytes']):>12}",
        f"  activations + temps   {_gib(r['temp_bytes']):>12}"
        + ("  (estimated: activations kept by remat, one layer's working set, gradients, "
           "update)" if estimate else "  (the compiler's temporaries: activations kept by "
           "remat, the layer recomputed, gradients, update)"),
        f"  peak                  {_gib(r['peak_bytes']):>12}",
        *([f"  host memory (offload) {_gib(r['host_temp_bytes']):>12}  (temporaries the "
           "compiler placed in pinned_host, outside HBM)"] if r.get("host_temp_bytes") else []),
        f"  HBM per chip          {_gib(hbm):>12}  (usable {100 * r['usable_fraction']:.0f}"
        f" %: {_gib(usable)})",
    ]
    if r.get("compiled_args") is not None:
        counted = r["state_bytes"] + r["batch_bytes"]
        agree = "AGREE" if r["args_agree"] else "DISAGREE"
        lines.append(f"  check: state + batch from the sharded shapes {counted:,} B, in the "
                     f"compiled TPU tile layouts {r['tiled_args']:,} B; memory_analysis() "
                     f"argument bytes {r['compiled_args']:,} B: {agree}")
    elif r.get("compile_error"):
        lines.append(f"  the TPU compiler refused the program: {r['compile_error']}")
    xla = r.get("xla_flops")
    lines += [
        "",
        f"FLOPs/step    {r['flops_per_step'] / 1e15:.2f} PFLOP (exact model count, "
        f"vdit/scaling/flops.py)"
        + ("" if xla is None else f"; XLA cost_analysis {xla / 1e15:.2f} PFLOP"
           + (" (counts a scanned layer stack once)" if r["scan_layers"] else ""))
        + ("; 3 x forward, of which a LoRA step skips the frozen base's weight gradients"
           if lora else ""),
        f"peak          {r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 dense per chip "
        f"(datasheet)",
        f"step time     {r['step_s']:.3f} s at {100 * r['mfu']:.0f} % MFU "
        f"({r['tokens_per_s']:.0f} tokens/s)",
        "",
    ]
    lines += [f"NOTE: {note}" for note in r["notes"]]
    if r["fits"]:
        lines.append(f"FITS          peak {_gib(r['peak_bytes'])} of {_gib(usable)} usable "
                     f"({100 * r['peak_bytes'] / hbm:.0f} % of HBM)")
    else:
        lines.append(f"WARNING: DOES NOT FIT: peak {_gib(r['peak_bytes'])} per chip > "
                     f"{_gib(usable)} usable of {_gib(hbm)} HBM. Try:")
        lines += [f"  - {fix}" for fix in r["fixes"]]
    timing = f"planned in {r['plan_s']:.0f} s"
    if "compile_s" in r:
        timing += f" (lower {r['lower_s']:.0f} s, compile {r['compile_s']:.0f} s)"
    lines.append(timing)
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    from vdit.config import load_from_command_line
    from vdit.train.plan import plan

    cfg = load_from_command_line(args.config, args.overrides)
    result = plan(cfg, args.topology, mfu=args.mfu)
    print(json.dumps(result) if args.json else format_plan(result))
    if not result["fits"]:
        print(f"vdit plan: {args.config} does not fit {args.topology}", file=sys.stderr)
    return 0 if result["fits"] else 1


def register(sub) -> None:
    """Add `vdit plan` to the CLI's subparsers."""
    from vdit.parallel.topologies import ALLOWED

    p = sub.add_parser("plan", help="compile the train step ahead of time for a TPU slice (or "
                       "estimate it for GPU nodes): per-chip memory, FLOPs, step time, fit")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.fsdp=-1")
    p.add_argument("--topology", required=True, help=ALLOWED)
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOPs utilisation the step time assumes (default 0.4)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_plan)
