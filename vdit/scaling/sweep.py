"""`vdit sweep`: scaling-law grids of ordinary training runs, a ledger, and the fit.

A grid file (YAML; docs/scaling.md has the schema) names a base config, a family of sizes
(vdit/scaling/family.py) and compute budgets in FLOPs. Each (size, budget) point is an ordinary
`vdit train` run in OUT_DIR/NAME with steps = round(budget / train FLOPs per step). Finished
points are skipped, interrupted ones resume (train() continues from the latest checkpoint), and
each finished point appends one row to OUT_DIR/ledger.jsonl, never two.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import shlex
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vdit.config import Config, ConfigError, from_dict, parse_overrides
from vdit.scaling.family import family_overrides, size_label, size_multiplier
from vdit.scaling.flops import per_token_params, train_flops_per_step
from vdit.scaling.ledger import append_row, checkpoint_steps, count_params, read_ledger
from vdit.train.metrics import read_metrics

GRID_KEYS = ("base", "overrides", "family", "sizes", "budgets_flops", "out_dir", "launch",
             "min_steps", "max_steps", "warmup_fraction", "checkpoints_per_run", "description")
REQUIRED_KEYS = ("base", "sizes", "budgets_flops", "out_dir")
FAMILY_KEYS = {"head_dim": int, "lr_exponent": float, "batch_exponent": float,
               "batch_multiple": int}
PLACEHOLDERS = ("name", "config", "overrides", "run_dir", "size", "budget", "steps")
DEFAULT_LAUNCH = "vdit train {config} {overrides}"
LEDGER = "ledger.jsonl"
EXTRA_LEDGER = "extrapolation.jsonl"  # points run with --extra, kept out of the fit


class GridError(ConfigError):
    """A grid file that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class Grid:
    path: Path
    base_data: dict  # the base config as a plain mapping (file contents or inline)
    base_path: Path | None  # None for an inline base
    overrides: tuple[str, ...]  # the grid's dotted `key=value` overrides of the base
    family: dict[str, Any]
    sizes: tuple[str | float, ...]
    budgets: tuple[float, ...]
    out_dir: Path
    launch: str
    min_steps: int
    max_steps: int | None
    warmup_fraction: float | None
    checkpoints_per_run: int


@dataclass(frozen=True)
class Point:
    name: str  # encodes size and budget, e.g. "x1.5-C3e11"
    size: str | float
    budget: float  # nominal FLOPs; the run spends steps * flops_per_step
    steps: int
    flops_per_step: float
    overrides: tuple[str, ...]  # dotted `key=value` on the base: grid + family + schedule
    cfg: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)


# --- grid file ----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    """A value as the YAML text of a dotted override (JSON is YAML; strings stay bare if safe)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, dict) else [f"{key}={_fmt(v)}"]
    return out


