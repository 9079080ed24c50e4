"""Caption encoding in `vdit tokenize`: captions/s of a T5 encoder against the autoencoder's
clips/s in the same run, and the bytes of the stored embeddings per clip.

    python tools/bench_text.py [--clips 64] [--layers 6] [--d-model 512] [--max-length 128]

The encoder has t5-small's shape by default (d_model 512, 6 layers, 8 heads of 64, d_ff 2048,
ReLU, vocabulary 32128; 35 M encoder parameters) with random weights, written as a Hugging Face
folder in a temporary directory (no download; the tokenizer is the T5 test fixture's). Clips are
synthetic 9x32x32 uint8 videos encoded by the config's autoencoder (default: the demo's causal
VAE, checkpoints/autoencoder-4x8x8). The job runs twice, and the second (warm: programs
compiled) run is reported; `vdit tokenize` itself prints the same rates at its end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "t5" / "t5_v11" / "tokenizer.json"
WORDS = (
    "a", "slow", "camera", "pan", "over", "a", "red", "brick", "house", "at", "dusk", "while",
    "birds", "fly", "past", "the", "old", "oak", "tree", "and", "a", "child", "in", "a", "yellow",
    "coat", "runs", "along", "the", "river", "bank", "towards", "the", "bridge",
)


def write_random_t5(folder: Path, *, d_model: int, layers: int, heads: int, d_ff: int,
                    vocab: int, seed: int = 0) -> Path:
    """A t5-small-shaped (original T5: ReLU FFN) encoder with random weights as a HF folder."""
    from safetensors.numpy import save_file

    from vdit.io.hf_t5 import hf_tensor_map, read_spec

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "t5", "vocab_size": vocab, "d_model": d_model,
              "d_kv": d_model // heads, "d_ff": d_ff, "num_layers": layers, "num_heads": heads,
              "feed_forward_proj": "relu", "relative_attention_num_buckets": 32,
              "relative_attention_max_distance": 128, "pad_token_id": 0, "eos_token_id": 1}
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
               for name, shape, _ in hf_tensor_map(read_spec(folder)).values()}
    save_file(tensors, str(folder / "model.safetensors"))
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder


class SyntheticClips:
    """`n` moving-gradient uint8 clips [9, 32, 32, 3] with captions of 12-40 words."""

    def __init__(self, n: int, shape: tuple[int, int, int] = (9, 32, 32)):
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def load(self, i: int):
        from vdit.data.sources import RawClip

        rng = np.random.default_rng(i)
        t, h, w = self.shape
        grid = np.add.outer(np.arange(h), np.arange(w))[None] + 3 * np.arange(t)[:, None, None]
        frames = np.stack([(grid * (c + 1) + rng.integers(255)) % 256 for c in range(3)], -1)
        caption = " ".join(rng.choice(WORDS, int(rng.integers(12, 41))))
        return RawClip(frames.astype(np.uint8), 8.0, caption, f"synthetic/{i}", "generated")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("overrides", nargs="*", help="config overrides (default config)")
    args = parser.parse_args(argv)

    import dataclasses

    from vdit.config import load_config
    from vdit.data.buckets import parse_buckets
    from vdit.data.shards import decode_record, read_shard, shard_paths
    from vdit.data.tokenize import TokenizeOptions, tokenize

    work = Path(tempfile.mkdtemp(prefix="bench_text_"))
    try:
        encoder = write_random_t5(work / "t5", d_model=args.d_model, layers=args.layers,
                                  heads=args.heads, d_ff=args.d_ff, vocab=args.vocab)
        cfg = load_config(None, args.overrides)
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(
            cfg.text, encoder="precomputed", checkpoint=str(encoder), max_length=args.max_length,
            width=args.d_model))
        w = cfg.data.world
        source = SyntheticClips(args.clips, (w.frames, w.height, w.width))
        for run in ("cold", "warm"):
            opts = TokenizeOptions(work / run, parse_buckets(f"{w.frames}x{w.height}x{w.width}"),
                                   shard_size=args.clips)
            t0 = time.perf_counter()
            index = tokenize(source, cfg, opts, log_fn=lambda s: None)
            wall = time.perf_counter() - t0
        t = opts.timings
        records = [decode_record(r) for p in shard_paths(work / "warm", index)
                   for r in read_shard(p)]
        text_bytes = np.mean([r.text.nbytes for r in records])
        latent_bytes = np.mean([r.latent.nbytes for r in records])
        tokens = np.mean([len(r.tokens) for r in records])
        params = sum(int(np.prod(s)) for s in _shapes(encoder))
        print(f"text encoder: T5 d_model {args.d_model}, {args.layers} layers, {args.heads} "
              f"heads, d_ff {args.d_ff}, vocab {args.vocab} ({params / 1e6:.1f} M params, "
              f"random weights), max_length {args.max_length}")
        print(f"autoencoder: {cfg.autoencoder.kind} {cfg.autoencoder.checkpoint or ''} on "
              f"{w.frames}x{w.height}x{w.width} clips")
        print(f"warm run of {args.clips} clips: {wall:.2f} s wall")
        print(f"  text encoder: {t['captions'] / t['text_s']:.1f} captions/s "
              f"({t['text_s']:.2f} s)")
        print(f"  autoencoder:  {t['clips'] / t['autoencoder_s']:.1f} clips/s "
              f"({t['autoencoder_s']:.2f} s)")
        print(f"  stored per clip: caption embeddings {text_bytes / 1024:.1f} KiB "
              f"({tokens:.1f} tokens x {args.d_model} bf16), latent {latent_bytes / 1024:.1f} "
              f"KiB; {index['captions_truncated']} captions truncated")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _shapes(folder: Path):
    from vdit.io.hf_t5 import hf_tensor_map, read_spec

    return [shape for _, shape, _ in hf_tensor_map(read_spec(folder)).values()]


if __name__ == "__main__":
    raise SystemExit(main())
