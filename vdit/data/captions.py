"""Captions through a frozen pretrained text encoder (`text.encoder: t5 | precomputed`).

    caption -> T5 tokenizer -> ids [S] (</s> appended, cut to text.max_length) -> T5 encoder
      -> embeddings [S, E] -> rounded to text.dtype -> stored (real tokens only) or fed to the DiT

`vdit tokenize --text-encoder PATH` runs `CaptionEncoder.embed` once per caption and stores the
embeddings in the shards (vdit/data/shards.py); `index.json` names the encoder (`record()`:
kind, path, width, max_length, dtype, the checkpoint's and the tokenizer's SHA-256, and the
empty caption's embedding, which caption dropout and guidance use). Training resolves the
config against the shards (`resolve_text`): it refuses shards of another encoder, naming both,
and fills `text.checkpoint_sha256`, so the run directory's config.yaml names the exact encoder
`vdit sample` must run on a prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import Config, ConfigError
from vdit.data.shards import DTYPES, read_index
from vdit.io.hf_t5 import TOKENIZER_FILES, checkpoint_sha256, load_t5, read_spec

EMBEDDED = ("t5", "precomputed")  # text.encoder values whose DiT sees embeddings


def _short(sha: str) -> str:
    return sha[:12] if sha else "?"


def describe(record: dict | None) -> str:
    """One line naming an encoder record of index.json (or word tokens when None)."""
    if not record:
        return "word tokens (text.encoder 'transformer', no text encoder)"
    return (f"{record.get('kind')} encoder {record.get('path') or record.get('name', '?')} "
            f"(SHA-256 {_short(record.get('sha256', ''))}, width {record.get('width')}, "
            f"max_length {record.get('max_length')}, {record.get('dtype')})")


def encoder_folder(path: str, expected_sha: str = "") -> Path:
    """`text.checkpoint` as an existing folder, or a ConfigError naming the key, the path and
    (when a run needs it) the checksum expected."""
    if not path:
        raise ConfigError("text.checkpoint: no text encoder named (set text.checkpoint=PATH or "
                          "pass --text-encoder PATH)")
    folder = Path(path).expanduser()
    if not (folder / "config.json").exists():
        need = (f"; this run needs the text encoder it was trained with, whose config and "
                f"weights have SHA-256 {expected_sha}" if expected_sha else "")
        what = "does not exist" if not folder.exists() else "holds no config.json"
        raise ConfigError(f"text.checkpoint: {folder} {what}{need}")
    return folder


def tokenizer_sha256(folder: str | Path) -> str:
    """SHA-256 of a tokenizer folder's vocabulary file (tokenizer.json, else spiece.model): what
    index.json records as the encoder's `tokenizer_sha256`; "" when there is none."""
    files = [Path(folder) / f for f in TOKENIZER_FILES if (Path(folder) / f).exists()]
    return hashlib.sha256(files[0].read_bytes()).hexdigest() if files else ""


