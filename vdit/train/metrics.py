"""Run metrics: one JSON line per record, mirrored to TensorBoard, and a loss-curve plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends {"step": s, ...} to run_dir/metrics.jsonl; optional TensorBoard in run_dir/tb.
    Disabled (`enabled=False`) on all but one process of a multi-host run."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A process killed mid-write leaves a torn last line: end it, so the records appended
        # from now on stay readable (read_metrics skips the torn one).
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
            if torn:
                with self.path.open("a") as f:
                    f.write("\n")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def image(self, step: int, tag: str, image: Any) -> None:
        """A uint8 [H, W, 3] image to TensorBoard under `tag` at `step` (when it is on)."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image, int(step), dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "tolist"):
        v = v.tolist()
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(records: list[dict], out_png: str | Path) -> None:
    """Training loss (raw and smoothed) and eval losses against step, log-scaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train loss")
        smooth, acc = [], losses[0]
        for v in losses:
            acc = 0.9 * acc + 0.1 * v
            smooth.append(acc)
        ax.plot(steps, smooth, color="tab:blue", lw=2, label="train loss (EMA 0.9)")
    for key, colour in (("eval_loss", "tab:red"), ("eval_loss_ema", "tab:green")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=colour, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("velocity MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
