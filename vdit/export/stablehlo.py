"""`vdit export RUN_DIR --to stablehlo`: the whole generation function as a serialized StableHLO
program, with the weights beside it as safetensors.

The exported function is `TextToVideo.generate` with the config's sampler settings baked in:

    (params, stats, tokens int32 [b, S], key uint32 [2]) -> frames uint8 [b, T, H, W, 3]

A run with a pretrained text encoder (`text.encoder: t5 | precomputed`) exports the function
of caption embeddings instead, without the encoder:

    (params, stats, text float32 [b, S, E], text_mask int32 [b, S], key uint32 [2]) -> frames

where `text` is the encoder's last hidden state rounded through `text.dtype` (zero beyond the
mask) and guidance uses the empty caption stored in `stats/null_text`; `tokenizer.json` then
names the encoder (path, SHA-256, width, max_length, dtype) that makes the embeddings, and
`tools/run_exported.py --embeddings FILE` takes them (docs/real-data.md).

`b` is symbolic, so one file serves any batch size, and the program is lowered for cpu, cuda and
tpu. Weights are arguments, not constants: the program stays small and the same weights file
feeds vdit and the exported sampler. `tools/run_exported.py` runs it with jax, numpy and
safetensors alone; `tokenizer.json` lets it turn captions into tokens without vdit.

Generated frames leave the exported program unmarked: the watermark, mp4 tags and sidecar are
added by `vdit sample`; an integrator serving the program owns marking its outputs.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from vdit.diffusion.text_to_video import TextToVideo
from vdit.io import atomic
from vdit.io.safetensors_io import read_export
from vdit.models.text import BOS, PAD, UNK

PROGRAM, TOKENIZER = "sampler.stablehlo", "tokenizer.json"
PLATFORMS = ("cpu", "cuda", "tpu")


def export_sampler(export_dir: str | Path, platforms: tuple[str, ...] = PLATFORMS) -> Path:
    """Add `sampler.stablehlo` and `tokenizer.json` to a safetensors export of a DiT."""
    from vdit import config as config_lib

    export_dir = Path(export_dir)
    tensors, info = read_export(export_dir)
    cfg = config_lib.from_dict(info["config"])
    system = TextToVideo(cfg)
    s = cfg.sample
    fn = partial(system.generate, steps=s.steps, guidance=s.guidance, method=s.sampler)

    def generate(params, stats, tokens, key_data):
        return fn(params, tokens, stats, jax.random.wrap_key_data(key_data))

    def generate_embedded(params, stats, text, text_mask, key_data):
        return fn(params, (text, text_mask), stats, jax.random.wrap_key_data(key_data))

    (b,) = jax.export.symbolic_shape("b")
    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    s_len, key = cfg.text.max_length, jax.ShapeDtypeStruct((2,), jnp.uint32)
    if system.embedded:
        args = (spec(tensors["params"]), spec(tensors["stats"]),
                jax.ShapeDtypeStruct((b, s_len, cfg.text.width), jnp.float32),
                jax.ShapeDtypeStruct((b, s_len), jnp.int32), key)
        function = generate_embedded
    else:
        args = (spec(tensors["params"]), spec(tensors["stats"]),
                jax.ShapeDtypeStruct((b, s_len), jnp.int32), key)
        function = generate
    exported = jax.export.export(jax.jit(function), platforms=platforms)(*args)
    atomic.write_bytes(export_dir / PROGRAM, exported.serialize())
    t, h, w = cfg.data.world.frames, cfg.data.world.height, cfg.data.world.width
    if system.embedded:
        tc = cfg.text
        (export_dir / TOKENIZER).write_text(json.dumps({
            "kind": "embeddings", "max_length": s_len, "width": tc.width, "dtype": tc.dtype,
            "text_encoder": {"path": tc.checkpoint, "sha256": tc.checkpoint_sha256},
            "inputs": "text float32 [b, max_length, width] (the encoder's last hidden state, "
                      "rounded through dtype, zero beyond the mask), text_mask int32 [b, "
                      "max_length]", "frames": [t, h, w], "fps": s.fps,
            "platforms": list(platforms),
            "key": "jax.random.key_data(jax.random.fold_in(jax.random.key(seed), "
                   "prompt_index))"}, indent=2))
        return export_dir / PROGRAM
    tok = system.tokenizer
    (export_dir / TOKENIZER).write_text(json.dumps({
        "words": list(tok.words), "max_length": tok.max_length, "bos": BOS, "pad": PAD,
        "unk": UNK, "split": "lower-case, then the runs of [a-z]", "pattern": "[a-z]+",
        "frames": [t, h, w], "fps": s.fps, "platforms": list(platforms),
        "key": "jax.random.key_data(jax.random.fold_in(jax.random.key(seed), prompt_index))",
    }, indent=2))
    return export_dir / PROGRAM

