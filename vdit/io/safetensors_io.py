"""Parameter exports as safetensors: `model.safetensors` + `config.json`, loadable without vdit.

Tensors have flat, readable names (`params/encoder/stem/kernel`, `stats/mean`): the pytree's
dict keys joined by "/". `config.json` holds the vdit config the weights belong to, the source
step, the vdit version and the SHA-256 of every file, which `read_export` verifies. Nothing is
pickled. The weights are read through `hf_folder.open_safetensors`, so a truncated or damaged
file is refused naming it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from vdit.io import atomic
from vdit.io.hf_folder import CheckpointFormatError, check_safetensors, open_safetensors

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class ExportError(ValueError):
    """An export that cannot be loaded: missing files, failed checksums, mismatched shapes."""


def flat_leaves(tree) -> dict[str, object]:
    """Nested dicts -> {"a/b/c": leaf}, leaves untouched (arrays or shape structs)."""
    import jax

    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in pairs}


def flatten(tree: dict) -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {"a/b/c": numpy array}."""
    return {name: np.asarray(leaf) for name, leaf in flat_leaves(tree).items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_export(out_dir: str | Path, tensors: dict, info: dict[str, Any]) -> Path:
    """Write tensors (a nested dict of arrays) and `info` (JSON-able: kind, config, step...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out / WEIGHTS) as tmp:
        save_file(flatten(tensors), str(tmp))
    from vdit import __version__

    _write_json(out / CONFIG, {**info, "vdit_version": __version__})
    return seal(out)


def seal(out_dir: str | Path) -> Path:
    """Record the SHA-256 of every file of an export (but config.json) in its config.json."""
    out = Path(out_dir)
    info = json.loads((out / CONFIG).read_text())
    info["sha256"] = {p.name: sha256(p) for p in sorted(out.iterdir())
                      if p.is_file() and p.name != CONFIG and not p.name.endswith(".part")}
    _write_json(out / CONFIG, info)
    return out


def _write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=True))


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).exists()


def read_export(path: str | Path) -> tuple[dict, dict]:
    """(tensors as a nested dict of numpy arrays, info) after verifying the checksums. A
    weights file that is cut short or damaged is refused as such (its header is checked before
    its checksum, which would only say that it changed)."""
    path = Path(path)
    if not is_export(path):
        raise ExportError(f"{path} is not a vdit export (needs {CONFIG} and {WEIGHTS})")
    try:
        info = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path / CONFIG} is not valid JSON: {e}") from None
    try:
        check_safetensors(path / WEIGHTS)
    except CheckpointFormatError as e:
        raise ExportError(str(e)) from None
    sums = info.get("sha256", {})
    if WEIGHTS not in sums:
        raise ExportError(f"{path / CONFIG} lists no SHA-256 for {WEIGHTS}")
    for name, expected in sums.items():
        if not (path / name).is_file():
            raise ExportError(f"{path / name} is missing (listed in {CONFIG})")
        actual = sha256(path / name)
        if actual != expected:
            raise ExportError(f"{path / name}: SHA-256 {actual[:16]}... does not match "
                              f"{CONFIG}'s {str(expected)[:16]}...: the file is corrupt or "
                              "altered")
    try:
        with open_safetensors(path / WEIGHTS) as f:
            flat = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except CheckpointFormatError as e:
        raise ExportError(str(e)) from None
    return unflatten(flat), info
