"""Write tests/fixtures/lora_export/ (the vdit side; committed): a tiny Wan LoRA run's
`vdit export --to lora` files in both namings and vdit's merged model's outputs on fixed inputs,
for the torch side (`tools/fixtures/lora_export.py`) to load into diffusers.

    .venv/bin/python tools/make_lora_export_sample.py                  # vdit's venv, ~1 min
    /work/peer/bin/python tools/make_reference_fixtures.py lora_export  # then diffusers' side

The run: 4 physics clips (5 x 32 x 32) tokenized with the WanPipeline fixture's UMT5 and VAE,
`train.init_from: tests/fixtures/wan_pipeline/wan21` (its one-block transformer as the frozen
base), `train.lora: {rank: 2, alpha: 6}` (scale 3: a loader that drops alpha is 3x off) on the
default targets, 2 steps at lr 1e-2. Written into tests/fixtures/lora_export/:

  lora_diffusers.safetensors  `vdit export RUN --to lora --format diffusers`
  lora_comfyui.safetensors    `vdit export RUN --to lora --format comfyui`
  adapters.safetensors        the run's EMA adapters in vdit's layout (flat Flax names), what
                              tests/test_lora_run.py re-exports and compares tensor for tensor
  vdit_outputs.safetensors    the inputs of tools/make_wan_export_sample.py and
                              `TextToVideo.apply_dit` on them of: the published float32
                              transformer with the run's adapters folded in ("sample", what a
                              user loading the LoRA onto the published model gets), the run's
                              own model (its bf16 base, "run"), the published model ("base")
  sample.json                 the run's config (paths relative to the checkout), rank, alpha
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "fixtures" / "wan_pipeline" / "wan21"
OUT = ROOT / "tests" / "fixtures" / "lora_export"
RANK, ALPHA = 2, 6.0


def _wan_tool():
    path = ROOT / "tools" / "make_wan_export_sample.py"
    spec = importlib.util.spec_from_file_location("make_wan_export_sample", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config(tool, run_dir: Path, shards: Path) -> dict:
    d = tool.run_config(run_dir, shards)
    d["model"]["depth"] = 1  # the pipeline fixture's transformer
    d["train"].update(steps=2, lr=1e-2, init_from=str(PIPELINE),
                      lora={"rank": RANK, "alpha": ALPHA})
    return d


def main() -> None:
    import shutil

    from safetensors.numpy import save_file

    from vdit.cli import main as vdit
    from vdit.config import to_dict
    from vdit.io.checkpoint import Checkpointer
    from vdit.io.run_dir import load_dit_weights
    from vdit.io.run_dir import run_config as read_run_config
    from vdit.io.safetensors_io import flatten
    from vdit.io.wan_transformer import load_params
    from vdit.models.lora import fold

    tool = _wan_tool()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d = run_config(tool, tmp / "run", tmp / "shards")
        (tmp / "run.yaml").write_text(json.dumps(d))
        tool.tokenize(tmp / "shards", 4, tmp / "run.yaml")
        if vdit(["train", str(tmp / "run.yaml")]):
            raise SystemExit("vdit train failed")
        OUT.mkdir(parents=True, exist_ok=True)
        for fmt in ("diffusers", "comfyui"):
            if vdit(["export", str(tmp / "run"), "--to", "lora", "--format", fmt, "--out",
                     str(tmp / fmt)]):
                raise SystemExit(f"vdit export --to lora --format {fmt} failed")
            shutil.copy(tmp / fmt / f"lora_{fmt}.safetensors", OUT)
        cfg = read_run_config(tmp / "run")
        ckpt = Checkpointer(tmp / "run" / "checkpoints", async_save=False)
        state, _ = ckpt.restore_raw()
        ckpt.close()
        save_file({k: np.asarray(v, np.float32) for k, v in flatten(state["ema_params"]).items()},
                  str(OUT / "adapters.safetensors"))
        _, own, _, step = load_dit_weights(tmp / "run")  # on its bf16 base
        _, base = load_params(PIPELINE / "transformer")
        merged = fold(base, state["ema_params"], cfg.train.lora.scale())
        x = tool.inputs(cfg)
        save_file({**x, "sample": tool.vdit_output(cfg, merged, x),
                   "run": tool.vdit_output(cfg, own, x), "base": tool.vdit_output(cfg, base, x)},
                  str(OUT / "vdit_outputs.safetensors"))
        record = {"config": tool.relative(to_dict(cfg)), "rank": RANK, "alpha": ALPHA,
                  "step": step, "weights": "ema"}
        del record["config"]["train"]["run_dir"], record["config"]["data"]["shards"]
        (OUT / "sample.json").write_text(json.dumps(record, indent=1) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1024:.0f} KiB); now run the diffusers side: "
          "/work/peer/bin/python tools/make_reference_fixtures.py lora_export", file=sys.stderr)


if __name__ == "__main__":
    main()
