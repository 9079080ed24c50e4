"""Print how many physics clips per minute one core simulates and renders.

Usage: python tools/bench_physics.py [num_clips]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(num_clips: int = 500) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vdit.data.physics import WorldConfig, simulate

    cfg = WorldConfig()
    for seed in range(10):  # warm-up
        simulate(cfg, seed)
    start = time.perf_counter()
    for seed in range(num_clips):
        simulate(cfg, seed)
    seconds = time.perf_counter() - start
    print(
        f"{num_clips} clips ({cfg.frames}x{cfg.height}x{cfg.width}) in {seconds:.2f}s: "
        f"{num_clips / seconds * 60:,.0f} clips/minute"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
