"""Plots of `vdit eval-physics` (matplotlib, Agg): error by split, tracked against true
trajectories, and physics error against training compute for a sweep of runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PANELS = (("velocity_error", "velocity error (h/s)"), ("gravity_error", "gravity error (rel.)"),
          ("radius_drift", "radius drift (rel.)"), ("permanence_failure", "permanence failures"),
          ("reemergence_error", "re-emergence error (h)"), ("energy_error", "energy error"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def plot_errors_by_split(result: dict, path: Path) -> Path:
    """One panel per metric: bars per split for ground truth, autoencoder and model."""
    plt = _plt()
    rows = result["rows"]
    splits = list(dict.fromkeys(r["split"] for r in rows))
    sources = list(dict.fromkeys(r["source"] for r in rows))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), dpi=110)
    x, width = np.arange(len(splits)), 0.8 / len(sources)
    for ax, (key, title) in zip(axes.ravel(), PANELS, strict=True):
        for j, source in enumerate(sources):
            vals = [next(r[key] for r in rows if r["source"] == source and r["split"] == s)
                    for s in splits]
            ax.bar(x + (j - (len(sources) - 1) / 2) * width, np.nan_to_num(vals), width,
                   label=source)
        ax.set_xticks(x, [s.replace("_", "\n") for s in splits], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{Path(result['run']).name}: {result['context_video_frames']} of "
                 f"{result['frames']} frames given (missing bars: no data)", fontsize=10)
    return _save(fig, path)


def plot_trajectories(result: dict, traces: dict, path: Path, clips: int = 3) -> Path:
    """x(t) and y(t) of every ball in the first in-distribution clips: true (lines) and tracked
    in the model's continuation (dots; hollow where partly hidden), given frames shaded."""
    plt = _plt()
    data, tracks = traces["in_distribution"]
    n = min(clips, len(data))
    fig, axes = plt.subplots(2, n, figsize=(4 * n, 5.5), dpi=110, squeeze=False)
    start = result["context_video_frames"]
    for c in range(n):
        clip, tr = data[c], tracks[c]
        t = np.arange(len(clip.positions))
        for row, (axis, name) in enumerate(((0, "x"), (1, "y (down)"))):
            ax = axes[row, c]
            ax.axvspan(-0.5, start - 0.5, color="0.9", label="given" if row == c == 0 else None)
            for b, colour in enumerate(clip.colours):
                shade = "gold" if colour in ("white", "yellow") else colour
                ax.plot(t, clip.positions[:, b, axis], "-", color=shade, lw=1.5)
                seen = tr.state[:, b] == 2
                part = tr.state[:, b] == 1
                ax.plot(t[seen], tr.centres[seen, b, axis], "o", color=shade, ms=4, mec="k")
                ax.plot(t[part], tr.centres[part, b, axis], "o", mfc="none", color=shade, ms=5)
            ax.set(xlabel="frame", ylabel=f"{name} (px)")
            if row == 1:
                ax.invert_yaxis()
            ax.grid(alpha=0.3)
        axes[0, c].set_title(clip.caption[:48], fontsize=8)
    fig.suptitle(f"{Path(result['run']).name}: true (lines) vs tracked in the continuation "
                 "(dots)", fontsize=10)
    return _save(fig, path)


