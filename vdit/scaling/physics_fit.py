"""`vdit sweep fit-physics PHYSICS_JSON`: each physics metric of `vdit eval-physics` against
training compute, in distribution and for each out-of-distribution split separately.

Input: the physics.json that `vdit eval-physics RUN ... --out DIR` writes for many runs (each
run's training FLOPs and its per-split rows). Each run is one point (C, y) per metric and split,
with C its training FLOPs and y the model's split-level value. Two curves are fitted:

- a power law, log10 y = k log10 C + c (least squares in log-log; only y > 0 can be used), whose
  slope k says whether the metric moves with compute at all: "falls" / "rises" when its 95 %
  interval excludes 0, else "no trend";
- a saturating curve, y = e + a (C / C_ref)^(-b) with b in (0, 4] (C_ref: the geometric mean of
  the points' C), fitted by profiling b over a grid with e, a by least squares, e held to the
  metric's range (a rate in [0, 1], an error >= 0: unbounded, a nearly straight run of points
  sends e to -1e3). e is the level it tends to (a < 0 for a rising metric such as the found
  rate). The curve "levels off" at e only when b's interval stays off the grid's ends (b at its
  smallest: the points still move like a straight line in log C; at 4: they are flat) and e's
  interval off the range's ends (e at 0 for an error: no floor, a power law to 0 fits as well).

Intervals: 95 % bootstrap percentiles (`--bootstrap` refits): the power law resamples its
log-residuals (scaled by sqrt(n / (n - 2)); with 16 runs, resampling runs held the true slope
of a synthetic law for 16 of 20 noise seeds, this for 17 of 20, and pure noise read as "no
trend" 17 of 20 times: percentile intervals from 16 points run narrow, so a slope whose interval
barely excludes 0 is weak evidence), the saturating curve resamples the runs with
replacement. `--at C` extrapolates each power law to C (say 3x the largest budget) with its
bootstrap interval, to set against a run made there. The plot draws, per metric, one line per
split (the power law) with its interval band and the points with their 95 % intervals over
clips (eval-physics' `KEY_ci`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

METRICS = (("found", "ball found (rate)"), ("velocity_error", "velocity error (h/s)"),
           ("gravity_error", "gravity error (rel.)"), ("radius_drift", "radius drift (rel.)"),
           ("permanence_failure", "permanence failure (rate)"),
           ("reemergence_error", "re-emergence error (h)"))
SPLITS = ("in_distribution", "ood_speed", "ood_radius", "ood_combo")
_B_GRID = np.linspace(0.025, 4.0, 160)  # b = 0 makes e and a one constant
# the range a metric can level off in: rates in [0, 1], errors >= 0
_LEVEL_BOUNDS = {"found": (0.0, 1.0), "permanence_failure": (0.0, 1.0)}


def metric_points(summary: dict, metric: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(training FLOPs, values) of the model's rows of one split, runs with a finite value."""
    c, y = [], []
    for run in summary["runs"]:
        for row in run["rows"]:
            if (row["source"] == "model" and row["split"] == split
                    and np.isfinite(row.get(metric, np.nan))):
                c.append(float(run["flops"]))
                y.append(float(row[metric]))
    return np.asarray(c), np.asarray(y)


