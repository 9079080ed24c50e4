"""Validation samples during training (`train.sample_every: N`; 0 is off).

Every N steps, and at the step a fresh run starts from (the model before any update: for a
fine-tune, the published model), the run samples the `sample` section's prompts with its seed,
`num_per_prompt`, sampler, steps and guidance from the EMA params, as `vdit sample` does, and
writes RUN/samples/step_N: a marked mp4 and JSON sidecar per video, the GIF grid and
prompts.json (`write_samples`), each record naming the training step. TensorBoard gets the image
`samples` at that step: a row per video of its first, middle and last frames, marked as a whole
like the GIF.

The training stream does not change. The sampler reads the state and writes nothing back; its
keys are fold_in(key(sample.seed), prompt), never the training rng, so the same noise is drawn at
every sample step (the videos differ by the weights alone); the data iterator is not touched.
One `Sampler` is built per run, before the first step: its program is compiled at the first
sample step and reused, and the prompts are encoded once (a run with a pretrained text encoder
loads that encoder once). Every process runs the sampler (its program spans the mesh); the
primary process writes. Checkpoints record the last step sampled (`samples_through` in their
meta), so a run stopped at a sample step before it sampled (a preemption notice) samples that
step when it resumes, and a resumed run samples at the same steps as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit.config import Config
from vdit.data.video_io import display_scale, tile, upscale
from vdit.diffusion.text_to_video import TextToVideo
from vdit.provenance import watermark
from vdit.sample.generate import Marking, Sampler, params_hash, write_samples
from vdit.train.metrics import MetricsWriter
from vdit.train.state import TrainState


def frame_grid(videos: np.ndarray, marking: Marking, payload: int) -> np.ndarray:
    """uint8 [N, T, H, W, 3] -> one uint8 image: a row per video of its first, middle and last
    frames, upscaled for viewing like the mp4s, marked as a whole unless `marking` says not."""
    t = videos.shape[1]
    picks = sorted({0, t // 2, t - 1})
    frames = upscale(videos[:, picks].reshape(-1, *videos.shape[2:]),  # [N * picks, H, W, 3]
                     display_scale(*videos.shape[2:4]))
    image = tile(frames[:, None], columns=len(picks))[0]  # each frame a one-frame video
    return watermark.embed(image, payload, marking.key) if marking.watermark else image


class ValidationSamples:
    """The run's sampler and fixed prompts; `write(step, state)` samples and writes one set."""

    def __init__(self, cfg: Config, system: TextToVideo, mesh: Mesh, writer: MetricsWriter,
                 primary: bool):
        self.every, self.cfg = cfg.train.sample_every, cfg.sample
        self.run_dir = Path(cfg.train.run_dir)
        self.prompts = list(cfg.sample.prompts)
        self.writer, self.primary = writer, primary
        # Replicated videos: every process of a multi-host run can read its copy.
        self.sampler = Sampler(system, cfg.sample,
                               out_shardings=NamedSharding(mesh, PartitionSpec()))
        self.conditioning = self.sampler.conditioning(self.prompts, cfg.sample.num_per_prompt)

    def due(self, step: int) -> bool:
        """Whether `step` is a sample step (a multiple of train.sample_every, 0 included)."""
        return step % self.every == 0

    def describe(self) -> str:
        s = self.cfg
        return (f"validation samples every {self.every} steps: {len(self.prompts)} prompt(s) x "
                f"{s.num_per_prompt}, seed {s.seed}, {s.sampler} {s.steps} steps, guidance "
                f"{s.guidance} -> {self.run_dir / 'samples'}/step_N")

    def write(self, step: int, state: TrainState) -> Path | None:
        """Sample the EMA params of `state` (the state after `step` steps) on every process; the
        primary writes RUN/samples/step_N and the TensorBoard image and gets the folder back."""
        s = self.cfg
        videos = self.sampler(state.ema_params, state.stats, self.conditioning, s.seed)
        if not self.primary:
            return None
        out = self.run_dir / "samples" / f"step_{step}"
        marking = Marking(run_id=f"{self.run_dir.resolve().name}@{step}")
        model_hash = params_hash(state.ema_params)
        write_samples(out, videos, self.prompts, s.num_per_prompt, s.fps, seed=s.seed,
                      model_hash=model_hash, marking=marking, extra={"train_step": step})
        payload = watermark.make_payload(model_hash, marking.run_id)
        self.writer.image(step, "samples", frame_grid(videos, marking, payload))
        return out
