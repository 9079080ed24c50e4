"""Tokenized video shards: one msgpack record per clip in ArrayRecord files, plus `index.json`.

A record holds one clip's latent [T', H', W', C] as raw bytes with its dtype and shape, the
caption (text and int32 tokens), where it came from (source id, fps, original size, licence)
and its bucket. msgpack, not pickle: reading a shard never runs code. Each shard is written
under a temporary name and renamed, with a sidecar `NAME.json` (record count, SHA-256, the
bucket of every record, skipped inputs), so an interrupted `vdit tokenize` resumes by shard and
several processes can write disjoint shards; `index.json` is assembled from the sidecars.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

from vdit.io import atomic

FORMAT_VERSION = 1
INDEX = "index.json"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
          "uint8": np.uint8, "int32": np.int32}
REQUIRED = ("latent", "dtype", "shape", "tokens", "caption", "source_id", "fps",
            "original_size", "license", "bucket")


class ShardRecordError(ValueError):
    """A record that is not a valid clip (truncated, not msgpack, missing or wrong fields)."""


@dataclass(frozen=True)
class ClipRecord:
    """One tokenized clip; `latent` [T', H', W', C] in its stored dtype (bf16 stays bf16)."""

    latent: np.ndarray
    tokens: np.ndarray  # int32 [S]
    caption: str
    source_id: str
    fps: float
    original_size: tuple[int, int, int]  # (frames, height, width) before resampling and fitting
    bucket: tuple[int, int, int]  # (frames, height, width) the clip was fitted to
    license: str = "unknown"  # licence / provenance of the source video
    # The caption's embeddings [n, E] from a frozen text encoder, real tokens only (n = the
    # caption's length, mask all ones): optional "text", "text_dtype", "text_shape" fields.
    text: np.ndarray | None = None


def encode_record(rec: ClipRecord) -> bytes:
    """ClipRecord -> msgpack bytes (the latent and tokens as raw little-endian bytes)."""
    name = rec.latent.dtype.name
    if name not in DTYPES:
        raise ValueError(f"latent dtype {name} is not one of {sorted(DTYPES)}")
    text = {}
    if rec.text is not None:
        if rec.text.dtype.name not in DTYPES or rec.text.ndim != 2:
            raise ValueError(f"text embeddings must be [n, E] of {sorted(DTYPES)}, got "
                             f"{rec.text.dtype.name} {rec.text.shape}")
        text = {"text": np.ascontiguousarray(rec.text).tobytes(),
                "text_dtype": rec.text.dtype.name, "text_shape": list(rec.text.shape)}
    return msgpack.packb({
        "v": FORMAT_VERSION,
        # Raw native bytes: every host vdit targets (x86, ARM, TPU VMs) is little-endian.
        "latent": np.ascontiguousarray(rec.latent).tobytes(),
        "dtype": name, "shape": list(rec.latent.shape),
        "tokens": np.asarray(rec.tokens, "<i4").tobytes(),
        "caption": rec.caption, "source_id": rec.source_id, "fps": float(rec.fps),
        "original_size": [int(x) for x in rec.original_size],
        "bucket": [int(x) for x in rec.bucket], "license": rec.license, **text,
    }, use_bin_type=True)


def decode_record(data: bytes) -> ClipRecord:
    """msgpack bytes -> ClipRecord; anything malformed raises ShardRecordError naming why."""
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ShardRecordError(f"not a msgpack record ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ShardRecordError(f"record is a {type(d).__name__}, not a map")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ShardRecordError(f"record lacks {missing}")
    if d["dtype"] not in DTYPES:
        raise ShardRecordError(f"unknown latent dtype {d['dtype']!r}")
    dtype = np.dtype(DTYPES[d["dtype"]])
    shape = tuple(int(s) for s in d["shape"])
    if int(np.prod(shape)) * dtype.itemsize != len(d["latent"]):
        raise ShardRecordError(f"latent has {len(d['latent'])} bytes, shape {shape} of "
                               f"{d['dtype']} needs {int(np.prod(shape)) * dtype.itemsize}")
    if len(d["tokens"]) % 4:
        raise ShardRecordError("caption tokens are not whole int32 values")
    text = _decode_text(d) if "text" in d else None
    return ClipRecord(
        latent=np.frombuffer(d["latent"], dtype).reshape(shape),
        tokens=np.frombuffer(d["tokens"], "<i4").astype(np.int32),
        caption=str(d["caption"]), source_id=str(d["source_id"]), fps=float(d["fps"]),
        original_size=tuple(int(x) for x in d["original_size"]),
        bucket=tuple(int(x) for x in d["bucket"]), license=str(d["license"]), text=text)


def _decode_text(d: dict) -> np.ndarray:
    """The record's caption embeddings [n, E], checked against their dtype and shape."""
    if d.get("text_dtype") not in DTYPES or len(d.get("text_shape") or ()) != 2:
        raise ShardRecordError(f"text embeddings need text_dtype in {sorted(DTYPES)} and "
                               f"text_shape [n, E], got {d.get('text_dtype')!r}, "
                               f"{d.get('text_shape')!r}")
    dtype, shape = np.dtype(DTYPES[d["text_dtype"]]), tuple(int(s) for s in d["text_shape"])
    if shape[0] * shape[1] * dtype.itemsize != len(d["text"]):
        raise ShardRecordError(f"text has {len(d['text'])} bytes, shape {shape} of "
                               f"{d['text_dtype']} needs {shape[0] * shape[1] * dtype.itemsize}")
    return np.frombuffer(d["text"], dtype).reshape(shape)


# --- shard files ------------------------------------------------------------------------------


def shard_name(i: int, num_shards: int) -> str:
    return f"shard-{i:05d}-of-{num_shards:05d}.array_record"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1))


