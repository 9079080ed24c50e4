"""A diffusers `WanPipeline` folder, read once into a spec that code downstream takes instead of
paths.

    PATH/model_index.json        _class_name WanPipeline, boundary_ratio, expand_timesteps
    PATH/tokenizer/              T5TokenizerFast files (tokenizer.json or spiece.model)
    PATH/text_encoder/           UMT5EncoderModel: config.json + safetensors
    PATH/vae/                    AutoencoderKLWan (Wan 2.1: 4x8x8, z16; Wan 2.2 TI2V: 4x16x16, z48)
    PATH/transformer/            WanTransformer3DModel (the high-noise expert of Wan 2.2 A14B)
    PATH/transformer_2/          Wan 2.2 A14B only: the low-noise expert, below boundary_ratio
    PATH/scheduler/scheduler_config.json

Each part is checked here (class names, configs, the experts' agreement), so a wrong folder is
refused before anything loads; weights are read later, by each part's loader, from the folders
this spec names. Fingerprints (`sha256()`) hash the configs and weights (vdit/io/hf_folder.py).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdit.io.hf_folder import CheckpointFormatError, folder_sha256, read_config
from vdit.io.wan_transformer import WEIGHTS as TRANSFORMER_WEIGHTS
from vdit.io.wan_transformer import WanTransformerSpec, read_spec

PIPELINES = ("WanPipeline",)
OTHER_PIPELINES = {"WanImageToVideoPipeline": "image-to-video (needs an image encoder)",
                   "WanVideoToVideoPipeline": "video-to-video", "WanVACEPipeline": "VACE"}
# The published recipe where the folder is silent (Wan 2.1 README, diffusers' pipeline).
RECIPE = {"frames": 81, "height": 480, "width": 832, "steps": 50, "guidance": 5.0,
          "max_sequence_length": 512, "fps": 16.0}


@dataclass(frozen=True)
class PipelineSpec:
    """A checked Wan pipeline folder: its parts' folders, their configs, and the recipe."""

    path: Path
    transformer: WanTransformerSpec
    transformer_2: WanTransformerSpec | None
    boundary_ratio: float | None
    expand_timesteps: bool
    scheduler: dict[str, Any]
    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    index: dict[str, Any] = field(repr=False)

    @property
    def text_encoder(self) -> Path:
        return self.path / "text_encoder"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def vae(self) -> Path:
        return self.path / "vae"

    @property
    def vae_factors(self) -> tuple[int, int, int]:
        """The VAE's (time, height, width) factors (Wan 2.1: 4 x 8 x 8, Wan 2.2: 4 x 16 x 16)."""
        fs = int(self.vae_config.get("scale_factor_spatial", 8))
        return int(self.vae_config.get("scale_factor_temporal", 4)), fs, fs

    def clip_problems(self, frames: int, height: int, width: int) -> list[str]:
        """What keeps a clip of this size from the pipeline's models: frames must be 1 + ft k
        (the causal VAE), height and width multiples of the VAE factor x the transformer's
        patch (Wan 2.1: 8 x 2 = 16; the Wan 2.2 VAE: 16 x 2 = 32)."""
        ft, fh, fw = self.vae_factors
        _, ph, pw = self.transformer.model.patch
        out = []
        if frames < 1 or (frames - 1) % ft:
            out.append(f"{frames} frames are not 1 + {ft}k")
        for name, size, f, p in (("height", height, fh, ph), ("width", width, fw, pw)):
            if size < 1 or size % (f * p):
                out.append(f"{name} {size} is not a multiple of {f * p} (VAE {f} x patch {p})")
        return out

    def expert_folders(self) -> list[Path]:
        return [self.path / "transformer"] + (
            [self.path / "transformer_2"] if self.transformer_2 is not None else [])

    @functools.cached_property
    def fingerprints(self) -> dict[str, str]:
        """SHA-256 of each part (config + weights; minutes for a 14B model)."""
        from vdit.io.diffusers_wan import WEIGHTS as VAE_WEIGHTS
        from vdit.io.hf_t5 import checkpoint_sha256

        out = {"text_encoder": checkpoint_sha256(self.text_encoder),
               "vae": folder_sha256(self.vae, VAE_WEIGHTS)}
        for folder in self.expert_folders():
            out[folder.name] = folder_sha256(folder, TRANSFORMER_WEIGHTS)
        return out


