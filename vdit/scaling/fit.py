"""Chinchilla approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta to a sweep's ledger.

- N = per-token parameters (`vdit.scaling.flops.per_token_params`): the weights applied to every
  latent token. adaLN, timestep and text-encoder weights run once per sample, not per token, so
  their cost does not grow with D and counting them would bend the law at small widths.
- D = latent tokens processed = steps x batch x tokens per clip.
- L = the final eval loss (mean velocity MSE at the fixed eval timesteps, fixed held-out clips).

The fit (Hoffmann et al. 2022; Besiroglu et al. 2024, Epoch AI's replication) minimises the
Huber loss (delta 1e-3) of log L_hat - log L with
log L_hat = logsumexp(a - alpha log N, b - beta log D, e), A = exp(a), B = exp(b), E = exp(e),
by L-BFGS-B from a grid of starting points, keeping the best. Intervals are bootstrap
percentiles: resample runs with replacement and refit.

Compute: C = the ledger's FLOPs (analytic train FLOPs, 3 x forward matmuls including attention,
cross-attention, adaLN and text encoder), not 6ND. Across the family the FLOPs per token fit a
power law f(N) = k N^gamma (gamma ~ 1; attention adds to the 6N), so C = D f(N) and the
compute-optimal allocation has a closed form (with s = alpha + gamma beta):
N_opt(C) = (alpha A / (gamma beta B))^(1 / s) (C / k)^(beta / s),  D_opt(C) = C / f(N_opt(C)).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vdit.config import ConfigError

HUBER_DELTA = 1e-3
PARAM_NAMES = ("a", "b", "e", "alpha", "beta")
# Exponents are kept in [0, 4]: outside it the law has no meaning, and L-BFGS-B stays finite.
BOUNDS = [(None, None), (None, None), (None, None), (0.0, 4.0), (0.0, 4.0)]


def start_grid(kind: str = "full") -> np.ndarray:
    """Starting points [K, 5] (a, b, e, alpha, beta). 'full' is Hoffmann et al.'s grid (4500
    points); 'coarse' (243) is for tests and quick looks."""
    if kind == "full":
        axes = (np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
                np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))
    elif kind == "coarse":
        axes = ((0.0, 10.0, 20.0), (0.0, 10.0, 20.0), (-1.0, 0.0, 1.0), (0.25, 0.75, 1.5),
                (0.25, 0.75, 1.5))
    else:
        raise ValueError(f"start grid: 'full' or 'coarse', got {kind!r}")
    return np.array(list(itertools.product(*axes)))


def log_predict(theta: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """log L_hat for params theta (a, b, e, alpha, beta) at N [M], D [M] -> [M]."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * np.log(n), b - beta * np.log(d), np.full(np.shape(n), e)])
    top = terms.max(0)
    return top + np.log(np.exp(terms - top).sum(0))


def _objective(theta: np.ndarray, log_n, log_d, log_l, delta: float):
    """Sum of Huber(log L_hat - log L) / delta and its gradient. Dividing by delta changes no
    minimiser but brings the value to O(residual), where L-BFGS's stopping tests work."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(0)
    w = np.exp(terms - top)
    total = w.sum(0)
    r = top + np.log(total) - log_l
    w /= total  # softmax weights: d log L_hat / d (term)
    quad = np.abs(r) <= delta
    value = np.where(quad, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum() / delta
    dr = np.where(quad, r, delta * np.sign(r)) / delta
    grad = np.array([(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
                     -(dr * w[0] * log_n).sum(), -(dr * w[1] * log_d).sum()])
    return value, grad


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta, stored as its log-space params."""

    a: float
    b: float
    e: float
    alpha: float
    beta: float
    objective: float = float("nan")

    @property
    def theta(self) -> np.ndarray:
        return np.array([self.a, self.b, self.e, self.alpha, self.beta])

    @property
    def constants(self) -> dict[str, float]:
        return {"E": math.exp(self.e), "A": math.exp(self.a), "B": math.exp(self.b),
                "alpha": self.alpha, "beta": self.beta}

    def __call__(self, n, d) -> np.ndarray:
        return np.exp(log_predict(self.theta, np.asarray(n, float), np.asarray(d, float)))