def _dedupe(overrides: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Dotted overrides with one entry per key: the last value, at the key's first place."""
    last = {o.partition("=")[0]: o for o in overrides}
    return tuple(last[k] for k in dict.fromkeys(o.partition("=")[0] for o in overrides))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _number(value: Any, where: str, cls: type = float) -> Any:
    """YAML 1.1 reads `1e12` (no dot) as a string, so numeric strings are accepted too."""
    if isinstance(value, bool):
        raise GridError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise GridError(f"{where}: expected a number, got {value!r}") from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise GridError(f"{where}: expected a number, got {value!r}")
    if cls is int:
        if value != int(value):
            raise GridError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file; GridError names the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} " + ("is a folder, not a YAML file" if path.is_dir()
                                                else "does not exist"))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:  # a binary file given where the grid goes
        raise GridError(f"{path}: not a text file, so not a YAML grid") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: expected a mapping of grid keys at the top level")
    for key in raw:
        if key not in GRID_KEYS:
            close = difflib.get_close_matches(str(key), GRID_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise GridError(f"{path}: {key}: unknown key{hint}; allowed: {', '.join(GRID_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise GridError(f"{path}: {key}: required key is missing")

    base, base_path = raw["base"], None
    if isinstance(base, str):
        base_path = Path(base)
        if not base_path.is_file():
            raise GridError(f"{path}: base: config file {base} does not exist")
        base = yaml.safe_load(base_path.read_text()) or {}
    if not isinstance(base, dict):
        raise GridError(f"{path}: base: expected a config file path or a mapping of sections")

    overrides = raw.get("overrides") or []
    if isinstance(overrides, dict):
        overrides = _flatten(overrides)
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise GridError(f"{path}: overrides: expected a list of 'section.key=value' strings or "
                        "a mapping of sections")

    family = raw.get("family") or {}
    if not isinstance(family, dict):
        raise GridError(f"{path}: family: expected a mapping with keys {', '.join(FAMILY_KEYS)}")
    for key, value in family.items():
        if key not in FAMILY_KEYS:
            raise GridError(f"{path}: family.{key}: unknown key; allowed: "
                            f"{', '.join(FAMILY_KEYS)}")
        family[key] = _number(value, f"{path}: family.{key}", FAMILY_KEYS[key])

    sizes = raw["sizes"]
    if not isinstance(sizes, list) or not sizes:
        raise GridError(f"{path}: sizes: expected a non-empty list of sizes")
    for i, s in enumerate(sizes):
        try:
            size_multiplier(s)
        except ConfigError as e:
            raise GridError(f"{path}: sizes[{i}]: {e}") from None
    budgets = raw["budgets_flops"]
    if not isinstance(budgets, list) or not budgets:
        raise GridError(f"{path}: budgets_flops: expected a non-empty list of FLOPs")
    budgets = [_number(b, f"{path}: budgets_flops[{i}]") for i, b in enumerate(budgets)]
    if any(b <= 0 for b in budgets):
        raise GridError(f"{path}: budgets_flops: every budget must be > 0, got {budgets}")
    if len(set(budgets)) != len(budgets) or len({size_label(s) for s in sizes}) != len(sizes):
        raise GridError(f"{path}: sizes / budgets_flops: entries must be distinct")

    if not isinstance(raw["out_dir"], str) or not raw["out_dir"]:
        raise GridError(f"{path}: out_dir: expected a folder path, got {raw['out_dir']!r}")
    launch = raw.get("launch", DEFAULT_LAUNCH)
    if not isinstance(launch, str):
        raise GridError(f"{path}: launch: expected a command template string")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(launch) if f is not None]
    except ValueError as e:
        raise GridError(f"{path}: launch: bad template: {e}") from None
    for f in fields:
        if f not in PLACEHOLDERS:
            raise GridError(f"{path}: launch: unknown placeholder {{{f}}}; allowed: "
                            + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))

    min_steps = _number(raw.get("min_steps", 1), f"{path}: min_steps", int)
    cpr = _number(raw.get("checkpoints_per_run", 2), f"{path}: checkpoints_per_run", int)
    if min_steps < 1 or cpr < 1:
        raise GridError(f"{path}: min_steps / checkpoints_per_run: must be >= 1")
    max_steps = raw.get("max_steps")
    if max_steps is not None:
        max_steps = _number(max_steps, f"{path}: max_steps", int)
        if max_steps < min_steps:
            raise GridError(f"{path}: max_steps: must be >= min_steps ({min_steps})")
    warmup = raw.get("warmup_fraction")
    if warmup is not None:
        warmup = _number(warmup, f"{path}: warmup_fraction")
        if not 0.0 <= warmup < 1.0:
            raise GridError(f"{path}: warmup_fraction: must be in [0, 1), got {warmup}")

    grid = Grid(path, base, base_path, tuple(overrides), family, tuple(sizes),
                tuple(budgets), Path(raw["out_dir"]), launch, min_steps, max_steps, warmup, cpr)
    grid_points(grid)  # build every point now, so a bad config key stops before any run
    return grid


def _config(grid: Grid, overrides: list[str] | tuple[str, ...], where: str) -> Config:
    try:
        return from_dict(_merge(grid.base_data, parse_overrides(list(overrides))))
    except ConfigError as e:
        raise GridError(f"{grid.path}: {where}: {e}") from None


