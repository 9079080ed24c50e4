"""`vdit sample RUN_DIR`: generate videos from prompts with a trained run (registered on the
`vdit` command by vdit/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vdit.config.arguments import NON_NEGATIVE, POSITIVE


def _cmd_sample(args: argparse.Namespace) -> int:
    from vdit.config import ConfigError

    if (args.run_dir is None) == (args.pipeline is None):
        raise ConfigError("give a run directory (or export) or --pipeline PATH, not both")
    if args.pipeline is not None:
        return _cmd_sample_pipeline(args)
    pipeline_only = [f for f in ("frames", "height", "width", "steps", "guidance",
                                 "guidance_2", "text_length", "dtype", "lora_2") if
                     getattr(args, f) is not None]
    if pipeline_only:
        raise ConfigError(f"--{pipeline_only[0].replace('_', '-')} is for --pipeline; a run "
                          "samples at its config's size and sample.* settings")
    loras = tuple(_lora_arg(x, "--lora") for x in args.lora or ())
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
    params, extra = _run_loras(cfg, params, loras)
    context = _read_context(args, cfg)
    rewrite = settings_from_args(args, cfg.sample.rewrite)  # None: no --rewrite-prompt
    out = Path(args.out) if args.out else free_samples_dir(args.run_dir)
    marking = Marking(watermark=not args.no_watermark, key=args.watermark_key or default_key(),
                      run_id=f"{Path(args.run_dir).resolve().name}@{step}",
                      c2pa_cert=args.c2pa_cert, c2pa_key=args.c2pa_key)
    paths = sample_run(cfg, system, params, stats, out, args.prompt or None, args.num,
                       args.seed, marking, context, args.context_frames or 0, args.overwrite,
                       negative_prompt=args.negative_prompt, rewrite=rewrite, extra=extra)
    for p in paths:
        print(p)
    return 0


def _run_loras(cfg, params, loras: tuple[tuple[str, float], ...]) -> tuple[dict, dict | None]:
    """A wan run's params with each `--lora FILE[:SCALE]` folded in (the --pipeline code:
    vdit's own exports and other tools' files alike, unmatched tensors named), and the
    sidecars' record of them."""
    if not loras:
        return params, None
    from vdit.config import ConfigError
    from vdit.export.diffusers import transformer_spec
    from vdit.sample.pipeline import apply_loras

    if cfg.model.kind != "wan" or not cfg.model.scan_layers:
        raise ConfigError("--lora: LoRA files adapt a model.kind 'wan' run with scanned blocks "
                          f"(this run: model.kind {cfg.model.kind!r}, model.scan_layers "
                          f"{cfg.model.scan_layers})")
    if cfg.train.expert == "both":
        raise ConfigError("--lora: this run samples with two Wan 2.2 experts; fold a LoRA into "
                          "one of them with --pipeline (--lora / --lora-2) after `vdit export "
                          "--to diffusers --pipeline`")
    params = apply_loras(params, transformer_spec(cfg), loras)
    return params, {"loras": [{"file": str(Path(p).resolve()), "scale": s} for p, s in loras]}


def _cmd_sample_pipeline(args: argparse.Namespace) -> int:
    """`vdit sample --pipeline PATH`: a diffusers WanPipeline folder (vdit/sample/pipeline.py)."""
    import dataclasses

    import jax

    from vdit.config import ConfigError, SampleConfig
    from vdit.io.run_dir import check_output_dir
    from vdit.io.wan_pipeline import resolve_pipeline
    from vdit.sample.generate import Marking, default_key
    from vdit.sample.pipeline import PipelineSettings, run_pipeline
    from vdit.sample.rewrite import settings_from_args

    if args.step is not None or args.raw or args.context is not None:
        raise ConfigError("--step, --raw and --context are for runs, not --pipeline")
    _check_c2pa(args)
    if args.out:
        check_output_dir(args.out, "--out")
    spec = resolve_pipeline(args.pipeline)
    given = {f: getattr(args, f) for f in ("frames", "height", "width", "steps", "guidance",
                                           "guidance_2", "text_length", "dtype", "fps")
             if getattr(args, f, None) is not None}
    given["loras"] = tuple(_lora_arg(x, "--lora") for x in args.lora or ())
    given["loras_2"] = tuple(_lora_arg(x, "--lora-2") for x in args.lora_2 or ())
    default_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    settings = dataclasses.replace(PipelineSettings(dtype=default_dtype), **given)
    print(f"{spec.path}: {len(spec.expert_folders())} transformer(s) "
          f"(width {spec.transformer.model.width}, {spec.transformer.model.depth} layers), "
          f"{settings.frames} x {settings.height} x {settings.width}, {settings.steps} steps, "
          f"guidance {settings.guidance}, {settings.dtype}", file=sys.stderr)
    rewrite = settings_from_args(args, SampleConfig().rewrite)
    out = Path(args.out) if args.out else Path("samples") / spec.path.name
    marking = Marking(watermark=not args.no_watermark, key=args.watermark_key or default_key(),
                      run_id=f"pipeline:{spec.path.name}", c2pa_cert=args.c2pa_cert,
                      c2pa_key=args.c2pa_key)
    if not args.prompt:
        raise ConfigError("--pipeline needs at least one --prompt")
    paths = run_pipeline(spec, args.prompt, args.negative_prompt, num=args.num or 1,
                         seed=args.seed or 0, settings=settings, out_dir=out, marking=marking,
                         overwrite=args.overwrite, rewrite=rewrite)
    for p in paths:
        print(p)
    return 0


def _lora_arg(value: str, flag: str) -> tuple[str, float]:
    """FILE or FILE:SCALE -> (FILE, scale); the file must exist."""
    from vdit.config import ConfigError

    path, scale = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = value
    if not Path(path).is_file():
        raise ConfigError(f"{flag}: {path} is not a file (expected FILE or FILE:SCALE)")
    return path, scale


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
    p.add_argument("run_dir", nargs="?", default=None,
                   help="a DiT run directory, or its export (vdit export)")
    w = p.add_argument_group("diffusers Wan pipelines (--pipeline; docs/open-models.md)")
    w.add_argument("--pipeline", default=None, metavar="PATH", help="sample a diffusers "
                   "WanPipeline folder (Wan 2.1, Wan 2.2 A14B / TI2V-5B text-to-video)")
    w.add_argument("--frames", type=POSITIVE, default=None, help="video frames, 1 + 4k "
                   "(default 81)")
    w.add_argument("--height", type=POSITIVE, default=None, help="pixels (default 480)")
    w.add_argument("--width", type=POSITIVE, default=None, help="pixels (default 832)")
    w.add_argument("--steps", type=POSITIVE, default=None, help="scheduler steps (default 50)")
    w.add_argument("--guidance", type=float, default=None, help="CFG scale (default 5.0)")
    w.add_argument("--guidance-2", type=float, default=None, help="Wan 2.2 A14B: the "
                   "low-noise expert's CFG scale (default: --guidance)")
    w.add_argument("--text-length", type=POSITIVE, default=None, help="UMT5 tokens, zero-"
                   "padded (default 512, as the pipeline)")
    w.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="the transformer's compute dtype (default: float32 on CPU, else bf16)")
    w.add_argument("--fps", type=float, default=None, help="mp4 frame rate (default 16)")
    w.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="fold a LoRA into "
                   "the transformer (diffusers / PEFT or ComfyUI / musubi naming; repeatable); "
                   "also for a model.kind wan run or export")
    w.add_argument("--lora-2", action="append", metavar="FILE[:SCALE]", help="Wan 2.2 A14B: "
                   "a LoRA for transformer_2 (the low-noise expert)")
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
