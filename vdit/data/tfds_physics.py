"""A TFDS builder for the physics world, so `tfds.data_source("vdit_physics", data_dir=...)`
works with no TensorFlow installed.

Frames are a uint8 `Tensor` [T, H, W, 3], not `tfds.features.Video` (which needs TensorFlow,
1.6 GB, that vdit does not require), and the files are ArrayRecord, which `tfds.data_source`
reads with random access (Grain-ready). Example i of a split is clip i of that split of the
physics pipeline (`vdit.data.pipeline.clip_seed`), so the TFDS copy equals the generated one.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from vdit.data.physics import WorldConfig


class VditPhysics(tfds.core.GeneratorBasedBuilder):
    """Bouncing-ball clips with captions; `vdit tokenize --tfds vdit_physics` reads them."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "uint8 frames, captions, seeds, fps."}

    def __init__(self, *, world: WorldConfig | None = None, seed: int = 0,
                 num_train: int = 64, num_eval: int = 16, **kwargs):
        # Generation settings matter only when building; readers construct the builder plainly.
        self._world = world or WorldConfig()
        self._seed, self._counts = seed, {"train": num_train, "eval": num_eval}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # Any world size (the shape is stored per example); flat backgrounds compress.
                "frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                               encoding="zlib"),
                "caption": tfds.features.Text(),
                "seed": tfds.features.Scalar(dtype=np.int64),
                "fps": tfds.features.Scalar(dtype=np.float32),
            }),
            homepage="https://github.com/vdit",
            license="Apache-2.0 (generated data)",
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in self._counts.items()}

    def _generate_examples(self, split: str, count: int):
        from vdit.data.physics import simulate
        from vdit.data.pipeline import clip_seed

        for i in range(count):
            seed = clip_seed(self._seed, split, i)
            clip = simulate(self._world, seed)
            yield i, {"frames": clip.frames, "caption": clip.caption, "seed": seed,
                      "fps": np.float32(self._world.fps)}


def build(data_dir: str | Path, *, world: WorldConfig | None = None, seed: int = 0,
          num_train: int = 64, num_eval: int = 16) -> VditPhysics:
    """Generate the data set into `data_dir` (ArrayRecord files) and return the builder."""
    builder = VditPhysics(data_dir=str(data_dir), world=world, seed=seed, num_train=num_train,
                          num_eval=num_eval)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return builder