def budget_label(budget: float) -> str:
    """3e11 -> '3e11', 1.5e12 -> '1.5e12' (path-safe)."""
    return f"{budget:.3g}".replace("e+", "e").replace("e0", "e")


def grid_points(grid: Grid) -> tuple[list[Point], list[str]]:
    """The grid's points, smallest budget first, and a note for each point left out because
    its budget buys fewer than `min_steps` or more than `max_steps` steps."""
    base = _config(grid, grid.overrides, "base + overrides")
    points, skipped = [], []
    for budget in sorted(grid.budgets):
        for size in grid.sizes:
            fam_list, per_step = _sized(grid, size, base)
            steps = round(budget / per_step)
            limit = (f"< min_steps {grid.min_steps}" if steps < grid.min_steps else
                     f"> max_steps {grid.max_steps}"
                     if grid.max_steps and steps > grid.max_steps else None)
            if limit:
                skipped.append(f"{size_label(size)}-C{budget_label(budget)}: {budget:.3g} "
                               f"FLOPs buys {steps} steps of {per_step:.3g} FLOPs ({limit})")
                continue
            points.append(_point(grid, size, budget, fam_list, per_step, steps))
    return points, skipped


def make_point(grid: Grid, size: str | float, budget: float) -> Point:
    """The run of the grid's family at `size` spending `budget` training FLOPs, on the grid or
    off it (`vdit sweep run --extra` runs one off it); min_steps and max_steps do not apply."""
    fam_list, per_step = _sized(grid, size, _config(grid, grid.overrides, "base + overrides"))
    steps = round(budget / per_step)
    if steps < 1:
        raise GridError(f"{grid.path}: size {size} at {budget:.3g} FLOPs: the budget buys "
                        f"{steps} steps of {per_step:.3g} FLOPs")
    return _point(grid, size, budget, fam_list, per_step, steps)


def _sized(grid: Grid, size: str | float, base: Config) -> tuple[list[str], float]:
    """(the overrides of `size`, its train FLOPs per step)."""
    try:
        fam = family_overrides(base, size, **grid.family)
    except ConfigError as e:
        raise GridError(f"{grid.path}: {e}") from None
    fam_list = [*grid.overrides, *(f"{k}={_fmt(v)}" for k, v in fam.items())]
    return fam_list, train_flops_per_step(_config(grid, fam_list, f"size {size}"))


def _point(grid: Grid, size: str | float, budget: float, fam_list: list[str], per_step: float,
           steps: int) -> Point:
    name = f"{size_label(size)}-C{budget_label(budget)}"
    sched = {"train.steps": steps, "train.eval_every": steps,
             "train.checkpoint_every": math.ceil(steps / grid.checkpoints_per_run),
             "train.run_dir": str(grid.out_dir / name)}
    if grid.warmup_fraction is not None:
        sched["train.warmup_steps"] = round(grid.warmup_fraction * steps)
    overrides = _dedupe([*fam_list, *(f"{k}={_fmt(v)}" for k, v in sched.items())])
    return Point(name, size, budget, steps, per_step, overrides, _config(grid, overrides, name))


def launch_command(grid: Grid, point: Point, config_path: Path | str) -> str:
    """The grid's `launch` template filled in for one point."""
    return grid.launch.format(
        name=point.name, config=shlex.quote(str(config_path)), run_dir=shlex.quote(
            str(point.run_dir)), overrides=" ".join(shlex.quote(o) for o in point.overrides),
        size=size_label(point.size), budget=budget_label(point.budget), steps=point.steps)


# --- ledger -------------------------------------------------------------------------------


def is_finished(point: Point) -> bool:
    return point.steps in checkpoint_steps(point.run_dir)


