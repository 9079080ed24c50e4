"""Reading Hugging Face / diffusers checkpoint folders without PyTorch.

A folder holds `config.json` and its weights as one safetensors file (`model.safetensors`,
`diffusion_pytorch_model.safetensors`) or as shards listed by `<weights>.index.json`
(`{"weight_map": {tensor name: shard file}}`). Tensors come back as numpy arrays in their stored
dtype (bf16 through ml_dtypes); nothing is pickled, `.bin` files are refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointFormatError(ValueError):
    """A checkpoint folder that cannot be read: a missing file, a bad index, a wrong tensor."""


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
    `keep(name)` is true (e.g. the encoder's tensors of a full T5 checkpoint)."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(folder, weights):
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if keep(name):
                        tensors[name] = f.get_tensor(name)
        except (OSError, ValueError) as e:  # safetensors' own errors for truncated headers
            raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from None
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
