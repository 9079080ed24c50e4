"""Compare two variants of the train step on a noisy machine: their steps alternate in one
process (A, B, A, B, ...), so drift in the machine's speed (turbo, neighbours on a VM) hits
both alike, and the per-round ratio B/A is what is reported.

    python tools/ab_step.py CONFIG [overrides ...] --b "model.remat=dots" [--rounds 10]
    python tools/ab_step.py CONFIG --b-xla "xla_cpu_use_onednn=true"   # an XLA option

A is CONFIG with its overrides; B is A with the `--b` overrides on top, compiled with the
`--b-xla` options (XLA_FLAGS names without dashes; they apply to B's compile only, which
process-wide XLA_FLAGS cannot do). Both variants' states stay in memory. Separate `vdit bench`
runs of one configuration differ by up to 20 % on the 2-core development VM, while the
alternating ratio of one change held within a few percent over ten rounds
(docs/performance.md). Code changes: give the change a config switch, or run the tool once
per commit and compare the ratios.
"""

from __future__ import annotations

import argparse
import shlex
import statistics

from vdit import host_allocator
from vdit.cli import NON_NEGATIVE, POSITIVE
from vdit.config import load_config
from vdit.train.bench import WarmStep


def xla_options(text: str) -> dict[str, bool | int | str]:
    """ "a=true b=512 c=x" -> {"a": True, "b": 512, "c": "x"}; a bad item is a usage error."""
    out: dict[str, bool | int | str] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--b-xla: {item!r} is not NAME=VALUE")
        low = value.lower()
        out[key.lstrip("-")] = (low == "true" if low in ("true", "false")
                                else int(value) if value.lstrip("-").isdigit() else value)
    return out


def main() -> int:
    host_allocator.ensure()  # the allocator `vdit bench` runs under (vdit/host_allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="overrides of both A and B")
    parser.add_argument("--b", default="", help='overrides of B only, e.g. "model.remat=dots"')
    parser.add_argument("--b-xla", default="", help='XLA options of B only, e.g. '
                        '"xla_cpu_use_onednn=true xla_cpu_prefer_vector_width=512"')
    parser.add_argument("--rounds", type=POSITIVE, default=10, help="timed steps of each variant")
    parser.add_argument("--warmup", type=NON_NEGATIVE, default=2,
                        help="untimed steps of each first")
    args = parser.parse_args()
    b_overrides, b_xla = shlex.split(args.b), xla_options(args.b_xla)
    if not b_overrides and not b_xla:
        parser.error("B needs --b overrides or --b-xla options (else it is A)")
    steps = {"A": WarmStep(load_config(args.config, args.overrides), args.warmup),
             "B": WarmStep(load_config(args.config, [*args.overrides, *b_overrides]),
                           args.warmup, compiler_options=b_xla)}
    for name, step in steps.items():
        print(f"{name}: compiled in {step.compile_s:.1f} s")
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(args.rounds):
        for name, step in steps.items():
            times[name].append(step.run())
        print(f"round {i}: A {1e3 * times['A'][-1]:.1f} ms, B {1e3 * times['B'][-1]:.1f} ms, "
              f"B/A {times['B'][-1] / times['A'][-1]:.3f}", flush=True)
    ratios = sorted(b / a for a, b in zip(times["A"], times["B"], strict=True))
    for name, ts in times.items():
        print(f"{name}: median {1e3 * statistics.median(ts):.1f} ms, min {1e3 * min(ts):.1f} ms")
    b_is = " ".join(filter(None, [args.b, args.b_xla]))
    print(f"B/A: median {statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f}, "
          f"{args.rounds} rounds; B is {b_is})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
