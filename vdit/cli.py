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
    from vdit.sample.generate import Marking, default_key, sample_run
    from vdit.train.run_dir import load_run

    if args.no_watermark:
        print("WARNING: --no-watermark: these videos carry NO invisible watermark and cannot be "
              "detected as AI-generated from their pixels; their sidecars record this.",
              file=sys.stderr)
    cfg, system, state = load_run(args.run_dir, args.step)
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples"
    marking = Marking(watermark=not args.no_watermark, key=args.watermark_key or default_key(),
                      run_id=f"{Path(args.run_dir).resolve().name}@{int(state.step)}",
                      c2pa_cert=args.c2pa_cert, c2pa_key=args.c2pa_key)
    params = state.params if args.raw else state.ema_params
    paths = sample_run(cfg, system, params, state.stats, out, args.prompt or None, args.num,
                       args.seed, marking)
    for p in paths:
        print(p)
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    import json

    from vdit.data.video_io import read_video
    from vdit.provenance import detect, read_sidecar
    from vdit.sample.generate import default_key

    try:
        frames, _ = read_video(args.video)
    except ValueError as e:
        print(f"vdit detect: error: {e}", file=sys.stderr)
        return 2
    found = detect(frames, args.key or default_key())
    sidecar = read_sidecar(args.video)
    result = {"video": args.video, "watermark": found.present,
              "payload": None if found.payload is None else f"{found.payload:#010x}",
              "score": round(found.score, 2), "message": found.message, "sidecar": sidecar}
    if args.json:
        print(json.dumps(result))
    else:
        state = "PRESENT" if found.present else "not found"
        print(f"{args.video}: watermark {state} (score {found.score:.1f}); {found.message}")
        if found.present:
            print(f"  payload {result['payload']}")
        if sidecar:
            print(f"  sidecar: ai_generated={sidecar.get('ai_generated')}, "
                  f"model {str(sidecar.get('model_hash'))[:16]}, seed {sidecar.get('seed')}, "
                  f"prompt {sidecar.get('prompt')!r}, watermark {sidecar.get('watermark')}")
    return 0 if found.present else 1


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
    p.add_argument("--no-watermark", action="store_true",
                   help="do NOT embed the invisible watermark (recorded in each sidecar)")
    p.add_argument("--watermark-key", default=None,
                   help="watermark key (default: $VDIT_WATERMARK_KEY or the public key)")
    p.add_argument("--c2pa-cert", default=None, help="PEM certificate chain: sign a C2PA "
                   "manifest into each mp4 (needs pip install 'vdit[c2pa]')")
    p.add_argument("--c2pa-key", default=None, help="PEM private key of --c2pa-cert")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("detect", help="check a video for vdit's watermark (exit 0 if present)")
    p.add_argument("video")
    p.add_argument("--key", default=None,
                   help="watermark key (default: $VDIT_WATERMARK_KEY or the public key)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_detect)
    from vdit.scaling.sweep import register as register_sweep

    register_sweep(sub)
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
