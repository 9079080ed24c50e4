"""`vdit sample RUN_DIR`: generate videos from prompts with a trained run (registered on the
`vdit` command by vdit/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vdit.config.arguments import NON_NEGATIVE, POSITIVE


def _cmd_sample(args: argparse.Namespace) -> int:
    from vdit.io.run_dir import check_output_dir
    from vdit.sample.generate import Marking, default_key, free_samples_dir, sample_run
    from vdit.sample.loading import load_for_sampling
    from vdit.sample.rewrite import settings_from_args

    if args.no_watermark:
        print("WARNING: --no-watermark: these videos carry NO invisible watermark and cannot be "
              "detected as AI-generated from their pixels; their sidecars record this.",
              file=sys.stderr)
    _check_c2pa(args)
    if args.out:
        check_output_dir(args.out, "--out")
    cfg, system, params, stats, step = load_for_sampling(args.run_dir, args.step, args.raw)
    context = _read_context(args, cfg)
    rewrite = settings_from_args(args, cfg.sample.rewrite)  # None: no --rewrite-prompt
    out = Path(args.out) if args.out else free_samples_dir(args.run_dir)
    marking = Marking(watermark=not args.no_watermark, key=args.watermark_key or default_key(),
                      run_id=f"{Path(args.run_dir).resolve().name}@{step}",
                      c2pa_cert=args.c2pa_cert, c2pa_key=args.c2pa_key)
    paths = sample_run(cfg, system, params, stats, out, args.prompt or None, args.num,
                       args.seed, marking, context, args.context_frames or 0, args.overwrite,
                       negative_prompt=args.negative_prompt, rewrite=rewrite)
    for p in paths:
        print(p)
    return 0


def _check_c2pa(args: argparse.Namespace) -> None:
    """C2PA signing needs both files. Checked before sampling: the signer would otherwise find
    a missing file only after the first video, and one flag alone silently signed nothing."""
    from vdit.config import ConfigError

    given = {"--c2pa-cert": args.c2pa_cert, "--c2pa-key": args.c2pa_key}
    if any(given.values()) and not all(given.values()):
        have, need = sorted(given, key=lambda k: not given[k])
        raise ConfigError(f"{have} needs {need} (C2PA signing uses both)")
    for flag, path in given.items():
        if path and not Path(path).is_file():
            raise ConfigError(f"{flag}: {path} is not a file")


def _read_context(args: argparse.Namespace, cfg):
    """`--context VIDEO --context-frames K` -> the video's frames (checked), or None."""
    from vdit.config import ConfigError

    if args.context is None:
        if args.context_frames is not None:
            raise ConfigError("--context-frames needs --context VIDEO")
        return None
    from vdit.data.video_io import read_video
    from vdit.sample.continuation import describe_method, fit_context

    if args.context_frames is None:
        raise ConfigError("--context needs --context-frames K (latent frames to keep)")
    try:
        frames, _ = read_video(args.context)
    except ValueError as e:
        raise ConfigError(f"--context: {e}") from None
    fit_context(frames, cfg, args.context_frames, source=f"--context {args.context}")
    print(describe_method(cfg, args.context_frames))
    return frames


def register(subparsers: Any) -> None:
    """Add `sample` to an argparse subparsers object; its handler returns an exit code."""
    p = subparsers.add_parser("sample", help="generate videos from prompts with a trained run")
    p.add_argument("run_dir", help="a DiT run directory, or its export (vdit export)")
    p.add_argument("--prompt", action="append", help="a caption (repeatable); default: the "
                   "config's sample.prompts")
    p.add_argument("--num", type=POSITIVE, default=None, help="videos per prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--step", type=NON_NEGATIVE, default=None,
                   help="checkpoint step (default: latest)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/samples, or "
                   "samples-2, -3, ... when earlier samples are there)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier samples of the same names in --out")
    p.add_argument("--raw", action="store_true", help="use raw params instead of the EMA")
    p.add_argument("--context", default=None, metavar="VIDEO",
                   help="continue this video (mp4 of the run's size or an integer multiple)")
    p.add_argument("--context-frames", type=int, default=None, metavar="K",
                   help="latent frames of --context kept (1 + ft(K-1) video frames for the "
                   "causal VAE)")
    p.add_argument("--no-watermark", action="store_true",
                   help="do NOT embed the invisible watermark (recorded in each sidecar)")
    p.add_argument("--watermark-key", default=None,
                   help="watermark key (default: $VDIT_WATERMARK_KEY or the public key)")
    p.add_argument("--c2pa-cert", default=None, help="PEM certificate chain: sign a C2PA "
                   "manifest into each mp4 (needs pip install 'vdit[c2pa]')")
    p.add_argument("--c2pa-key", default=None, help="PEM private key of --c2pa-cert")
    p.add_argument("--negative-prompt", default=None, help="guidance pushes away from this "
                   "caption instead of the empty one (runs with a pretrained text encoder)")
    from vdit.sample.rewrite import add_arguments as add_rewrite_arguments

    add_rewrite_arguments(p)
    p.set_defaults(func=_cmd_sample)