class CaptionEncoder:
    """A loaded T5-family encoder that turns captions into rounded embeddings.

    `expected_sha` (a run's text.checkpoint_sha256) refuses any other checkpoint by name. Batches
    are padded to `batch` rows, so one compiled program serves every call."""

    def __init__(self, path: str, max_length: int, dtype: str = "bfloat16",
                 expected_sha: str = "", batch: int = 32):
        self.folder = encoder_folder(path, expected_sha)
        self.sha256 = checkpoint_sha256(self.folder)
        if expected_sha and self.sha256 != expected_sha:
            raise ConfigError(f"text.checkpoint: {self.folder} has SHA-256 {self.sha256}, the "
                              f"run was trained with {expected_sha} (text.checkpoint_sha256): "
                              "another encoder")
        self.encoder = load_t5(self.folder, jnp.float32)
        self.max_length, self.dtype, self.batch = max_length, dtype, batch
        self.width = self.encoder.spec.d_model

    def tokenizer_sha256(self) -> str:
        return tokenizer_sha256(self.encoder.tokenizer.path)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """-> (ids int32 [B, S], mask int32 [B, S], captions truncated)."""
        return self.encoder.tokenize(texts, self.max_length)

    def embed_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ids, mask [B, S] -> embeddings [B, S, E] in text.dtype (numpy), in jitted batches."""
        out = []
        for s in range(0, len(ids), self.batch):
            part_ids, part_mask = ids[s: s + self.batch], mask[s: s + self.batch]
            # Only as many positions as the batch's longest caption (in steps of 32, so few
            # programs compile): padding is masked and T5's position bias is relative, so the
            # real tokens' outputs are those of the full length; the rest is zero-filled.
            length = ids.shape[1]
            cut = min(length, -(-max(int(part_mask.sum(1).max()), 1) // 32) * 32)
            part_ids, part_mask = part_ids[:, :cut], part_mask[:, :cut]
            pad = self.batch - len(part_ids)
            if pad:
                part_ids = np.concatenate([part_ids, np.zeros((pad, cut), ids.dtype)])
                part_mask = np.concatenate([part_mask, np.zeros((pad, cut), mask.dtype)])
            hidden = np.asarray(self.encoder.encode(part_ids, part_mask))[: self.batch - pad]
            full = np.zeros((len(hidden), length, self.width), DTYPES[self.dtype])
            full[:, :cut] = hidden * part_mask[: len(hidden), :, None]
            out.append(full)
        return np.concatenate(out) if out else np.zeros((0, ids.shape[1], self.width),
                                                        DTYPES[self.dtype])

    def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """captions -> (embeddings [B, S, E] in text.dtype, mask int32 [B, S], ids [B, S],
        number truncated)."""
        ids, mask, truncated = self.tokenize(texts)
        return self.embed_ids(ids, mask), mask, ids, truncated

    def conditioning(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """What the DiT is given for `texts`: (float32 [B, S, E] rounded through text.dtype,
        int32 mask [B, S]) — the values training read from the shards."""
        emb, mask, _, _ = self.embed(texts)
        return emb.astype(np.float32), mask

    def record(self) -> dict:
        """The encoder's entry in index.json (see module doc); the null caption is ""."""
        emb, mask, _, _ = self.embed([""])
        n = int(mask[0].sum())
        return {"kind": "t5", "path": str(self.folder.resolve()), "width": self.width,
                "max_length": self.max_length, "dtype": self.dtype, "sha256": self.sha256,
                "tokenizer_sha256": self.tokenizer_sha256(),
                "pad_id": int(self.encoder.tokenizer.pad_id),
                "null_text": emb[0, :n].astype(np.float32).tolist()}


def null_caption(record: dict | None, max_length: int, width: int) -> dict[str, np.ndarray]:
    """{"null_text": float32 [S, E], "null_mask": int32 [S]}: the empty caption's embedding
    from an encoder record; without one (a record of your own encoder may omit it) a fully
    masked caption, to which cross-attention gives nothing."""
    text = np.zeros((max_length, width), np.float32)
    mask = np.zeros(max_length, np.int32)
    rows = np.asarray((record or {}).get("null_text") or np.zeros((0, width)), np.float32)
    if rows.ndim != 2 or rows.shape[1] != width or len(rows) > max_length:
        raise ConfigError(f"index.json text_encoder.null_text: expected [n <= {max_length}, "
                          f"{width}], found {list(rows.shape)}")
    text[: len(rows)], mask[: len(rows)] = rows, 1
    return {"null_text": text, "null_mask": mask}


def shards_encoder(directory: str) -> dict | None:
    """The text_encoder record of a shard directory's index.json (None: word tokens)."""
    return read_index(directory).get("text_encoder")