@functools.cache
def _minimize():
    """scipy.optimize.minimize, with scipy's OpenBLAS limited to one thread: L-BFGS-B makes
    tiny BLAS calls, and idle OpenBLAS threads spinning on a busy 2-core machine made each
    iteration ~30x slower (10 ms instead of 0.3 ms)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # effective if scipy is not loaded yet
    import scipy
    from scipy.optimize import minimize

    for lib in (Path(scipy.__file__).parent.parent / "scipy.libs").glob("libscipy_openblas*.so"):
        # Already loaded: dlopen returns the same library, so this reaches its thread pool.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(str(lib)).scipy_openblas_set_num_threads(1)
    return minimize


def _screen(starts: np.ndarray, log_n, log_d, log_l, delta: float, top: int) -> np.ndarray:
    """The `top` starting points [top, 5] with the lowest objective, evaluated all at once."""
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, e + 0.0 * log_n])  # [3, K, M]
    top_t = terms.max(0)
    r = np.abs(top_t + np.log(np.exp(terms - top_t).sum(0)) - log_l)
    value = np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(1)
    return starts[np.argsort(value, kind="stable")[:top]]


def _fit_all(n, d, loss, starts: np.ndarray | str, delta: float,
             top: int | None) -> list[tuple[float, np.ndarray]]:
    """(objective, params) of an L-BFGS-B run from each starting point, best first. With `top`,
    only the `top` starts of lowest initial objective are run: scipy costs ~1 ms per
    iteration, and a start far worse than its neighbours rarely wins."""
    minimize = _minimize()
    log_n, log_d = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
    log_l = np.log(np.asarray(loss, float))
    starts = start_grid(starts) if isinstance(starts, str) else np.asarray(starts, float)
    if top is not None and top < len(starts):
        starts = _screen(starts, log_n, log_d, log_l, delta, top)
    results = []
    for x0 in starts:
        res = minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True,
                       method="L-BFGS-B", bounds=BOUNDS,
                       options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8})
        if np.isfinite(res.fun):
            results.append((float(res.fun), res.x))
    if not results:
        raise RuntimeError("no start converged to a finite objective")
    return sorted(results, key=lambda r: r[0])


def fit_law(n, d, loss, *, starts: np.ndarray | str = "full", top: int | None = 64,
            delta: float = HUBER_DELTA) -> Law:
    """The best L-BFGS-B fit of L(N, D) from the `top` best starting points (all if None)."""
    fun, x = _fit_all(n, d, loss, starts, delta, top)[0]
    return Law(*x, objective=fun)


def distinct_solutions(results: list[tuple[float, np.ndarray]], keep: int) -> np.ndarray:
    """The `keep` best solutions that differ by > 1e-3 in some param: warm starts [keep, 5]."""
    distinct: list[np.ndarray] = []
    for _, x in results:
        if all(np.abs(x - y).max() > 1e-3 for y in distinct):
            distinct.append(x)
        if len(distinct) == keep:
            break
    return np.array(distinct)


def bootstrap(n, d, loss, warm: np.ndarray, *, n_boot: int = 200, seed: int = 0,
              delta: float = HUBER_DELTA) -> np.ndarray:
    """Refit on `n_boot` resamples of the runs (with replacement) -> params [n_boot, 5].
    Each refit starts from `warm` (the full fit's best distinct solutions) and the four best
    points of the coarse grid for that resample."""
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    rng = np.random.default_rng(seed)
    coarse = start_grid("coarse")
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(n), len(n))
        logs = np.log(n[idx]), np.log(d[idx]), np.log(loss[idx])
        starts = np.concatenate([warm, _screen(coarse, *logs, delta, 4)])
        law = fit_law(n[idx], d[idx], loss[idx], starts=starts, top=None, delta=delta)
        out.append(law.theta)
    return np.array(out)


def flops_per_token_law(n, flops_per_token) -> tuple[float, float]:
    """Least-squares power law f(N) = k N^gamma on log-log -> (k, gamma)."""
    gamma, log_k = np.polyfit(np.log(np.asarray(n, float)), np.log(flops_per_token), 1)
    return float(math.exp(log_k)), float(gamma)


def compute_optimal(theta: np.ndarray, k: float, gamma: float, c) -> tuple[np.ndarray, ...]:
    """(N_opt, D_opt, L_opt) at compute C (FLOPs) for L = exp(log_predict(theta)) and
    C = D k N^gamma (closed form; see the module docstring)."""
    a, b, _, alpha, beta = theta
    c = np.asarray(c, float)
    denom = alpha + gamma * beta
    if alpha <= 0 or beta <= 0:
        nan = np.full(c.shape, np.nan)
        return nan, nan, nan
    log_g = (math.log(alpha) + a - math.log(gamma * beta) - b) / denom
    n_opt = np.exp(log_g + beta / denom * np.log(c / k))
    d_opt = c / (k * n_opt**gamma)
    return n_opt, d_opt, np.exp(log_predict(theta, n_opt, d_opt))


def _arrays(rows: list[dict]) -> tuple[np.ndarray, ...]:
    n = np.array([r["per_token_params"] for r in rows], float)
    d = np.array([r["tokens"] for r in rows], float)
    loss = np.array([r["eval_loss"] for r in rows], float)
    c = np.array([r["flops"] for r in rows], float)
    return n, d, loss, c


def leave_one_budget_out(rows: list[dict], *, starts: np.ndarray | str = "full",
                         top: int | None = 64) -> dict:
    """Fit on all budgets but one, predict the held-out budget's final losses; returns
    {"per_budget": {budget: mean abs relative error}, "mare": over all held-out points,
    "predictions": [{"name", "budget_flops", "observed", "predicted"}]}."""
    budgets = sorted({r["budget_flops"] for r in rows})
    per_budget, preds, errors = {}, [], []
    for held in budgets:
        train_rows = [r for r in rows if r["budget_flops"] != held]
        test_rows = [r for r in rows if r["budget_flops"] == held]
        if len(train_rows) < 5:  # five parameters
            continue
        law = fit_law(*_arrays(train_rows)[:3], starts=starts, top=top)
        n, d, loss, _ = _arrays(test_rows)
        pred = law(n, d)
        rel = np.abs(pred - loss) / loss
        per_budget[f"{held:.4g}"] = float(rel.mean())
        errors += rel.tolist()
        preds += [{"name": r["name"], "budget_flops": held, "observed": float(o),
                   "predicted": float(p)} for r, o, p in zip(test_rows, loss, pred, strict=True)]
    return {"per_budget": per_budget, "mare": float(np.mean(errors)) if errors else None,
            "predictions": preds}


def fit_rows(rows: list[dict], *, n_boot: int = 200, seed: int = 0, ci: float = 0.95,
             starts: np.ndarray | str = "full", top: int | None = 64, warm: int = 4) -> dict:
    """The whole analysis of ledger rows as a JSON-ready dict (see fit_ledger)."""
    if len(rows) < 6:
        raise ValueError(f"need at least 6 finished runs to fit 5 parameters, got {len(rows)}")
    n, d, loss, c = _arrays(rows)
    results = _fit_all(n, d, loss, starts, HUBER_DELTA, top)
    law = Law(*results[0][1], objective=results[0][0])
    warm_starts = distinct_solutions(results, warm)
    k, gamma = flops_per_token_law(n, c / d)
    boots = (bootstrap(n, d, loss, warm_starts, n_boot=n_boot, seed=seed) if n_boot
             else np.empty((0, 5)))
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2

    def derived(theta: np.ndarray) -> dict[str, float]:
        a, b, e, alpha, beta = theta
        denom = alpha + gamma * beta
        return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha,
                "beta": beta, "n_opt_exponent": beta / denom if denom else float("nan"),
                "d_opt_exponent": 1 - gamma * beta / denom if denom else float("nan")}

    point = derived(law.theta)
    samples = [derived(t) for t in boots]
    intervals = {key: [float(np.nanpercentile([s[key] for s in samples], lo_q)),
                       float(np.nanpercentile([s[key] for s in samples], hi_q))]
                 for key in point} if samples else {}
    budgets = sorted({r["budget_flops"] for r in rows})
    frontier_c = np.geomspace(min(budgets), 10 * max(budgets), 7)
    n_opt, d_opt, l_opt = compute_optimal(law.theta, k, gamma, frontier_c)
    in_sample = np.abs(law(n, d) - loss) / loss
    return {
        "definitions": {
            "N": "per-token parameters (vdit.scaling.flops.per_token_params)",
            "D": "latent tokens processed = steps x batch x tokens per clip",
            "L": "final eval loss (velocity MSE at the fixed eval timesteps)",
            "C": "analytic train FLOPs from the ledger (3 x forward matmul FLOPs), "
                 "modelled as C = D * k * N^gamma",
            "law": "L = E + A / N^alpha + B / D^beta, Huber(delta) on log L, L-BFGS-B",
        },
        "n_runs": len(rows), "budgets_flops": budgets,
        "sizes": sorted({r["size"] for r in rows}, key=lambda s: next(
            x["per_token_params"] for x in rows if x["size"] == s)),
        "huber_delta": HUBER_DELTA, "law": {k_: float(v) for k_, v in point.items()},
        "log_params": dict(zip(PARAM_NAMES, law.theta.tolist(), strict=True)),
        "objective": law.objective, "ci": ci, "n_boot": int(n_boot), "intervals": intervals,
        "flops_per_token": {"k": k, "gamma": gamma},
        "frontier": [{"flops": float(cc), "n_opt": float(nn), "d_opt": float(dd),
                      "loss": float(ll)} for cc, nn, dd, ll in
                     zip(frontier_c, n_opt, d_opt, l_opt, strict=True)],
        "in_sample_mare": float(in_sample.mean()),
        # every refit's log-space params: `vdit sweep predict` gives intervals from them
        "bootstrap_log_params": boots.tolist(),
        "leave_one_budget_out": leave_one_budget_out(rows, starts=starts, top=top),
    }


LEDGER_KEYS = ("per_token_params", "tokens", "eval_loss", "flops")


def _check_rows(path: Path, rows: list[dict]) -> None:
    """Refuse a ledger the fit cannot use, naming the file: too few rows (an empty file, or
    lines that are not JSON) or rows without the numbers the fit reads."""
    for i, row in enumerate(rows, 1):
        bad = [k for k in LEDGER_KEYS if not isinstance(row, dict)
               or not isinstance(row.get(k), int | float)]
        if bad:
            raise ConfigError(f"{path}: row {i} is not a sweep ledger row (no number for "
                              f"{', '.join(bad)})")
    if len(rows) < 6:
        lines = sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())
        raise ConfigError(f"{path}: {len(rows)} finished runs in it ({lines} non-empty lines); "
                          "the fit needs at least 6 for its 5 parameters")


def fit_ledger(ledger_path: str | Path, out_dir: str | Path, *, n_boot: int = 200,
               seed: int = 0, starts: np.ndarray | str = "full", top: int | None = 64) -> dict:
    """Fit a ledger; write OUT_DIR/fit.json, the plots and a copy of the ledger."""
    from vdit.scaling.ledger import read_ledger

    ledger_path, out_dir = Path(ledger_path), Path(out_dir)
    rows = read_ledger(ledger_path)
    _check_rows(ledger_path, rows)
    result = fit_rows(rows, n_boot=n_boot, seed=seed, starts=starts, top=top)
    result["ledger"] = str(ledger_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ledger_path.resolve() != (out_dir / ledger_path.name).resolve():
        shutil.copyfile(ledger_path, out_dir / "ledger.jsonl")
    (out_dir / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    result["plots"] = [str(p) for p in plot_all(rows, result, out_dir)]
    return result


def format_fit(result: dict) -> str:
    """A few lines for the terminal."""
    law, iv = result["law"], result.get("intervals", {})

    def show(key: str, fmt: str) -> str:
        s = format(law[key], fmt)
        if key in iv:
            s += f" [{format(iv[key][0], fmt)}, {format(iv[key][1], fmt)}]"
        return s

    lobo = result["leave_one_budget_out"]
    lines = [
        f"runs {result['n_runs']}, budgets {', '.join(f'{b:.3g}' for b in result['budgets_flops'])}"
        " FLOPs" + (f"; {100 * result['ci']:.0f} % bootstrap intervals ({result['n_boot']} "
                    "refits)" if result["n_boot"] else ""),
        f"E = {show('E', '.4g')}, A = {show('A', '.4g')}, B = {show('B', '.4g')}",
        f"alpha = {show('alpha', '.3f')}, beta = {show('beta', '.3f')}",
        f"N_opt ~ C^{show('n_opt_exponent', '.3f')}, D_opt ~ C^{show('d_opt_exponent', '.3f')}"
        f" (FLOPs per token = {result['flops_per_token']['k']:.3g} N^"
        f"{result['flops_per_token']['gamma']:.3f})",
        f"in-sample error {100 * result['in_sample_mare']:.2f} %; leave-one-budget-out "
        + (f"{100 * lobo['mare']:.2f} %" if lobo["mare"] is not None else "n/a")
        + " (" + ", ".join(f"{b}: {100 * v:.2f} %" for b, v in lobo["per_budget"].items()) + ")",
    ]
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------


def plot_all(rows: list[dict], result: dict, out_dir: Path) -> list[Path]:
    """loss_vs_flops.png, isoflop.png, pred_vs_obs.png in out_dir (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = result["log_params"]
    law = Law(p["a"], p["b"], p["e"], p["alpha"], p["beta"])
    k, gamma = result["flops_per_token"]["k"], result["flops_per_token"]["gamma"]
    n, d, loss, c = _arrays(rows)
    budgets = result["budgets_flops"]
    cmap = plt.get_cmap("viridis")
    paths = []

    # Loss against compute, one line per size; the fitted curve of each size at D = C / f(N).
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = sorted(set(n.tolist()))
    c_grid = np.geomspace(c.min() / 2, c.max() * 4, 100)
    for i, size_n in enumerate(sizes):
        colour = cmap(i / max(len(sizes) - 1, 1))
        sel = n == size_n
        order = np.argsort(c[sel])
        name = next(r["size"] for r in rows if r["per_token_params"] == size_n)
        ax.plot(c[sel][order], loss[sel][order], "o", color=colour,
                label=f"{name}: N = {size_n:.3g}")
        ax.plot(c_grid, law(np.full_like(c_grid, size_n), c_grid / (k * size_n**gamma)), "-",
                color=colour, lw=1, alpha=0.7)
    _, _, l_opt = compute_optimal(law.theta, k, gamma, c_grid)
    ax.plot(c_grid, l_opt, "k--", lw=1.5, label="compute-optimal frontier")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs (analytic)",
           ylabel="final eval loss", title="Loss against compute; lines: fitted L(N, D)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "loss_vs_flops.png"))

    # IsoFLOP curves: loss against N at each budget, with the fitted optimum.
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    n_grid = np.geomspace(n.min() / 3, n.max() * 3, 100)
    for i, budget in enumerate(budgets):
        colour = cmap(i / max(len(budgets) - 1, 1))
        sel = np.array([r["budget_flops"] == budget for r in rows])
        order = np.argsort(n[sel])
        ax.plot(n[sel][order], loss[sel][order], "o", color=colour, label=f"C = {budget:.3g}")
        ax.plot(n_grid, law(n_grid, budget / (k * n_grid**gamma)), "-", color=colour, lw=1)
        n_opt, _, l_best = compute_optimal(law.theta, k, gamma, np.array([budget]))
        ax.plot(n_opt, l_best, "*", color=colour, ms=12, mec="k")
    ax.set(xscale="log", yscale="log", xlabel="per-token parameters N",
           ylabel="final eval loss", title="IsoFLOP curves (stars: fitted N_opt)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "isoflop.png"))

    # Predicted against observed: the fit on all runs, and leave-one-budget-out predictions.
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot(loss, law(n, d), "o", label="fit on all runs")
    held = result["leave_one_budget_out"]["predictions"]
    if held:
        ax.plot([h["observed"] for h in held], [h["predicted"] for h in held], "x",
                color="tab:red", label="budget held out")
    lims = [loss.min() * 0.95, loss.max() * 1.05]
    ax.plot(lims, lims, "k-", lw=0.8)
    ax.set(xlabel="observed final eval loss", ylabel="predicted", xlim=lims, ylim=lims,
           title="Predicted against observed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "pred_vs_obs.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
