"""Pretrained T5-family text encoders (T5, T5 v1.1 / Flan-T5, mT5, UMT5) from Hugging Face
folders, without PyTorch.

A folder holds `config.json`, `model.safetensors` (or shards listed by
`model.safetensors.index.json`) and a tokenizer: `tokenizer.json` (read by the `tokenizers`
library) or else `spiece.model` (read by `sentencepiece`). A diffusers pipeline keeps the
tokenizer in a sibling folder (`text_encoder/`, `tokenizer/`), which is found too. Only the
encoder's tensors are read: `decoder.*` and `lm_head.*` of a full T5 are skipped, and the token
table may be stored as `shared.weight` or `encoder.embed_tokens.weight` (they are tied).

    encoder = load_t5("umt5-xxl")
    ids, mask, truncated = encoder.tokenize(captions, max_length=512)
    hidden = encoder.encode(ids, mask)          # [B, 512, d_model]

Tokenization equals transformers' T5 tokenizer with `padding="max_length", truncation=True`:
`</s>` is appended, a caption longer than max_length keeps its first max_length - 1 tokens and
then `</s>`, padding is `<pad>` with mask 0. `truncated` counts the captions cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdit.io.hf_folder import (
    CheckpointFormatError,
    check_tensors,
    folder_sha256,
    read_config,
    read_tensors,
)
from vdit.models.t5 import T5Encoder, T5Spec

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


class T5Tokenizer:
    """Captions -> padded int32 ids, as transformers' T5 tokenizer makes them (see module doc).

    `path` is a folder holding tokenizer.json (preferred, as transformers prefers it) or
    spiece.model; `pad_id` is used when the tokenizer names no `<pad>`."""

    def __init__(self, path: str | Path, pad_id: int = 0):
        folder = Path(path)
        self.path = folder
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            self.kind = "tokenizers"
            try:
                self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the Rust side raises plain Exception on bad JSON
                raise CheckpointFormatError(f"{folder / 'tokenizer.json'}: {e}") from None
            pad = self._tok.token_to_id("<pad>")
            self.eos_id = self._tok.token_to_id("</s>")
        elif (folder / "spiece.model").exists():
            import sentencepiece as spm

            self.kind = "sentencepiece"
            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
            except (OSError, RuntimeError) as e:
                raise CheckpointFormatError(f"{folder / 'spiece.model'}: {e}") from None
            pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        else:
            raise CheckpointFormatError(f"{folder}: no tokenizer (expected one of "
                                        f"{', '.join(TOKENIZER_FILES)})")
        if self.eos_id is None:
            raise CheckpointFormatError(f"{folder}: the {self.kind} tokenizer has no </s> token")
        self.pad_id = pad_id if pad is None else pad

    def _encode(self, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
        """Token ids with </s>, at most max_length each, and how many texts were cut."""
        if self.kind == "tokenizers":
            # The library's own truncation leaves room for the post-processor's </s>.
            self._tok.no_padding()
            self._tok.enable_truncation(max_length)
            encodings = self._tok.encode_batch(texts)
            return [e.ids for e in encodings], sum(bool(e.overflowing) for e in encodings)
        pieces = self._sp.encode(texts)
        cut = sum(len(p) + 1 > max_length for p in pieces)
        return [[*p[: max_length - 1], self.eos_id] for p in pieces], cut

    def tokenize(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, int]:
        """texts -> (ids int32 [B, max_length], mask int32 [B, max_length], truncated count)."""
        if max_length < 1:
            raise ValueError(f"max_length: {max_length} must be >= 1 (room for </s>)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows, truncated = self._encode(texts, max_length)
        ids = np.full((len(rows), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), max_length), np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask, truncated


def hf_tensor_map(spec: T5Spec) -> dict[str, tuple[str, tuple[int, ...], Callable]]:
    """{vdit param path: (HF tensor name, its stored shape, stored array -> our layout)}.

    torch Linear weights are [out, in]; ours are [in, ...] with heads split out, so a query
    projection [H * Dk, D] becomes [D, H, Dk] and the output [D, H * Dk] becomes [H, Dk, D]."""
    s = spec
    inner = s.num_heads * s.d_kv

    def heads_out(w: np.ndarray) -> np.ndarray:  # [H*Dk, D] -> [D, H, Dk]
        return w.T.reshape(s.d_model, s.num_heads, s.d_kv)

    def heads_in(w: np.ndarray) -> np.ndarray:  # [D, H*Dk] -> [H, Dk, D]
        return w.T.reshape(s.num_heads, s.d_kv, s.d_model)

    same, transpose = (lambda w: w), (lambda w: w.T)
    out = {"embed": ("encoder.embed_tokens.weight", (s.vocab_size, s.d_model), same),
           "final_norm/scale": ("encoder.final_layer_norm.weight", (s.d_model,), same)}
    for i in range(s.num_layers):
        attn, ff = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        ours = f"layer_{i}/"
        for n in "qkv":
            out[f"{ours}attn/{n}"] = (f"{attn}SelfAttention.{n}.weight", (inner, s.d_model),
                                      heads_out)
        out[f"{ours}attn/o"] = (f"{attn}SelfAttention.o.weight", (s.d_model, inner), heads_in)
        if i == 0 or s.bias_per_layer:
            out[f"{ours}rel_bias"] = (f"{attn}SelfAttention.relative_attention_bias.weight",
                                      (s.relative_attention_num_buckets, s.num_heads), same)
        out[f"{ours}attn_norm/scale"] = (f"{attn}layer_norm.weight", (s.d_model,), same)
        for n in ("wi_0", "wi_1") if s.gated else ("wi",):
            out[f"{ours}mlp/{n}"] = (f"{ff}DenseReluDense.{n}.weight", (s.d_ff, s.d_model),
                                     transpose)
        out[f"{ours}mlp/wo"] = (f"{ff}DenseReluDense.wo.weight", (s.d_model, s.d_ff), transpose)
        out[f"{ours}mlp_norm/scale"] = (f"{ff}layer_norm.weight", (s.d_model,), same)
    return out


def read_spec(path: str | Path) -> T5Spec:
    """The folder's architecture; a config.json that is not a supported T5 is refused."""
    config = read_config(path)
    try:
        return T5Spec.from_hf_config(config)
    except ValueError as e:
        raise CheckpointFormatError(f"{Path(path) / 'config.json'}: {e}") from None


