"""A DiT ready to sample: its weights (vdit.io.run_dir) and the system that runs them."""

from __future__ import annotations

from pathlib import Path

from vdit.diffusion.experts import with_partner
from vdit.diffusion.text_to_video import TextToVideo
from vdit.io.run_dir import check_params_match, load_dit_weights


def load_for_sampling(path: str | Path, step: int | None = None, raw: bool = False):
    """(config, system, params, stats, step) of a DiT run directory, a safetensors export or a
    param-only checkpoint: what `vdit sample` and `vdit eval-physics` need. A run gives its EMA
    params unless `raw`; exports hold the params they were made with. Weights whose names or
    shapes differ from the config's model are refused, naming them. A run of one Wan 2.2
    expert samples with its init_from pipeline's other expert (diffusion/experts.py)."""
    cfg, params, stats, at_step = load_dit_weights(path, step, raw)
    cfg, params = with_partner(cfg, params)
    system = TextToVideo(cfg)
    check_params_match(system.init, params, Path(path))
    return cfg, system, params, stats, at_step