def _part(index: dict, name: str, allowed: tuple[str, ...], where: Path) -> str | None:
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        return None
    cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if cls not in allowed:
        raise CheckpointFormatError(f"{where}/model_index.json: {name} is {entry!r}; vdit reads "
                                    f"{' or '.join(allowed)}")
    return cls


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def resolve_pipeline(path: str | Path) -> PipelineSpec:
    """Read and check a WanPipeline folder (see the module doc); CheckpointFormatError names
    the file and key at fault."""
    folder = Path(path).expanduser()
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        what = "does not exist" if not folder.exists() else "has no model_index.json"
        raise CheckpointFormatError(f"{folder} {what} (expected a diffusers WanPipeline folder)")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{index_path}: not valid JSON ({e})") from None
    cls = index.get("_class_name")
    if cls in OTHER_PIPELINES:
        raise CheckpointFormatError(f"{index_path}: {cls} is {OTHER_PIPELINES[cls]}; vdit "
                                    "samples text-to-video WanPipeline folders")
    if cls not in PIPELINES:
        raise CheckpointFormatError(f"{index_path}: _class_name {cls!r} is not a WanPipeline")
    _part(index, "text_encoder", ("UMT5EncoderModel", "T5EncoderModel"), folder)
    _part(index, "tokenizer", ("T5TokenizerFast", "T5Tokenizer", "AutoTokenizer"), folder)
    _part(index, "vae", ("AutoencoderKLWan",), folder)
    _part(index, "scheduler", ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"),
          folder)
    has_1 = _part(index, "transformer", ("WanTransformer3DModel",), folder)
    has_2 = _part(index, "transformer_2", ("WanTransformer3DModel",), folder)
    if has_1 is None:
        raise CheckpointFormatError(f"{index_path}: no transformer (a pipeline with only "
                                    "transformer_2 is not supported)")
    for part in ("text_encoder", "tokenizer", "vae", "transformer", "scheduler"):
        if not (folder / part).is_dir():
            raise CheckpointFormatError(f"{folder}: the folder {part}/ is missing")
    boundary = index.get("boundary_ratio")
    if has_2 and boundary is None:
        raise CheckpointFormatError(f"{index_path}: transformer_2 without boundary_ratio (the "
                                    "noise level where the low-noise expert takes over)")
    if has_2 and not (folder / "transformer_2").is_dir():
        raise CheckpointFormatError(f"{folder}: the folder transformer_2/ is missing")
    first = read_spec(folder / "transformer")
    second = read_spec(folder / "transformer_2") if has_2 else None
    if second is not None and (second.in_channels, second.text_dim, second.model.patch) != (
            first.in_channels, first.text_dim, first.model.patch):
        raise CheckpointFormatError(f"{folder}: transformer and transformer_2 disagree on "
                                    "in_channels, text_dim or patch_size")
    vae = read_config(folder / "vae")
    text = read_config(folder / "text_encoder")
    scheduler = read_config(folder / "scheduler", "scheduler_config.json")
    problems = []
    if int(vae.get("z_dim", 16)) != first.in_channels:
        problems.append(f"vae z_dim {vae.get('z_dim')} != transformer in_channels "
                        f"{first.in_channels}")
    if int(text.get("d_model", first.text_dim)) != first.text_dim:
        problems.append(f"text_encoder d_model {text.get('d_model')} != transformer text_dim "
                        f"{first.text_dim}")
    if problems:
        raise CheckpointFormatError(f"{folder}: the parts do not fit together: "
                                    + "; ".join(problems))
    return PipelineSpec(path=folder, transformer=first, transformer_2=second,
                        boundary_ratio=None if boundary is None else float(boundary),
                        expand_timesteps=bool(index.get("expand_timesteps", False)),
                        scheduler=scheduler, vae_config=vae, text_config=text, index=index)
