"""Checkpoints and file formats, below every job that reads them: orbax checkpoints, run
directories, vdit's safetensors exports, and loaders of external layouts (Hugging Face T5/UMT5
folders, diffusers AutoencoderKLWan folders). Imports nothing above `models` and `config`."""
