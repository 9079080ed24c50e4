"""The `vdit` command. Thin: parses arguments and calls into the packages."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _setup_jax() -> None:
    """Persistent compilation cache: a second process skips most compile time."""
    import jax

    cache = os.environ.get("VDIT_COMPILATION_CACHE", str(Path.home() / ".cache" / "vdit" / "jax"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _load(config: str | None, overrides: list[str]):
    from vdit.config import load_config

    overrides = list(overrides)
    # `vdit train model.depth=6` (no file): overrides on the embedded default.
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    return load_config(config, overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from vdit.train.loop import train

    train(_load(args.config, args.overrides))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from vdit.train.bench import bench, format_report

    cfg = _load(args.config, args.overrides)
    result = bench(cfg, steps=args.steps, warmup=args.warmup)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from vdit.sample.generate import sample_run
    from vdit.train.run_dir import load_run

    cfg, system, state = load_run(args.run_dir, args.step)
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples"
    prompts = args.prompt or None
    paths = sample_run(cfg, system, state.ema_params if not args.raw else state.params,
                       state.stats, out, prompts, args.num, args.seed)
    for p in paths:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdit", description="Text-to-video diffusion "
                                     "transformers on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a text-to-video DiT (resumes automatically)")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: experiments/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("bench", help="compile and time the train step: tokens/s, MFU, memory")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("sample", help="generate videos from prompts with a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", help="a caption (repeatable); default: the "
                   "config's sample.prompts")
    p.add_argument("--num", type=int, default=None, help="videos per prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/samples)")
    p.add_argument("--raw", action="store_true", help="use raw params instead of the EMA")
    p.set_defaults(func=_cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vdit.config import ConfigError

    _setup_jax()
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"vdit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
