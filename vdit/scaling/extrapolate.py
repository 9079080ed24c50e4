"""`vdit sweep predict`: what a fitted L(N, D) says outside the grid it was fitted on, and how
that compares with runs made to check it.

    vdit sweep fit runs/scaling/physics --out docs/physics            # fit.json
    vdit sweep predict docs/physics --flops 3e14 --grid experiments/scaling/physics.yaml
    vdit sweep run experiments/scaling/physics.yaml --extra 1.25@3e14  # the suggested point
    vdit sweep predict docs/physics --flops 3e14 --grid experiments/scaling/physics.yaml

At compute C the fit's compute-optimal size N_opt, tokens D_opt and loss come from its law and
C = D k N^gamma (vdit/scaling/fit.py: compute_optimal); the intervals are percentiles over the
fit's bootstrap refits. With `--grid`, the family sizes nearest N_opt are listed with their
steps at C, and every row of the grid's OUT/extrapolation.jsonl (points run with `sweep run
--extra`, never part of a fit) is set against the law's prediction at its own N and D.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from vdit.config import ConfigError
from vdit.scaling.fit import PARAM_NAMES, compute_optimal, log_predict

SIZE_STEP = 0.25  # family sizes are multiples of this (widths in whole heads of 64 at x1 = 256)


def _thetas(fit: dict) -> tuple[np.ndarray, np.ndarray]:
    theta = np.array([fit["log_params"][k] for k in PARAM_NAMES], float)
    boots = np.array(fit.get("bootstrap_log_params") or [], float).reshape(-1, 5)
    return theta, boots


def _interval(values: np.ndarray, ci: float) -> list[float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    return [float(np.percentile(values, 50 * (1 - ci))),
            float(np.percentile(values, 50 * (1 + ci)))]


def predict_at(fit: dict, flops: float) -> dict:
    """The compute-optimal N, D and loss at `flops`, each with the fit's bootstrap interval."""
    theta, boots = _thetas(fit)
    k, gamma = fit["flops_per_token"]["k"], fit["flops_per_token"]["gamma"]
    ci = fit.get("ci", 0.95)
    n, d, loss = (float(x[0]) for x in compute_optimal(theta, k, gamma, [flops]))
    samples = np.array([[float(x[0]) for x in compute_optimal(t, k, gamma, [flops])]
                        for t in boots]).reshape(-1, 3)
    return {"flops": flops, "n_opt": n, "d_opt": d, "loss": loss, "ci": ci,
            "n_opt_ci": _interval(samples[:, 0], ci), "d_opt_ci": _interval(samples[:, 1], ci),
            "loss_ci": _interval(samples[:, 2], ci)}


def loss_at(fit: dict, n: float, d: float) -> tuple[float, list[float] | None]:
    """The law's loss at per-token params n and tokens d, and its bootstrap interval."""
    theta, boots = _thetas(fit)
    one = lambda t: float(np.exp(log_predict(t, np.array([n], float), np.array([d], float)))[0])
    return one(theta), _interval(np.array([one(t) for t in boots]), fit.get("ci", 0.95))


def compare(fit: dict, rows: list[dict]) -> list[dict]:
    """Each observed row against the law at its own N and D."""
    out = []
    for r in rows:
        predicted, interval = loss_at(fit, r["per_token_params"], r["tokens"])
        out.append({"name": r["name"], "flops": r["flops"], "per_token_params":
                    r["per_token_params"], "tokens": r["tokens"], "observed": r["eval_loss"],
                    "predicted": predicted, "predicted_ci": interval,
                    "error": (predicted - r["eval_loss"]) / r["eval_loss"]})
    return out


