"""`vdit sweep status GRID`: which points of a grid are done, running and left, and how long
the rest will take. Reads the ledger, the run directories' checkpoints and metrics.jsonl only:
no model is built, nothing is compiled, JAX is not imported.

A point is *done* with a ledger row; *trained* when its run holds a checkpoint at its last step
but the row is not written yet (the next `vdit sweep run` writes it without training);
*running* when its run directory has started (metrics or checkpoints) without reaching the last
step, with its latest step (from metrics.jsonl or a checkpoint, whichever is newer) and how long
ago metrics.jsonl last changed (a stale one is an interrupted run, which the next
`vdit sweep run` resumes); *left* otherwise.

The estimate for what is left: a size's seconds per step from its finished points (ledger
wall_s / steps), else the seconds per FLOP of all finished points (median), times the steps
still to run; none before a point has finished.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from vdit.scaling.family import size_label
from vdit.scaling.ledger import checkpoint_steps, read_ledger
from vdit.train.metrics import read_metrics

STALE_S = 600.0  # metrics.jsonl untouched this long: the run is not advancing


def _latest_step(point: Any) -> int:
    steps = [r["step"] for r in read_metrics(point.run_dir / "metrics.jsonl") if "step" in r]
    return max([*steps, *checkpoint_steps(point.run_dir), 0])


def sweep_status(points: list[Any], ledger: Path, now: float | None = None) -> dict[str, Any]:
    """{"done", "trained", "running", "left": [per-point dicts], "estimate_s", "done_s"} of a
    grid's points (`vdit.scaling.sweep.grid_points`) against its ledger and run directories."""
    rows = {r["name"]: r for r in read_ledger(ledger)}
    now = time.time() if now is None else now
    out: dict[str, Any] = {"done": [], "trained": [], "running": [], "left": []}
    for p in points:
        base = {"name": p.name, "size": size_label(p.size), "steps": p.steps,
                "flops": p.steps * p.flops_per_step}
        metrics = p.run_dir / "metrics.jsonl"
        if p.name in rows:
            out["done"].append({**base, "wall_s": rows[p.name].get("wall_s")})
        elif p.steps in checkpoint_steps(p.run_dir):
            out["trained"].append(base)
        elif metrics.exists() or checkpoint_steps(p.run_dir):
            age = now - metrics.stat().st_mtime if metrics.exists() else None
            out["running"].append({**base, "step": _latest_step(p), "idle_s": age,
                                   "stale": age is None or age > STALE_S})
        else:
            out["left"].append(base)

    timed = [d for d in out["done"] if d["wall_s"]]
    per_step: dict[str, list[float]] = {}
    for d in timed:
        per_step.setdefault(d["size"], []).append(d["wall_s"] / d["steps"])
    per_flop = statistics.median(d["wall_s"] / d["flops"] for d in timed) if timed else None
    total = 0.0
    for d in out["running"] + out["left"]:
        todo = d["steps"] - d.get("step", 0)
        if d["size"] in per_step:
            d["estimate_s"] = statistics.median(per_step[d["size"]]) * todo
        elif per_flop is not None:
            d["estimate_s"] = per_flop * d["flops"] * todo / d["steps"]
        else:
            d["estimate_s"] = None
        total += d["estimate_s"] or 0.0
    out["estimate_s"] = total if per_flop is not None else None
    out["done_s"] = sum(d["wall_s"] for d in timed)
    return out


def _minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f} min"


def format_status(status: dict[str, Any]) -> str:
    n = sum(len(status[k]) for k in ("done", "trained", "running", "left"))
    lines = [f"{len(status['done'])} of {n} points done ({_minutes(status['done_s'])}), "
             f"{len(status['trained'])} trained without a ledger row, "
             f"{len(status['running'])} running, {len(status['left'])} left"]
    for d in status["done"]:
        lines.append(f"  done     {d['name']:<16} {d['steps']:>7} steps  {_minutes(d['wall_s'])}")
    for d in status["trained"]:
        lines.append(f"  trained  {d['name']:<16} {d['steps']:>7} steps  (row written by the "
                     "next `vdit sweep run`)")
    for d in status["running"]:
        idle = ("no metrics yet" if d["idle_s"] is None else
                f"metrics {d['idle_s'] / 60:.0f} min ago")
        state = "stopped " if d["stale"] else "running "
        lines.append(f"  {state} {d['name']:<16} {d['step']:>7}/{d['steps']} steps  {idle}, "
                     f"~{_minutes(d['estimate_s'])} to go")
    for d in status["left"]:
        lines.append(f"  left     {d['name']:<16} {d['steps']:>7} steps  "
                     f"~{_minutes(d['estimate_s'])}")
    est = status["estimate_s"]
    lines.append("estimate for the rest: " + (
        f"{_minutes(est)} ({est / 3600:.1f} h)" if est is not None else
        "none until a point has finished (docs/scaling.md has the planned times)"))
    return "\n".join(lines)
