"""The `vdit` command. Thin: parses arguments and calls into the packages."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vdit.config import load_from_command_line
from vdit.config.arguments import NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT


def _setup_jax() -> None:
    """Persistent compilation cache: a second process skips most compile time."""
    import jax

    cache = os.environ.get("VDIT_COMPILATION_CACHE", str(Path.home() / ".cache" / "vdit" / "jax"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _join_cluster() -> None:
    """Multi-host runs: every process joins before touching a device (see
    vdit/parallel/distributed.py for the environment variables)."""
    from vdit.parallel.distributed import initialize

    initialize()


def _cmd_train(args: argparse.Namespace) -> int:
    from vdit.train.loop import train

    cfg = load_from_command_line(args.config, args.overrides)
    _join_cluster()
    train(cfg)
    return 0


def _cmd_train_ae(args: argparse.Namespace) -> int:
    from vdit.config import AUTOENCODER_CONFIG
    from vdit.train.autoencoder_system import AutoencoderSystem
    from vdit.train.loop import train

    config = args.config
    if config is None or ("=" in config and not Path(config).exists()):
        args.overrides = ([config] if config else []) + list(args.overrides)
        config = str(AUTOENCODER_CONFIG)
    cfg = load_from_command_line(config, args.overrides)
    _join_cluster()
    train(cfg, system=AutoencoderSystem(cfg))
    return 0


def _cmd_eval_ae(args: argparse.Namespace) -> int:
    import json

    from vdit.eval.autoencoder_eval import evaluate_autoencoder

    if args.videos or args.shards:  # the user's footage (vdit/eval/footage_eval.py)
        return _eval_footage(args)
    result = evaluate_autoencoder(args.path, clips=args.clips or 64, batch=args.batch,
                                  out=args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.path}: {result['clips']} held-out clips of {result['video']} (T, H, W), "
              f"factors {result['factors']} -> latent {result['latent']}")
        print(f"  PSNR {result['psnr_db']:.2f} dB (min {result['psnr_db_min']:.2f}), "
              f"SSIM {result['ssim']:.4f} (min {result['ssim_min']:.4f})")
    return 0


def _eval_footage(args: argparse.Namespace) -> int:
    import json

    from vdit.config import ConfigError
    from vdit.eval.footage_eval import evaluate_footage

    for flag, path in (("--videos", args.videos), ("--shards", args.shards)):
        if path and not Path(path).is_dir():
            raise ConfigError(f"{flag}: {path} is not a folder")
    result = evaluate_footage(args.path, videos=args.videos, shards=args.shards,
                              frames=args.frames, clips=args.clips, tile=args.tile,
                              out=args.out)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.path}: {result['clips']} clips of {result['source']}, factors "
          f"{result['factors']}")
    for r in result["per_clip"]:
        print(f"  {r['clip']} {r['video']} (T, H, W){' tiled' if r['tiled'] else ''}: "
              f"PSNR {r['psnr_db']:.2f} dB, SSIM {r['ssim']:.4f}")
    print(f"  PSNR {result['psnr_db']:.2f} dB (min {result['psnr_db_min']:.2f}), "
          f"SSIM {result['ssim']:.4f} (min {result['ssim_min']:.4f})")
    return 0


def _cmd_eval_physics(args: argparse.Namespace) -> int:
    from vdit.eval.physics_eval import run_eval_physics

    summary = run_eval_physics(args.run_dirs, clips=args.clips, out=args.out,
                               context_frames=args.context_frames, seed=args.seed, raw=args.raw)
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "physics"
    print(f"wrote {out / 'physics.json'} and {', '.join(summary['plots'])}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vdit.export.run_export import export_run

    out = export_run(args.run_dir, to=args.to, out=args.out, raw=args.raw, step=args.step,
                     overwrite=args.overwrite, dtype=args.dtype, pipeline=args.pipeline,
                     lora_format=args.format, merge=args.merge)
    print(out)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from vdit.train.bench import bench, format_report

    cfg = load_from_command_line(args.config, args.overrides)
    result = bench(cfg, steps=args.steps, warmup=args.warmup, runs=args.runs)
    print(json.dumps(result) if args.json else format_report(result))
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


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from vdit.config import ConfigError
    from vdit.data import sources
    from vdit.data.buckets import parse_buckets
    from vdit.data.tokenize import TokenizeOptions, tokenize
    from vdit.io.run_dir import check_output_dir

    check_output_dir(args.out, "out")
    if args.videos and not Path(args.videos).is_dir():
        raise ConfigError(f"--videos: {args.videos} is not a folder")
    cfg = load_from_command_line(args.config, args.overrides)
    pipeline = None
    if args.pipeline:  # its VAE and UMT5, captions padded to 512 as the pipeline pads them
        from vdit.data.tokenize import pipeline_config
        from vdit.io.wan_pipeline import resolve_pipeline

        if args.text_encoder:
            raise ConfigError("--pipeline names the text encoder (its text_encoder/); drop "
                              "--text-encoder")
        pipeline = resolve_pipeline(args.pipeline)
        given = any(o.split("=", 1)[0] == "text.max_length" for o in args.overrides)
        cfg = pipeline_config(cfg, pipeline, cfg.text.max_length if given else None)
    elif args.text_encoder:  # captions through a pretrained encoder, stored as embeddings
        import dataclasses

        encoder = "precomputed" if cfg.text.encoder == "transformer" else cfg.text.encoder
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(
            cfg.text, encoder=encoder, checkpoint=args.text_encoder, checkpoint_sha256=""))
    world = cfg.data.world  # default bucket: the clip shape this config trains on
    try:
        buckets = parse_buckets(args.buckets or f"{world.frames}x{world.height}x{world.width}")
    except ValueError as e:
        raise ConfigError(f"--buckets: {e}") from None
    if args.videos:
        if not args.captions:
            raise ConfigError("--videos needs --captions (a .csv or .jsonl file)")
        try:
            source = sources.FolderSource(args.videos, args.captions, args.license)
        except ValueError as e:  # a captions file without the columns it needs, bad JSON
            raise ConfigError(f"--captions: {e}") from None
        what = {"source": "folder", "videos": args.videos, "captions": args.captions}
    elif args.tfds:
        source = sources.TfdsSource(args.tfds, args.data_dir, args.split,
                                    video_key=args.video_key, caption_key=args.caption_key,
                                    fps=args.source_fps, default_license=args.license)
        what = {"source": "tfds", "name": args.tfds, "split": args.split}
    else:
        source = sources.PhysicsSource(cfg.data.world, cfg.data.seed, args.physics)
        what = {"source": "physics", "num_clips": args.physics, "seed": cfg.data.seed}
    opts = TokenizeOptions(Path(args.out), buckets, args.fps, args.shard_size, args.batch,
                           args.dtype, args.process, args.processes, what, pipeline)
    tokenize(source, cfg, opts)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdit", description="Text-to-video diffusion "
                                     "transformers on JAX.")
    from vdit import __version__

    parser.add_argument("--version", action="version", version=f"vdit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a text-to-video DiT (resumes automatically)")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: experiments/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("train-ae", help="train the causal video autoencoder (resumes "
                       "automatically)")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: experiments/autoencoder.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    p.set_defaults(func=_cmd_train_ae)

    p = sub.add_parser("eval-ae", help="PSNR / SSIM of a trained autoencoder on held-out clips")
    p.add_argument("path", help="autoencoder run directory, exported autoencoder, or a "
                   "diffusers AutoencoderKLWan folder")
    p.add_argument("--clips", type=POSITIVE, default=None, help="held-out clips (default 64; "
                   "with --videos / --shards: all)")
    footage = p.add_mutually_exclusive_group()
    footage.add_argument("--videos", default=None, metavar="DIR", help="your videos and "
                         "images, each at its own resolution (tiled where large)")
    footage.add_argument("--shards", default=None, metavar="DIR", help="the clips behind a "
                         "shard folder of `vdit tokenize --videos`, at their buckets")
    p.add_argument("--frames", type=POSITIVE, default=17, help="with --videos: first frames "
                   "of each video (default 17)")
    p.add_argument("--tile", type=POSITIVE, default=None, help="with --videos / --shards: "
                   "tile clips larger than this many pixels (default: autoencoder.tile)")
    p.add_argument("--batch", type=POSITIVE, default=8)
    p.add_argument("--out", default=None, help="where eval_ae.json / .gif go (default: PATH)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_eval_ae)

    p = sub.add_parser("eval-physics", help="continue held-out simulations and measure their "
                       "physics (velocity, gravity, permanence, ...) in and out of distribution")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="DiT run directories; "
                   "several (a sweep) also give physics_vs_compute.png")
    p.add_argument("--clips", type=POSITIVE, default=8, help="held-out clips per split (default 8)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/physics)")
    p.add_argument("--context-frames", type=int, default=None, metavar="K",
                   help="latent frames given (default: the run's diffusion.context_frames, "
                   "else a third of the clip)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--raw", action="store_true", help="raw params instead of the EMA")
    p.set_defaults(func=_cmd_eval_physics)

    p = sub.add_parser("export", help="export a run: safetensors, a StableHLO sampler, a "
                       "param-only checkpoint, or diffusers folders (model.kind wan)")
    p.add_argument("run_dir")
    p.add_argument("--to", choices=["safetensors", "stablehlo", "params", "diffusers", "lora"],
                   default="safetensors",
                   help="safetensors: weights + config.json; stablehlo: also the generation "
                   "function (jax.export, cpu/cuda/tpu); params: a param-only orbax checkpoint "
                   "on one host; diffusers: a model.kind wan run's transformer/ folder "
                   "(WanTransformer3DModel.from_pretrained), docs/export-diffusers.md; lora: a "
                   "LoRA run's adapters as one .safetensors (docs/fine-tuning.md)")
    p.add_argument("--format", choices=["diffusers", "comfyui"], default=None,
                   help="with --to lora: PEFT names for WanPipeline.load_lora_weights "
                   "(default), or ComfyUI / musubi-tuner names")
    p.add_argument("--merge", action="store_true", help="with --to lora: a diffusers "
                   "transformer folder with the LoRA folded in, instead of the LoRA file")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="with --to diffusers: the tensors' dtype (default float32, bit-exact)")
    p.add_argument("--pipeline", default=None, metavar="PIPELINE",
                   help="with --to diffusers: the WanPipeline folder the run's text encoder and "
                   "VAE came from; OUT becomes a whole pipeline (its tokenizer, text encoder, "
                   "VAE and scheduler, the run's transformer)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export_TO)")
    p.add_argument("--overwrite", action="store_true", help="write over an earlier export in --out")
    p.add_argument("--raw", action="store_true", help="raw params instead of the EMA")
    p.add_argument("--step", type=NON_NEGATIVE, default=None,
                   help="checkpoint step (default: latest)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="compile and time the train step: tokens/s, MFU, memory")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=POSITIVE, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="untimed steps first")
    p.add_argument("--runs", type=POSITIVE, default=1, help="rounds of --steps steps; step "
                   "time and MFU are the medians over the rounds (for machines whose speed "
                   "drifts)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_bench)

    from vdit.sample.command import register as register_sample

    register_sample(sub)

    p = sub.add_parser("detect", help="check a video for vdit's watermark (exit 0 if present)")
    p.add_argument("video")
    p.add_argument("--key", default=None,
                   help="watermark key (default: $VDIT_WATERMARK_KEY or the public key)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_detect)
    p = sub.add_parser("tokenize", help="encode videos into latent shards for "
                       "data.source=shards (resumable; split over processes by shard)")
    p.add_argument("out", help="output folder of shards and index.json")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config whose autoencoder and text sections are used")
    p.add_argument("overrides", nargs="*")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", help="a folder of video files (needs --captions)")
    src.add_argument("--tfds", help="a TFDS dataset name, read with tfds.data_source")
    src.add_argument("--physics", type=POSITIVE, metavar="N", help="the first N physics clips")
    p.add_argument("--captions", help="CSV or JSONL with columns path, caption[, license]")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--split", default="train", help="TFDS split (default train)")
    p.add_argument("--video-key", default="frames", help="TFDS feature of uint8 frames")
    p.add_argument("--caption-key", default="caption", help="TFDS feature of the caption")
    p.add_argument("--source-fps", type=POSITIVE_FLOAT, default=8.0,
                   help="frame rate of TFDS examples without an 'fps' feature")
    p.add_argument("--buckets", default=None,
                   help="FRAMESxHEIGHTxWIDTH,... in pixels (default: the config's clip shape, "
                   "data.world frames x height x width)")
    p.add_argument("--fps", type=POSITIVE_FLOAT, default=None, help="resample to this frame rate")
    p.add_argument("--shard-size", type=POSITIVE, default=256, help="inputs per shard")
    p.add_argument("--batch", type=POSITIVE, default=8, help="clips per encoder call")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--text-encoder", default=None, metavar="PATH",
                   help="a T5-family Hugging Face folder: store each caption's embeddings "
                   "(text.dtype) for text.encoder=precomputed (default: the config's "
                   "text.checkpoint when text.encoder is t5 or precomputed)")
    p.add_argument("--pipeline", default=None, metavar="PATH",
                   help="a diffusers WanPipeline folder: encode with its VAE (vae/) and store "
                   "captions of its UMT5 (text_encoder/ + tokenizer/) at text.max_length 512, "
                   "as the pipeline pads them (docs/fine-tuning.md); buckets must fit its VAE "
                   "and patch")
    p.add_argument("--license", default="unknown", help="licence of inputs that name none")
    p.add_argument("--process", type=NON_NEGATIVE, default=0, help="this process's number")
    p.add_argument("--processes", type=POSITIVE, default=1, help="processes sharing the work")
    p.set_defaults(func=_cmd_tokenize)

    from vdit.scaling.extrapolate import register as register_predict
    from vdit.scaling.sweep import register as register_sweep

    register_predict(register_sweep(sub))
    from vdit.train.plan_report import register as register_plan

    register_plan(sub)
    from vdit.launch import register as register_launch

    register_launch(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # the command line, not a caller in this process
        from vdit import host_allocator

        host_allocator.ensure()
    from vdit.config import ConfigError
    from vdit.io.hf_folder import CheckpointFormatError
    from vdit.io.safetensors_io import ExportError
    from vdit.parallel.distributed import DistributedError
    from vdit.train.guards import TrainingStopped

    _setup_jax()
    try:
        return args.func(args)
    except (ConfigError, ExportError, DistributedError, FileNotFoundError,
            CheckpointFormatError) as e:
        print(f"vdit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"vdit {args.command}: stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