def ledger_row(point: Point, wall_s: float | None, resumed_from: int | None) -> dict:
    """One ledger row from a finished run directory's metrics."""
    evals = [r for r in read_metrics(point.run_dir / "metrics.jsonl") if "eval_loss" in r]
    final = [r for r in evals if r["step"] == point.steps]
    if not final:
        raise RuntimeError(f"{point.run_dir}: no eval loss at step {point.steps} in metrics")
    start = [r for r in evals if r["step"] == 0]
    cfg, tokens_per_clip = point.cfg, point.cfg.num_tokens()
    return {
        "name": point.name, "size": size_label(point.size), "budget_flops": point.budget,
        "steps": point.steps, "batch_size": cfg.train.batch_size,
        "tokens_per_clip": tokens_per_clip, "width": cfg.model.width, "depth": cfg.model.depth,
        "heads": cfg.model.heads, "lr": cfg.train.lr, "params": count_params(cfg),
        "per_token_params": per_token_params(cfg), "flops_per_step": point.flops_per_step,
        "flops": point.flops_per_step * point.steps,
        "tokens": point.steps * cfg.train.batch_size * tokens_per_clip,
        "wall_s": wall_s, "resumed_from_step": resumed_from,
        "eval_loss": final[-1]["eval_loss"], "eval_loss_ema": final[-1].get("eval_loss_ema"),
        "eval_loss_start": start[0]["eval_loss"] if start else None,
        "run_dir": str(point.run_dir), "overrides": list(point.overrides),
    }


# --- running ------------------------------------------------------------------------------


def run_sweep(grid_path: str | Path, print_launch: bool = False, *,
              extra: tuple[str | float, float] | None = None, log=print) -> list[dict]:
    """Run (or, with print_launch, print the launch command of) every point of a grid.

    Returns the ledger rows of the grid's points (including those finished earlier), or with
    print_launch [{"name", "command"}] per point. Points whose budget buys fewer than the
    grid's min_steps are reported and left out. `extra` (size, budget): run only that point of
    the grid's family, on the grid or off it, into OUT/extrapolation.jsonl rather than the
    ledger, so fits of the ledger never see it (`vdit sweep predict` compares it).
    """
    from tqdm import tqdm

    grid = load_grid(grid_path)
    points, skipped = ([make_point(grid, *extra)], []) if extra else grid_points(grid)
    for note in skipped:  # on stderr, so printed launch commands can be piped as they are
        print(f"skipped {note}", file=sys.stderr)
    if print_launch:
        config_path: Path | str | None = grid.base_path
        if config_path is None:  # an inline base: the commands need it as a file
            grid.out_dir.mkdir(parents=True, exist_ok=True)
            config_path = grid.out_dir / "base.yaml"
            config_path.write_text(yaml.safe_dump(grid.base_data, sort_keys=False))
        out = [{"name": p.name, "command": launch_command(grid, p, config_path)}
               for p in points]
        for item in out:
            log(item["command"])
        return out

    from vdit.train.loop import train

    grid.out_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = grid.out_dir / (EXTRA_LEDGER if extra else LEDGER)
    done = {r["name"]: r for r in read_ledger(ledger_path)}
    rows = []
    bar = tqdm(points, desc="sweep", unit="point", dynamic_ncols=True)
    for point in bar:
        bar.set_postfix_str(point.name)
        if point.name in done:
            row = done[point.name]
            if _dedupe(row.get("overrides") or []) != point.overrides:
                raise GridError(f"{ledger_path}: the row for {point.name} was made with other "
                                "overrides than the grid now gives; use a new out_dir")
            rows.append(row)
            continue
        marker = point.run_dir / "sweep_point.json"
        if is_finished(point):  # trained, but the row was not written (killed in between)
            info = json.loads(marker.read_text()) if marker.exists() else {}
            row = ledger_row(point, info.get("wall_s"), info.get("resumed_from_step"))
        else:
            have = checkpoint_steps(point.run_dir)
            resumed_from = have[-1] if have else None
            tqdm.write(f"[{point.name}] {point.steps} steps, {point.flops_per_step:.3g} "
                       f"FLOPs/step, {point.cfg.model.width} wide x {point.cfg.model.depth}")
            t0 = time.perf_counter()
            train(point.cfg, log=lambda msg, n=point.name: tqdm.write(f"[{n}] {msg}"))
            wall = time.perf_counter() - t0
            marker.write_text(json.dumps({"wall_s": wall, "resumed_from_step": resumed_from}))
            row = ledger_row(point, wall, resumed_from)
        append_row(ledger_path, row)
        done[point.name] = row
        rows.append(row)
    bar.close()
    return rows


