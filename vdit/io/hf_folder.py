"""Reading Hugging Face / diffusers checkpoint folders without PyTorch.

A folder holds `config.json` and its weights as one safetensors file (`model.safetensors`,
`diffusion_pytorch_model.safetensors`) or as shards listed by `<weights>.index.json`
(`{"weight_map": {tensor name: shard file}}`). Tensors come back as numpy arrays in their stored
dtype (bf16 through ml_dtypes); nothing is pickled, `.bin` files are refused.

Every safetensors file vdit reads (these folders, vdit's own exports) is opened through
`open_safetensors`, which checks the header first, so that a half-downloaded or damaged file is
refused naming the file instead of ending in the safetensors library's `SafetensorError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointFormatError(ValueError):
    """A checkpoint folder that cannot be read: a missing file, a bad index, a wrong tensor."""


# Bytes per element of the safetensors dtypes (sub-byte and future ones are left to the library).
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                        "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                        "I64": 8, "U64": 8, "F64": 8, "C64": 8}
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers


def damaged(path: str | Path, reason: str) -> CheckpointFormatError:
    """The error for a safetensors file that cannot be what it claims: names it and the reason."""
    return CheckpointFormatError(f"{path}: looks truncated or damaged ({reason}); download or "
                                 "copy it again")


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """The JSON header of the safetensors file `path` ({tensor name: {"dtype", "shape",
    "data_offsets"}}, maybe "__metadata__"), after cheap checks that read only the header: the
    8-byte little-endian header length fits in the file, the header is a JSON object, and every
    tensor's data lies inside the file and spans dtype x shape bytes. A file that fails is
    refused with CheckpointFormatError naming it and saying it looks truncated or damaged."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 8:
                raise damaged(path, f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise damaged(path, f"the header length says {n:,} bytes, the file holds "
                                    f"{size - 8:,} after it")
            if n > SAFETENSORS_MAX_HEADER:
                raise damaged(path, f"the header length says {n:,} bytes, more than "
                                    f"safetensors' {SAFETENSORS_MAX_HEADER:,}")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise damaged(path, "the header is not a JSON object")
    start = 8 + n  # where the tensor data begins; offsets count from here
    last, last_end = None, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end])
                  and begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise damaged(path, f"tensor {name}: a malformed header entry {str(info)[:120]}")
        if end >= last_end:
            last, last_end = name, end
        itemsize = SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise damaged(path, f"tensor {name}: {dtype} {shape} needs "
                                f"{math.prod(shape) * itemsize:,} bytes, its offsets hold "
                                f"{end - begin:,}")
    if start + last_end > size:  # a cut-short file: the furthest tensor says where it should end
        raise damaged(path, f"tensor {last}'s data ends at byte {start + last_end:,} but the "
                            f"file ends at byte {size:,}")
    return header


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """`with open_safetensors(path) as f:` the safetensors handle of `path` (`safe_open(path,
    framework="numpy")`: `f.keys()`, `f.get_tensor(name)` -> numpy array, `f.get_slice(name)`,
    `f.metadata()`), after `check_safetensors`. The one way vdit opens a safetensors file: a
    truncated or damaged one (cut short, a header that is not JSON or longer than the file,
    offsets past the end or disagreeing with dtype x shape), whether found by the header check
    or by the safetensors library itself (its `SafetensorError`, when opening or reading a
    tensor), is refused with CheckpointFormatError naming the file. Other errors raised inside
    the block pass through unchanged."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            yield f
    except SafetensorError as e:
        raise damaged(path, str(e)) from None


def read_config(folder: str | Path, name: str = "config.json") -> dict[str, Any]:
    """The folder's `config.json` as a dict; a missing or malformed file is named."""
    path = Path(folder) / name
    if not Path(folder).is_dir():
        raise CheckpointFormatError(f"{folder} is not a directory (expected a checkpoint folder "
                                    f"with {name} and safetensors weights)")
    if not path.exists():
        raise CheckpointFormatError(f"{folder}: no {name}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object")
    return config


def weight_files(folder: str | Path, weights: str) -> list[Path]:
    """The safetensors files holding `weights` (e.g. "model.safetensors"): the file itself, or
    the shards its `.index.json` lists, in order."""
    folder = Path(folder)
    single, index = folder / weights, folder / f"{weights}.index.json"
    if single.exists():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"{index}: not a safetensors index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise CheckpointFormatError(f"{index} lists shards that are missing: "
                                        + ", ".join(missing))
        return [folder / s for s in shards]
    bins = sorted(p.name for p in folder.glob("*.bin"))
    hint = (f" (found {', '.join(bins)}: PyTorch pickles are not read; convert them to "
            "safetensors)") if bins else ""
    raise CheckpointFormatError(f"{folder}: no {weights} or {weights}.index.json{hint}")


def read_tensors(folder: str | Path, weights: str, keep=lambda name: True) -> dict[str, np.ndarray]:
    """{tensor name: numpy array} of every tensor in the folder's weights for which
    `keep(name)` is true (e.g. the encoder's tensors of a full T5 checkpoint). Each file is
    opened through `open_safetensors`: a truncated or damaged one is refused, naming it."""
    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(folder, weights):
        with open_safetensors(path) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if keep(name):
                    try:
                        tensors[name] = f.get_tensor(name)
                    except (OSError, TypeError, ValueError) as e:  # e.g. a dtype numpy lacks
                        raise CheckpointFormatError(f"{path}: tensor {name} cannot be read "
                                                    f"({e})") from None
    return tensors


def check_tensors(found: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                  where: str | Path) -> None:
    """Refuse a checkpoint whose tensor names or shapes differ from `expected`, naming up to
    five of each: missing, unexpected, wrong shape."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{k}: expected shape {tuple(expected[k])}, found {tuple(found[k].shape)}"
             for k in sorted(set(expected) & set(found))
             if tuple(found[k].shape) != tuple(expected[k])]
    if missing or extra or wrong:
        lines = ([f"missing tensor {k}" for k in missing[:5]]
                 + [f"unexpected tensor {k}" for k in extra[:5]] + wrong[:5])
        raise CheckpointFormatError(f"{where}: the checkpoint does not match its config.json:\n  "
                                    + "\n  ".join(lines))


def folder_sha256(folder: str | Path, weights: str) -> str:
    """SHA-256 fingerprint of a checkpoint folder: config.json, the index (if sharded) and every
    weight file, each hashed as its name, byte length and contents, in name order. The same
    folder gives the same digest wherever it lies; unrelated files do not change it."""
    folder = Path(folder)
    read_config(folder)  # refuses a folder without a readable config.json, naming it
    files = [folder / "config.json", *weight_files(folder, weights)]
    index = folder / f"{weights}.index.json"
    if index.exists() and not (folder / weights).exists():
        files.append(index)
    digest = hashlib.sha256()
    for file in sorted(set(files), key=lambda f: f.name):
        digest.update(file.name.encode() + b"\0" + file.stat().st_size.to_bytes(8, "little"))
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
