"""Run a vdit StableHLO export without vdit: jax, numpy and safetensors only.

    python tools/run_exported.py EXPORT_DIR --prompt "a red ball falls" --seed 0 --num 2 \
        --out video.npy

Writes uint8 frames [num, T, H, W, 3] as .npy: the frames `vdit sample` would make for the same
prompt, seed and num (prompt index 0), before vdit adds its watermark and provenance records.

An export of a run with a pretrained text encoder takes caption embeddings instead of a prompt
(its tokenizer.json says "kind": "embeddings" and names the encoder):

    python tools/run_exported.py EXPORT_DIR --embeddings caption.safetensors --seed 0

where caption.safetensors holds "text" float32 [S, E] (or [n, S, E]) and "text_mask" int32 [S]
(or [n, S]); docs/real-data.md shows how to make it with the run's encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def verify(root: Path) -> None:
    """Refuse an export whose files do not match the SHA-256 sums in its config.json."""
    sums = json.loads((root / "config.json").read_text()).get("sha256", {})
    for name in ("model.safetensors", "sampler.stablehlo", "tokenizer.json"):
        if name not in sums:
            sys.exit(f"run_exported: {root / 'config.json'} lists no SHA-256 for {name}")
        if hashlib.sha256((root / name).read_bytes()).hexdigest() != sums[name]:
            sys.exit(f"run_exported: {root / name} does not match its SHA-256: corrupt or altered")


def tokenize(text: str, tok: dict) -> np.ndarray:
    """The export's word tokenizer: BOS, word ids (unknown words -> UNK), PAD to max_length."""
    ids = {w: i for i, w in enumerate(tok["words"])}
    words = re.findall(tok["pattern"], text.lower())
    seq = [tok["bos"]] + [ids.get(w, tok["unk"]) for w in words]
    out = np.full(tok["max_length"], tok["pad"], np.int32)
    seq = seq[: tok["max_length"]]
    out[: len(seq)] = seq
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--prompt", default=None, help="a caption (word-tokenizer exports)")
    parser.add_argument("--embeddings", default=None, help="safetensors with text [S, E] and "
                        "text_mask [S] (exports of runs with a pretrained text encoder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=1)
    parser.add_argument("--index", type=int, default=0, help="the prompt's index in a "
                        "`vdit sample` call (it selects the key)")
    parser.add_argument("--out", default="video.npy")
    args = parser.parse_args(argv)

    root = Path(args.export_dir)
    verify(root)
    tok = json.loads((root / "tokenizer.json").read_text())
    exported = jax.export.deserialize(bytearray((root / "sampler.stablehlo").read_bytes()))
    weights = unflatten(load_file(str(root / "model.safetensors")))
    key = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(args.seed),
                                                             args.index)))
    if tok.get("kind") == "embeddings":
        if not args.embeddings:
            sys.exit(f"run_exported: {root} takes caption embeddings (--embeddings FILE) from "
                     f"the text encoder {tok['text_encoder']}")
        caption = load_file(args.embeddings)
        text = np.asarray(caption["text"], np.float32)
        mask = np.asarray(caption["text_mask"], np.int32)
        want = (tok["max_length"], tok["width"])
        if text.shape[-2:] != want or mask.shape[-1] != want[0]:
            sys.exit(f"run_exported: {args.embeddings}: text {text.shape} / text_mask "
                     f"{mask.shape}, the export takes [{want[0]}, {want[1]}] / [{want[0]}]")
        text = np.broadcast_to(text.reshape(-1, *want), (args.num, *want))
        mask = np.broadcast_to(mask.reshape(-1, want[0]), (args.num, want[0]))
        frames = np.asarray(exported.call(weights["params"], weights["stats"], text, mask, key))
    else:
        if args.prompt is None:
            sys.exit("run_exported: --prompt is required")
        tokens = np.repeat(tokenize(args.prompt, tok)[None], args.num, axis=0)
        frames = np.asarray(exported.call(weights["params"], weights["stats"], tokens, key))
    np.save(args.out, frames)
    print(f"{args.out}: uint8 {frames.shape} at {tok['fps']} fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
