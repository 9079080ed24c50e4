"""The sweep's ledger: one JSON row per finished point (ledger.jsonl), and what a row needs from
a run directory. Read by the sweep, the fit and `vdit eval-physics`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from vdit.config import Config
from vdit.train.metrics import read_metrics


def read_ledger(path: str | Path) -> list[dict]:
    """Rows of a ledger.jsonl; a torn last line (a process killed mid-write) is ignored."""
    return read_metrics(path)


def append_row(path: Path, row: dict) -> None:
    """Append one JSON row and flush it to disk: a finished point is never lost."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Committed checkpoint steps (orbax renames a finished save to its step number)."""
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def count_params(cfg: Config) -> int:
    """All parameters of the system (DiT + text encoder), from shapes only."""
    import jax

    from vdit.diffusion.text_to_video import TextToVideo

    shapes = jax.eval_shape(TextToVideo(cfg).init, jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
