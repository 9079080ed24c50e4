"""tools/make_wan_export_sample.py as a module: the tiny Wan run (config, tokenized shards,
training, fixed inputs) that the Wan run, LoRA, expert and tokenize tests share."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "tools" / "make_wan_export_sample.py"
_spec = importlib.util.spec_from_file_location("make_wan_export_sample", _PATH)
TOOL = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(TOOL)