@dataclass
class ShardSummary:
    """What one shard holds (its sidecar): records, checksum, buckets, skipped inputs."""

    name: str
    records: int
    sha256: str
    bytes: int
    buckets: list[str]  # "FxHxW" of each record, in order
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    captions_truncated: int = 0  # captions cut to text.max_length tokens

    @staticmethod
    def load(path: Path) -> ShardSummary:
        return ShardSummary(**json.loads(path.read_text()))


def bucket_key(bucket: tuple[int, int, int]) -> str:
    return "x".join(str(int(x)) for x in bucket)


def write_shard(directory: str | Path, name: str, records: list[ClipRecord],
                skipped: dict[str, int] | None = None, truncated: int = 0) -> ShardSummary:
    """Write records to `directory/name` (atomically: temp name, then rename) and its sidecar."""
    from array_record.python.array_record_module import ArrayRecordWriter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with atomic.atomic_path(path, suffix=".tmp") as tmp:
        # group_size:1 keeps random access to one record cheap (Grain's global shuffle needs
        # it); uncompressed: latents barely compress, and brotli (the default) cost 3x the read
        # time.
        writer = ArrayRecordWriter(str(tmp), "group_size:1,uncompressed")
        for rec in records:
            writer.write(encode_record(rec))
        writer.close()
    summary = ShardSummary(name, len(records), sha256_file(path), path.stat().st_size,
                           [bucket_key(r.bucket) for r in records], dict(skipped or {}),
                           truncated)
    _write_json(directory / f"{name}.json", summary.__dict__)
    return summary


def shard_done(directory: str | Path, name: str) -> bool:
    """A shard is finished when it and its sidecar exist (both are renamed into place last)."""
    directory = Path(directory)
    return (directory / name).exists() and (directory / f"{name}.json").exists()


def write_index(directory: str | Path, names: list[str], info: dict) -> dict:
    """Assemble `index.json` from the shards' sidecars: counts, bucket histogram, checksums."""
    directory = Path(directory)
    shards = [ShardSummary.load(directory / f"{n}.json") for n in names]
    skipped: Counter = Counter()
    for s in shards:
        skipped.update(s.skipped)
    index = {
        "version": FORMAT_VERSION,
        "num_records": sum(s.records for s in shards),
        "buckets": dict(sorted(Counter(b for s in shards for b in s.buckets).items())),
        "skipped": dict(sorted(skipped.items())),
        "captions_truncated": sum(s.captions_truncated for s in shards),
        "shards": [{"name": s.name, "records": s.records, "sha256": s.sha256, "bytes": s.bytes,
                    "buckets": s.buckets} for s in shards],
        **info,
    }
    _write_json(directory / INDEX, index)
    return index


def read_index(directory: str | Path, *, verify: bool = False) -> dict:
    """`index.json` of a shard directory; `verify` also checks every shard's SHA-256."""
    directory = Path(directory)
    path = directory / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path}: no index.json (run `vdit tokenize` to the end first)")
    index = json.loads(path.read_text())
    if verify:
        bad = [s["name"] for s in index["shards"]
               if sha256_file(directory / s["name"]) != s["sha256"]]
        if bad:
            raise ValueError(f"{directory}: shards do not match their checksums: {bad}")
    return index


def shard_paths(directory: str | Path, index: dict) -> list[str]:
    return [str(Path(directory) / s["name"]) for s in index["shards"]]


def read_shard(path: str | Path) -> list[bytes]:
    """Every raw record of one shard, in order (for tests and tools; training reads via Grain)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return list(reader.read_all())
    finally:
        reader.close()