def nearest_sizes(grid, n_opt: float, flops: float, count: int = 3) -> list[dict]:
    """The family sizes (multiples of SIZE_STEP) nearest N_opt in log N, with their steps."""
    from vdit.scaling.flops import per_token_params
    from vdit.scaling.sweep import make_point

    sizes = []
    for i in range(1, 25):
        point = make_point(grid, i * SIZE_STEP, flops)
        n = per_token_params(point.cfg)
        sizes.append({"size": i * SIZE_STEP, "name": point.name, "per_token_params": n,
                      "width": point.cfg.model.width, "depth": point.cfg.model.depth,
                      "steps": point.steps, "log_distance": abs(math.log(n / n_opt)),
                      "tokens": point.steps * point.cfg.train.batch_size * point.cfg.num_tokens()})
    return sorted(sizes, key=lambda s: s["log_distance"])[:count]


def _load_fit(path: Path) -> dict:
    fit_path = path / "fit.json" if path.is_dir() else path
    if not fit_path.is_file():
        raise ConfigError(f"{fit_path}: no fit.json there (write one with `vdit sweep fit`)")
    fit = json.loads(fit_path.read_text())
    if "log_params" not in fit or "flops_per_token" not in fit:
        raise ConfigError(f"{fit_path}: not a `vdit sweep fit` result")
    return fit


def _span(value: float, interval: list[float] | None, fmt: str) -> str:
    text = format(value, fmt)
    return text + (f" [{format(interval[0], fmt)}, {format(interval[1], fmt)}]" if interval
                   else " (no bootstrap refits in fit.json)")


def _cmd_predict(args: argparse.Namespace) -> int:
    from vdit.scaling.ledger import read_ledger
    from vdit.scaling.sweep import EXTRA_LEDGER, load_grid

    src = Path(args.fit)
    fit = _load_fit(src)
    if not (args.flops > 0 and math.isfinite(args.flops)):
        raise ConfigError(f"--flops: must be a finite number > 0, got {args.flops}")
    grid = load_grid(args.grid) if args.grid else None
    pred = predict_at(fit, args.flops)
    pct = f"{100 * pred['ci']:.0f} %"
    print(f"at {args.flops:.3g} FLOPs ({args.flops / max(fit['budgets_flops']):.1f}x the "
          f"largest fitted budget), {pct} intervals over the fit's refits:")
    print(f"  compute-optimal N = {_span(pred['n_opt'], pred['n_opt_ci'], '.3g')} per-token "
          f"params, D = {_span(pred['d_opt'], pred['d_opt_ci'], '.3g')} tokens")
    print(f"  loss = {_span(pred['loss'], pred['loss_ci'], '.4f')}")
    result: dict[str, Any] = {"prediction": pred}
    if grid is not None:
        result["nearest_sizes"] = nearest_sizes(grid, pred["n_opt"], args.flops)
        for s in result["nearest_sizes"]:
            loss, interval = loss_at(fit, s["per_token_params"], s["tokens"])
            s["predicted_loss"], s["predicted_loss_ci"] = loss, interval
            print(f"  size x{s['size']:g} ({s['width']} x {s['depth']}, N "
                  f"{s['per_token_params']:.3g}, {s['steps']} steps): loss "
                  f"{_span(loss, interval, '.4f')}; run it with "
                  f"`vdit sweep run {args.grid} --extra {s['size']:g}@{args.flops:.3g}`")
        observed = read_ledger(grid.out_dir / EXTRA_LEDGER)
        result["observed"] = compare(fit, observed)
        for o in result["observed"]:
            print(f"  observed {o['name']}: loss {o['observed']:.4f}, predicted "
                  f"{_span(o['predicted'], o['predicted_ci'], '.4f')}: error "
                  f"{100 * o['error']:+.2f} %")
    out = (src if src.is_dir() else src.parent) / "prediction.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def register(sub: Any) -> None:
    """Add `sweep predict FIT --flops C [--grid GRID]`."""
    p = sub.add_parser("predict", help="a fit's compute-optimal size, tokens and loss at a "
                       "budget, and runs made to check it against the law")
    p.add_argument("fit", help="fit.json of `vdit sweep fit`, or its folder")
    p.add_argument("--flops", type=float, required=True, help="training FLOPs, e.g. 3e14")
    p.add_argument("--grid", default=None, help="the grid file: nearest family sizes, and its "
                   "OUT/extrapolation.jsonl compared with the law")
    p.set_defaults(func=_cmd_predict)