def plot_vs_compute(results: list[dict], path: Path) -> Path:
    """Model error against training FLOPs, one colour per model size (the run name's prefix
    before '-'): in-distribution solid, out-of-distribution splits' mean dashed; the ground
    truth and autoencoder rows of the first run as grey reference lines."""
    from vdit.eval.physics_metrics import split_mean as value

    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=110)
    sizes = sorted({Path(r["run"]).name.split("-")[0] for r in results},
                   key=lambda s: float(s.lstrip("x")) if s.lstrip("x").replace(".", "").isdigit()
                   else s)
    cmap = plt.get_cmap("viridis")

    for ax, (key, title) in zip(axes.ravel(), PANELS, strict=True):
        for i, size in enumerate(sizes):
            runs = sorted((r for r in results if Path(r["run"]).name.split("-")[0] == size),
                          key=lambda r: r["flops"])
            flops = [r["flops"] for r in runs]
            colour = cmap(i / max(len(sizes) - 1, 1))
            ax.plot(flops, [value(r, "model", False, key) for r in runs], "o-", color=colour,
                    label=f"{size} in-dist.")
            ax.plot(flops, [value(r, "model", True, key) for r in runs], "s--", color=colour,
                    mfc="none", label=f"{size} OOD")
        for source, style in (("ground truth", ":"), ("autoencoder", "-.")):
            ref = value(results[0], source, False, key)
            if np.isfinite(ref):
                ax.axhline(ref, color="0.5", ls=style, lw=1, label=source)
        if not any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines()
                   if len(line.get_xdata()) > 2):
            ax.text(0.5, 0.5, "no data: no such events\namong the tracked balls",
                    ha="center", va="center", transform=ax.transAxes, color="0.4")
        # limits from the runs, not the data: a panel with no finite value has none to scale
        ax.set(xscale="log", xlabel="training FLOPs", title=title,
               xlim=(min(r["flops"] for r in results) / 1.5,
                     max(r["flops"] for r in results) * 1.5))
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle("Physics error of continuations against training compute", fontsize=11)
    return _save(fig, path)


def pick_by_compute(results: list, count: int = 3) -> list:
    """`count` of `results` (each (result, ...)) spread over training compute: the least, the
    most, and evenly in between by rank; fewer if there are fewer."""
    ranked = sorted(results, key=lambda rt: rt[0]["flops"])
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(count, len(ranked)))))
    return [ranked[int(i)] for i in picks]


def continuation_grid(results: list, gap: int = 4) -> np.ndarray:
    """uint8 [H * (1 + R), S * (T * W + gap) - gap, 3]: for S splits side by side (frames left
    to right, `gap` white pixels between splits), the true clip on the top row, then each of
    the R runs' continuation of it. `results`: (result, traces) pairs, traces["continuations"]
    [split] = (true video [T, H, W, 3] uint8, model video [T, H, W, 3] uint8)."""
    splits = list(results[0][1]["continuations"])
    rows = [[results[0][1]["continuations"][s][0] for s in splits]]
    rows += [[traces["continuations"][s][1] for s in splits] for _, traces in results]
    h = rows[0][0].shape[1]

    def strip(videos: list[np.ndarray]) -> np.ndarray:  # [T, H, W, 3] per split -> [H, X, 3]
        parts = []
        for v in videos:
            parts += [np.concatenate(list(v), axis=1), np.full((h, gap, 3), 255, np.uint8)]
        return np.concatenate(parts[:-1], axis=1)

    return np.concatenate([strip(r) for r in rows], axis=0)


def plot_continuations(results: list, path: Path, scale: int = 2, gap: int = 4) -> Path:
    """`continuation_grid` as a PNG, rows labelled with run and training FLOPs, a red rule
    after the given frames of each split."""
    plt = _plt()
    splits = list(results[0][1]["continuations"])
    t, h, w, _ = results[0][1]["continuations"][splits[0]][0].shape
    image = continuation_grid(results, gap).repeat(scale, axis=0).repeat(scale, axis=1)
    fig, ax = plt.subplots(figsize=(image.shape[1] / 100 + 1.6, image.shape[0] / 100 + 0.7),
                           dpi=100)
    ax.imshow(image, interpolation="nearest")
    given = results[0][0]["context_video_frames"]
    for i in range(len(splits)):
        ax.axvline((i * (t * w + gap) + given * w) * scale - 0.5, color="red", lw=1)
    labels = ["true"] + [f"{Path(r['run']).name}\n{r['flops']:.1e} FLOPs" for r, _ in results]
    ax.set_yticks([(i + 0.5) * h * scale for i in range(1 + len(results))], labels, fontsize=7)
    ax.set_xticks([(i * (t * w + gap) + t * w / 2) * scale for i in range(len(splits))],
                  [s.replace("_", " ") for s in splits], fontsize=8)
    ax.tick_params(length=0)
    fig.suptitle(f"Continuations of held-out clips ({given} frames given, left of the red rule)",
                 fontsize=9)
    return _save(fig, path)