# --- command line -------------------------------------------------------------------------


def parse_extra(text: str) -> tuple[float | str, float]:
    """'1.25@3e14' -> (1.25, 3e14); ConfigError names --extra."""
    size, sep, budget = text.partition("@")
    try:
        if not sep:
            raise ValueError
        value = float(budget)
        size_value = size_multiplier(size)
    except (ValueError, ConfigError):
        raise ConfigError(f"--extra: expected SIZE@FLOPS such as 1.25@3e14, got {text!r}"
                          ) from None
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"--extra: the budget must be a finite number of FLOPs > 0, got "
                          f"{budget!r}")
    return size_value, value


def _cmd_run(args: argparse.Namespace) -> int:
    extra = parse_extra(args.extra) if args.extra else None
    rows = run_sweep(args.grid, print_launch=args.print_launch, extra=extra)
    if not args.print_launch:
        print(f"{len(rows)} points in the " + (EXTRA_LEDGER if extra else "ledger"))
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from vdit.scaling.fit import fit_ledger, format_fit

    src = Path(args.ledger)
    ledger = src / LEDGER if src.is_dir() else src
    if not ledger.is_file():
        raise FileNotFoundError(f"no ledger at {ledger}")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap: must be >= 0, got {args.bootstrap}")
    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top: must be >= 1, got {args.top}")
    out = Path(args.out) if args.out else ledger.parent
    if args.out:  # refused before the fit's minutes, not after
        from vdit.io.run_dir import check_output_dir

        check_output_dir(out, "--out")
    result = fit_ledger(ledger, out, n_boot=args.bootstrap, seed=args.seed, starts=args.starts,
                        top=args.top)
    print(format_fit(result))
    print(f"wrote {out / 'fit.json'} and plots in {out}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from vdit.scaling.sweep_status import format_status, sweep_status

    grid = load_grid(args.grid)
    print(format_status(sweep_status(grid_points(grid)[0], grid.out_dir / LEDGER)))
    return 0


def register(subparsers: Any) -> Any:
    """Add `sweep run GRID.yaml [--print-launch]` and `sweep fit LEDGER [--out DIR]` to an
    argparse subparsers object; the handlers are set as `func` and return an exit code.
    Returns the `sweep` command's own subparsers."""
    p = subparsers.add_parser("sweep", help="scaling-law sweeps: run a grid, fit L(N, D)")
    sub = p.add_subparsers(dest="sweep_command", required=True)
    r = sub.add_parser("run", help="train every (size, budget) point of a grid file; "
                       "finished points are skipped, interrupted ones resume")
    r.add_argument("grid", help="grid YAML, e.g. experiments/scaling/cpu.yaml")
    r.add_argument("--print-launch", action="store_true",
                   help="print one launch command per point instead of running")
    r.add_argument("--extra", metavar="SIZE@FLOPS", help="run one point of the grid's family "
                   "at this size and budget (e.g. 1.25@3e14), on the grid or off it, into "
                   "OUT/extrapolation.jsonl: a check of a fit's prediction")
    r.set_defaults(func=_cmd_run)
    f = sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to a ledger; "
                       "write fit.json and plots")
    f.add_argument("ledger", help="a sweep's out_dir or its ledger.jsonl")
    f.add_argument("--out", default=None, help="output folder (default: the ledger's)")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--starts", choices=("full", "coarse"), default="full",
                   help="grid of L-BFGS starting points: Hoffmann et al.'s 4500, or 243")
    f.add_argument("--top", type=int, default=64,
                   help="optimise only the starts with the lowest initial objective")
    f.set_defaults(func=_cmd_fit)
    s = sub.add_parser("status", help="points done, running and left, the time each took and "
                       "an estimate for the rest (reads files only; no JAX)")
    s.add_argument("grid", help="grid YAML, e.g. experiments/scaling/physics.yaml")
    s.set_defaults(func=_cmd_status)
    from vdit.scaling.physics_fit import register as register_physics_fit

    register_physics_fit(sub)
    return sub  # `sweep predict` (vdit/scaling/extrapolate.py, which reads grids) adds itself