def power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(slope k, intercept) of log10 y = k log10 C + intercept; None without 2 distinct C."""
    ok = y > 0
    x, z = np.log10(c[ok]), np.log10(y[ok])
    if len(np.unique(x)) < 2:
        return None
    k, b = np.polyfit(x, z, 1)
    return float(k), float(b)


def saturating(c: np.ndarray, y: np.ndarray, c_ref: float,
               bounds: tuple[float, float] = (0.0, np.inf)) -> tuple[float, float, float] | None:
    """(e, a, b) of y = e + a (C / c_ref)^(-b) by least squares with e in `bounds`, over the b
    grid at once; None without 3 distinct C."""
    if len(np.unique(c)) < 3:
        return None
    v = np.exp(-_B_GRID[:, None] * np.log(c / c_ref)[None, :])  # [n_b, n]
    vc = v - v.mean(axis=1, keepdims=True)
    a = (vc @ (y - y.mean())) / np.maximum(np.sum(vc * vc, axis=1), 1e-300)
    e = y.mean() - a * v.mean(axis=1)
    clipped = np.clip(e, *bounds)  # at a bound: e fixed there, a refitted alone
    refit = np.sum(v * (y[None, :] - clipped[:, None]), axis=1) / np.sum(v * v, axis=1)
    a = np.where(clipped != e, refit, a)
    sse = np.sum((clipped[:, None] + a[:, None] * v - y[None, :]) ** 2, axis=1)
    i = int(np.argmin(sse))
    return float(clipped[i]), float(a[i]), float(_B_GRID[i])


def _interval(values: list[float]) -> list[float]:
    v = np.asarray([x for x in values if np.isfinite(x)])
    return [float(x) for x in np.percentile(v, [2.5, 97.5])] if len(v) else [np.nan, np.nan]


def fit_metric(c: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0,
               bounds: tuple[float, float] = (0.0, np.inf), at: float | None = None) -> dict:
    """Both curves with 95 % bootstrap intervals, and the curve bands on a grid of C; `bounds`:
    the range the saturating curve's level e is held to; `at`: FLOPs to extrapolate the power
    law to (its value there and the bootstrap interval)."""
    out: dict[str, Any] = {"n_runs": len(c), "n_positive": int(np.sum(y > 0))}
    if len(c) < 2:
        return out
    c_ref = float(np.exp(np.mean(np.log(c))))
    grid = np.geomspace(c.min(), c.max(), 32)
    rng = np.random.default_rng(seed)
    pl, sat = power_law(c, y), saturating(c, y, c_ref, bounds)
    boots_pl, boots_sat, curves = [], [], []
    pos = y > 0
    if pl is not None:  # residuals in log10, scaled up for the 2 fitted constants
        x = np.log10(c[pos])
        fitted = pl[1] + pl[0] * x
        resid = (np.log10(y[pos]) - fitted) * np.sqrt(len(x) / max(len(x) - 2, 1))
    for _ in range(n_boot):
        idx = rng.integers(0, len(c), len(c))
        if pl is not None:
            z = fitted + rng.choice(resid, len(resid))
            p = power_law(10 ** x, 10 ** z)
            boots_pl.append(p)
            curves.append(10 ** (p[1] + p[0] * np.log10(grid)))
        if sat is not None and (s := saturating(c[idx], y[idx], c_ref, bounds)) is not None:
            boots_sat.append(s)
    out["grid_flops"] = grid.tolist()
    if pl is not None:
        k_ci = _interval([b[0] for b in boots_pl])
        trend = ("falls" if k_ci[1] < 0 else "rises" if k_ci[0] > 0 else "no trend")
        out["power_law"] = {
            "slope": pl[0], "slope_ci": k_ci, "intercept": pl[1],
            "intercept_ci": _interval([b[1] for b in boots_pl]), "trend": trend,
            "curve": (10 ** (pl[1] + pl[0] * np.log10(grid))).tolist(),
            "band": (np.percentile(curves, [2.5, 97.5], axis=0).tolist() if curves else None)}
        if at is not None:
            out["power_law"]["at"] = {
                "flops": at, "value": float(10 ** (pl[1] + pl[0] * np.log10(at))),
                "ci": _interval([10 ** (b[1] + b[0] * np.log10(at)) for b in boots_pl])}
    if sat is not None:
        out["saturating"] = {"c_ref": c_ref, **{
            k: v for i, name in enumerate(("e", "a", "b"))
            for k, v in ((name, sat[i]), (f"{name}_ci", _interval([s[i] for s in boots_sat])))},
            "curve": (sat[0] + sat[1] * (grid / c_ref) ** -sat[2]).tolist()}
        b_lo, b_hi = out["saturating"]["b_ci"]
        e_lo, e_hi = out["saturating"]["e_ci"]
        out["saturating"]["levels_off"] = (
            "not resolved" if not (b_lo > _B_GRID[0] and b_hi < _B_GRID[-1])
            else f"at the bound {bounds[0]:g}" if e_lo <= bounds[0]
            else f"at the bound {bounds[1]:g}" if e_hi >= bounds[1] else "yes")
    return out


def fit_physics(summary: dict, n_boot: int = 1000, seed: int = 0,
                at: float | None = None) -> dict:
    """{metric: {split: fit_metric(...)}} for every metric and split with data."""
    result: dict[str, Any] = {"n_runs": len(summary["runs"]), "bootstrap": n_boot, "at": at,
                              "fits": {}}
    for metric, _ in METRICS:
        for split in SPLITS:
            c, y = metric_points(summary, metric, split)
            if len(c):
                result["fits"].setdefault(metric, {})[split] = fit_metric(
                    c, y, n_boot, seed, _LEVEL_BOUNDS.get(metric, (0.0, np.inf)), at)
    return result


def format_physics_fit(result: dict) -> str:
    """Markdown: per metric and split, the power-law slope and trend, and the level the
    saturating curve levels off at (else "not resolved" or "at the bound ...")."""
    def ci(v: list[float]) -> str:
        return f"[{v[0]:.3g}, {v[1]:.3g}]"

    at = result.get("at")
    lines = ["| metric | split | runs | power-law slope [95 %] | trend | levels off at e [95 %] "
             "| b [95 %] |" + (f" power law at {at:.3g} FLOPs [95 %] |" if at else ""),
             "|---|---|---:|---|---|---|---|" + ("---|" if at else "")]
    for metric, splits in result["fits"].items():
        for split, f in splits.items():
            pl, sat = f.get("power_law"), f.get("saturating")
            slope = f"{pl['slope']:.3f} {ci(pl['slope_ci'])}" if pl else "-"
            level = ("-" if not sat else f"{sat['e']:.3g} {ci(sat['e_ci'])}"
                     if sat["levels_off"] == "yes" else sat["levels_off"])
            b = f"{sat['b']:.2f} {ci(sat['b_ci'])}" if sat else "-"
            pred = (f" {pl['at']['value']:.3g} {ci(pl['at']['ci'])} |" if pl and "at" in pl
                    else " - |" if at else "")
            lines.append(f"| {metric} | {split} | {f['n_runs']} | {slope} | "
                         f"{pl['trend'] if pl else '-'} | {level} | {b} |{pred}")
    return "\n".join(lines)


def _with_ledger(summary: dict, ledger_rows: list[dict]) -> list[tuple[dict, dict, float]]:
    """(run, its ledger row, its eval loss: EMA where logged) for each run of the summary the
    ledger knows (matched by run folder name) with a finite loss."""
    by_name = {Path(r["run_dir"]).name: r for r in ledger_rows if "run_dir" in r}
    out = []
    for run in summary["runs"]:
        row = by_name.get(Path(run["run"]).name)
        loss = row.get("eval_loss_ema", row.get("eval_loss")) if row else None
        if loss is not None and np.isfinite(loss):
            out.append((run, row, float(loss)))
    return out


def frontier(summary: dict, ledger_rows: list[dict]) -> list[dict]:
    """Per budget, the run with the lowest eval loss (EMA where logged), ascending in budget:
    the compute-optimal path through the grid. At one budget the larger models are the less
    trained, so a fit over every run also sees size; this path reads "with scale" alone.
    [{"budget", "run", "loss", "rows"}], rows: the run's model rows by split."""
    best: dict[float, dict] = {}
    for run, row, loss in _with_ledger(summary, ledger_rows):
        budget = float(row["budget_flops"])
        if budget not in best or loss < best[budget]["loss"]:
            best[budget] = {"budget": budget, "run": Path(run["run"]).name, "loss": loss,
                            "rows": {r["split"]: r for r in run["rows"]
                                     if r["source"] == "model"}}
    return [best[b] for b in sorted(best)]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties given their mean rank (runs share a budget or a size)."""
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def rank_correlations(summary: dict, ledger_rows: list[dict]) -> dict:
    """{metric: {split: {"loss", "flops", "params": Spearman rank correlation}}} over every run
    the ledger knows: what a physics metric follows."""
    matched = _with_ledger(summary, ledger_rows)
    out: dict[str, dict] = {}
    for metric, _ in METRICS:
        for split in SPLITS:
            cols: dict[str, list[float]] = {"y": [], "loss": [], "flops": [], "params": []}
            for run, row, loss in matched:
                vals = [r.get(metric, np.nan) for r in run["rows"]
                        if r["source"] == "model" and r["split"] == split]
                if not vals or not np.isfinite(vals[0]):
                    continue
                cols["y"].append(vals[0])
                cols["loss"].append(loss)
                cols["flops"].append(run["flops"])
                cols["params"].append(run.get("params", row.get("params", np.nan)))
            if len(cols["y"]) < 3:
                continue
            ry = _ranks(np.asarray(cols["y"]))
            out.setdefault(metric, {})[split] = {  # NaN where a run lacks the value
                k: float(np.corrcoef(_ranks(x), ry)[0, 1]) if np.isfinite(x).all() else np.nan
                for k in ("loss", "flops", "params") for x in [np.asarray(cols[k], float)]}
    return out


def format_frontier(front: list[dict]) -> str:
    """Markdown: one table per metric, a row per budget (its loss-optimal run), a column per
    split, each value with its 95 % interval over clips."""
    out = []
    for metric, title in METRICS:
        lines = [f"**{title}**", "", "| budget | run | eval loss | " + " | ".join(SPLITS) + " |",
                 "|---|---|---:|" + "---:|" * len(SPLITS)]
        for f in front:
            cells = []
            for split in SPLITS:
                r = f["rows"].get(split, {})
                v, ci = r.get(metric, np.nan), r.get(f"{metric}_ci", [np.nan, np.nan])
                cells.append(f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if np.isfinite(v) else "-")
            lines.append(f"| {f['budget']:.3g} | {f['run']} | {f['loss']:.3f} | "
                         + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot_physics_fit(result: dict, summary: dict, path: Path) -> Path:
    """One panel per metric: per split its runs (with clip intervals), the power law and its
    bootstrap band; log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=110)
    colours = dict(zip(SPLITS, ("C0", "C3", "C2", "C1"), strict=True))
    for ax, (metric, title) in zip(axes.ravel(), METRICS, strict=True):
        for split, f in result["fits"].get(metric, {}).items():
            col = colours[split]
            for run in summary["runs"]:
                for row in run["rows"]:
                    if row["source"] == "model" and row["split"] == split and np.isfinite(
                            row.get(metric, np.nan)) and row[metric] > 0:
                        lo, hi = row.get(f"{metric}_ci", [row[metric]] * 2)
                        err = [[max(row[metric] - lo, 0)], [max(hi - row[metric], 0)]]
                        ax.errorbar(run["flops"], row[metric], yerr=err, fmt="o", ms=3,
                                    color=col, alpha=0.6, lw=0.8)
            pl = f.get("power_law")
            if pl:
                ax.plot(f["grid_flops"], pl["curve"], color=col,
                        label=f"{split} (k={pl['slope']:.2f})")
                if pl["band"]:
                    ax.fill_between(f["grid_flops"], *pl["band"], color=col, alpha=0.15)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training FLOPs", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"physics against compute: {result['n_runs']} runs, power-law fits with 95 % "
                 f"bootstrap bands ({result['bootstrap']} refits over runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_fit_physics(physics: str | Path, out: str | Path | None = None, n_boot: int = 1000,
                    seed: int = 0, at: float | None = None,
                    ledger: str | Path | None = None) -> dict:
    """Read physics.json (or the folder holding it), write physics_fit.json and .png to `out`
    (default: the same folder), and with the sweep's `ledger` also frontier.md (`frontier`);
    returns the fit, with "frontier" when a ledger was given."""
    from vdit.config import ConfigError
    from vdit.io.run_dir import check_output_dir

    src = Path(physics)
    src = src / "physics.json" if src.is_dir() else src
    if not src.is_file():
        raise FileNotFoundError(f"no physics.json at {src} (written by `vdit eval-physics RUN "
                                "... --out DIR`)")
    if n_boot < 1:
        raise ConfigError(f"--bootstrap: must be >= 1, got {n_boot}")
    if at is not None and not (np.isfinite(at) and at > 0):
        raise ConfigError(f"--at: training FLOPs must be a positive number, got {at}")
    summary = json.loads(src.read_text())
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), list):
        raise ConfigError(f"{src}: not an eval-physics summary (no 'runs' list)")
    out_dir = check_output_dir(Path(out) if out else src.parent, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = fit_physics(summary, n_boot=n_boot, seed=seed, at=at)
    result["source"] = str(src)
    if ledger is not None:
        from vdit.scaling.ledger import read_ledger

        if not Path(ledger).is_file():
            raise FileNotFoundError(f"--ledger: no ledger at {ledger}")
        rows = read_ledger(ledger)
        front = frontier(summary, rows)
        if not front:
            raise ConfigError(f"--ledger {ledger}: none of its runs is in {src} (matched by run "
                              "folder name)")
        result["frontier"] = [{k: v for k, v in f.items() if k != "rows"} for f in front]
        result["rank_correlations"] = corr = rank_correlations(summary, rows)
        lines = ["**Spearman rank correlation over all runs of each metric with the run's eval "
                 "loss / training FLOPs / parameters**", "",
                 "| metric | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
        for metric, splits in corr.items():
            lines.append(f"| {metric} | " + " | ".join(
                " / ".join(f"{splits[s][k]:.2f}" for k in ("loss", "flops", "params"))
                if s in splits else "-" for s in SPLITS) + " |")
        (out_dir / "frontier.md").write_text(format_frontier(front) + "\n\n"
                                             + "\n".join(lines) + "\n")
    (out_dir / "physics_fit.json").write_text(json.dumps(result, indent=1, allow_nan=True))
    plot_physics_fit(result, summary, out_dir / "physics_fit.png")
    return result


def _cmd_fit_physics(args: argparse.Namespace) -> int:
    result = run_fit_physics(args.physics, args.out, n_boot=args.bootstrap, seed=args.seed,
                             at=args.at, ledger=args.ledger)
    print(format_physics_fit(result))
    out = Path(args.out) if args.out else Path(result["source"]).parent
    if "frontier" in result:
        print("\nthe loss-optimal run of each budget:\n")
        print((out / "frontier.md").read_text())
    print(f"wrote {out / 'physics_fit.json'} and {out / 'physics_fit.png'}")
    return 0


def register(sub: Any) -> None:
    """Add `sweep fit-physics PHYSICS [--out DIR] [--bootstrap N] [--seed S] [--at FLOPS]
    [--ledger LEDGER]`."""
    p = sub.add_parser("fit-physics", help="fit each eval-physics metric against training "
                       "compute (power law and saturating curve, bootstrap intervals), per split")
    p.add_argument("physics", help="physics.json of `vdit eval-physics RUN ... --out DIR`, or DIR")
    p.add_argument("--out", default=None, help="output folder (default: the input's)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap refits over runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--at", type=float, default=None, metavar="FLOPS",
                   help="also extrapolate each power law to these training FLOPs, e.g. 3e14")
    p.add_argument("--ledger", default=None, help="the sweep's ledger.jsonl: also a table of "
                   "each budget's loss-optimal run (frontier.md)")
    p.set_defaults(func=_cmd_fit_physics)
