"""`vdit plan`'s command line and its table (or one JSON line with --json)."""

from __future__ import annotations

import argparse
import json
import math
import sys


def _gib(b: float | None) -> str:
    return "-" if b is None or (isinstance(b, float) and math.isnan(b)) else f"{b / 2**30:.2f} GiB"


def format_plan(r: dict) -> str:
    """The plan as a table: per-chip memory, FLOPs, expected step time, the verdict."""
    hbm, usable = r["hbm_bytes"], r["usable_fraction"] * r["hbm_bytes"]
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    estimate = r["platform"] == "gpu"
    lines = [
        f"target        {r['target']}: {r['chips']} x {r['device_kind']}, {r['hosts']} hosts"
        + (f", {r['slices']} slices" if r["slices"] > 1 else "")
        + (f" (libtpu topology {r['topology']})" if r["topology"] else ""),
        f"model         {r['params'] / 1e9:.3f} B params, {r['tokens_per_clip']} tokens/clip, "
        f"batch {r['batch_size']}, {r['dtype']}, remat {r['remat']}, attention {r['attention']}",
        f"mesh          {mesh}",
        f"source        {r['source']}" + (" -- ESTIMATE" if estimate else ""),
        "",
        "per chip                     bytes",
        f"  params + EMA (f32)    {_gib(r['param_bytes']):>12}",
        f"  optimizer state       {_gib(r['opt_bytes']):>12}",
        f"  other state + batch   {_gib(r['other_state_bytes'] + r['batch_bytes']):>12}",
        f"  temporaries           {_gib(r['temp_bytes']):>12}"
        + ("  (estimated: activations by remat, gradients, update)" if estimate else ""),
        f"  peak                  {_gib(r['peak_bytes']):>12}",
        f"  HBM per chip          {_gib(hbm):>12}  (usable {100 * r['usable_fraction']:.0f}"
        f" %: {_gib(usable)})",
    ]
    if r.get("compiled_args") is not None:
        counted = r["param_bytes"] + r["opt_bytes"] + r["other_state_bytes"] + r["batch_bytes"]
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
           + (" (counts a scanned layer stack once)" if r["scan_layers"] else "")),
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