def load_params(path: str | Path, spec: T5Spec, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The encoder's params (nested dict of numpy arrays in `dtype`) from the folder's weights,
    checked name by name and shape by shape against `spec`."""
    folder = Path(path)
    found = read_tensors(folder, WEIGHTS,
                         keep=lambda n: n.startswith("encoder.") or n == "shared.weight")
    shared = found.pop("shared.weight", None)
    if "encoder.embed_tokens.weight" not in found and shared is not None:
        found["encoder.embed_tokens.weight"] = shared  # tied: the encoder's table is `shared`
    where = folder / (WEIGHTS if (folder / WEIGHTS).exists() else f"{WEIGHTS}.index.json")
    mapping = hf_tensor_map(spec)
    if "encoder.embed_tokens.weight" not in found:
        raise CheckpointFormatError(f"{where}: missing tensor encoder.embed_tokens.weight "
                                    "(or shared.weight), the token embedding")
    check_tensors(found, {name: shape for name, shape, _ in mapping.values()}, where)
    params: dict[str, Any] = {}
    for ours, (name, _, convert) in mapping.items():
        *parents, leaf = ours.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(convert(found.pop(name)), dtype=dtype)
    return params


def _tokenizer_folder(path: Path, tokenizer_path: str | Path | None) -> Path:
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    if any((path / f).exists() for f in TOKENIZER_FILES):
        return path
    sibling = path.parent / "tokenizer"  # diffusers: text_encoder/ next to tokenizer/
    return sibling if any((sibling / f).exists() for f in TOKENIZER_FILES) else path


@dataclasses.dataclass
class T5TextEncoder:
    """A loaded encoder: `.tokenize(texts, max_length)` then `.encode(ids, mask)`."""

    spec: T5Spec
    params: dict[str, Any]
    tokenizer: T5Tokenizer
    dtype: Any = jnp.float32

    def __post_init__(self):
        self.module = module = T5Encoder(self.spec, self.dtype)
        # Params are an argument, not a closed-over constant, so XLA does not embed them.
        self._apply = jax.jit(lambda params, ids, mask: module.apply({"params": params},
                                                                     ids, mask))

    def tokenize(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray,
                                                                         int]:
        """texts -> (ids int32 [B, S], mask int32 [B, S], number of texts truncated)."""
        return self.tokenizer.tokenize(texts, max_length)

    def encode(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids int32 [B, S], mask [B, S] -> last hidden state [B, S, d_model] in `dtype`."""
        return self._apply(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))


def load_t5(path: str | Path, dtype: Any = jnp.float32, *,
            tokenizer_path: str | Path | None = None, shardings: Any = None) -> T5TextEncoder:
    """Load the T5-family encoder in the folder `path`; params are stored and computed in
    `dtype` (float32 or bfloat16). `shardings` (a pytree like `param_axes(spec)` of
    jax.sharding.Sharding, or one for all) places the params, e.g. FSDP over a mesh; default:
    the default device. Refuses a wrong folder with CheckpointFormatError naming the file and
    tensor."""
    folder = Path(path)
    spec = read_spec(folder)
    params = load_params(folder, spec, dtype)
    params = jax.device_put(params, shardings)
    return T5TextEncoder(spec, params, load_tokenizer(folder, tokenizer_path), dtype)


def load_tokenizer(path: str | Path, tokenizer_path: str | Path | None = None) -> T5Tokenizer:
    """The tokenizer of the T5 folder `path` alone, without its weights (what counts a
    caption's tokens: `vdit sample --rewrite-prompt`)."""
    folder = Path(path)
    config_pad = read_config(folder).get("pad_token_id", 0)
    return T5Tokenizer(_tokenizer_folder(folder, tokenizer_path),
                       pad_id=config_pad if isinstance(config_pad, int) else 0)


def checkpoint_sha256(path: str | Path) -> str:
    """The fingerprint of a T5 folder (`hf_folder.folder_sha256`)."""
    return folder_sha256(path, WEIGHTS)