def _check_record(cfg: Config, where: str, record: dict | None, sha: str) -> list[str]:
    """Problems of shards' encoder record against the config's text section."""
    t = cfg.text
    if t.encoder == "transformer":
        return [] if not record else [f"the config trains its own text.encoder 'transformer' "
                                      f"on word tokens, {where} hold {describe(record)}"]
    if not record:
        return [f"the config wants text.encoder '{t.encoder}', {where} hold word tokens: "
                "re-run `vdit tokenize --text-encoder PATH`"]
    bad = [f"text.{k}: config {getattr(t, k)!r}, {where} {record.get(k)!r}"
           for k in ("width", "max_length", "dtype") if record.get(k) != getattr(t, k)]
    if sha and record.get("sha256") != sha:
        bad.append(f"text encoder: config {t.checkpoint} (SHA-256 {_short(sha)}), {where} "
                   f"{describe(record)}")
    if t.encoder == "t5" and record.get("kind") != "t5":
        bad.append(f"text.encoder 't5' runs the encoder on the stored T5 tokens; {where} "
                   f"hold {describe(record)}")
    return bad


def resolve_text(cfg: Config) -> Config:
    """The config with its text encoder checked against the checkpoint and the shards, and
    `text.checkpoint` / `text.checkpoint_sha256` filled in (a precomputed run takes the
    encoder its shards name). Refuses, naming both sides, shards encoded by another encoder
    than the config's; the physics demo's config is returned unchanged."""
    t = cfg.text
    sha = t.checkpoint_sha256
    if t.encoder == "t5":
        folder = encoder_folder(t.checkpoint, sha)
        found = checkpoint_sha256(folder)
        if sha and found != sha:
            raise ConfigError(f"text.checkpoint: {folder} has SHA-256 {found}, "
                              f"text.checkpoint_sha256 says {sha}")
        sha, width = found, read_spec(folder).d_model
        if width != t.width:
            raise ConfigError(f"text.width: {t.width}, but the encoder text.checkpoint "
                              f"{folder} has d_model {width}; set text.width={width}")
    elif t.encoder == "precomputed" and t.checkpoint and not sha and Path(t.checkpoint).exists():
        sha = checkpoint_sha256(encoder_folder(t.checkpoint))
    problems, records = [], {}
    if cfg.data.source == "shards":
        for key in ("shards", "eval_shards"):
            directory = getattr(cfg.data, key)
            if directory:
                records[key] = shards_encoder(directory)
                problems += _check_record(cfg, f"data.{key} {directory!r}", records[key], sha)
    if problems:
        raise ConfigError("the shards were encoded by another text encoder than the "
                          "config's:\n  " + "\n  ".join(problems))
    if t.encoder == "transformer":
        return cfg
    record = records.get("shards") or {}
    checkpoint = t.checkpoint or record.get("path", "")
    sha = sha or record.get("sha256", "")
    return dataclasses.replace(cfg, text=dataclasses.replace(
        t, checkpoint=checkpoint, checkpoint_sha256=sha))


def text_stats(cfg: Config) -> dict[str, Any]:
    """The text part of a DiT's stats: the empty caption's embedding ("null_text" [S, E],
    "null_mask" [S]) and, for text.encoder 't5', the frozen encoder's params
    ("text_encoder"), all travelling in every checkpoint like the frozen autoencoder."""
    t = cfg.text
    if t.encoder == "t5":
        enc = CaptionEncoder(t.checkpoint, t.max_length, t.dtype, t.checkpoint_sha256)
        stats = null_caption(enc.record(), t.max_length, t.width)
        return {**stats, "text_encoder": jax.tree.map(jnp.asarray, enc.encoder.params)}
    record = shards_encoder(cfg.data.shards) if cfg.data.source == "shards" else None
    return null_caption(record, t.max_length, t.width)


def text_stats_shapes(cfg: Config) -> dict[str, Any]:
    """`text_stats`' structure as jax.ShapeDtypeStructs (a t5 run reads its config.json)."""
    t = cfg.text
    out = {"null_text": jax.ShapeDtypeStruct((t.max_length, t.width), jnp.float32),
           "null_mask": jax.ShapeDtypeStruct((t.max_length,), jnp.int32)}
    if t.encoder == "t5":
        from vdit.models.t5 import T5Encoder

        spec = read_spec(encoder_folder(t.checkpoint, t.checkpoint_sha256))
        ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        boxed = jax.eval_shape(T5Encoder(spec).init, jax.random.key(0), ids, ids)["params"]
        import flax.linen as nn

        out["text_encoder"] = nn.unbox(boxed)
    return out
