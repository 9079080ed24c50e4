"""Write tests/fixtures/wan_export/ (the vdit side; committed): a tiny `model.kind: wan` run's
`vdit export --to diffusers` output and vdit's own outputs on fixed inputs, for the torch side
(`tools/fixtures/wan_export.py`) to load into diffusers.

    .venv/bin/python tools/make_wan_export_sample.py              # vdit's venv (jax), ~1 min
    /work/peer/bin/python tools/make_reference_fixtures.py wan_export   # then diffusers' side

The run: 4 physics clips (5 x 32 x 32) tokenized with the tiny WanPipeline fixture's UMT5 and
Wan VAE (`vdit tokenize --text-encoder tests/fixtures/wan_pipeline/wan21/text_encoder`), a
Wan DiT (width 24, 2 heads, 2 blocks, ffn 32, freq 16, patch 1 x 2 x 2) seeded with perturbed
params (`seed_run`: at init biases are 0 and norm gains 1, which would hide a wrong layout)
and trained 2 steps; then the export, in shards of at most 40 kB (so diffusers reads an
index). Written into tests/fixtures/wan_export/:

  transformer/             the export (config.json, 3 shards, index), EMA params, float32
  params.safetensors       the same EMA params in vdit's layout (flat Flax names), what
                           tests/test_wan_run.py re-exports and compares byte for byte
  sample.json              the run's config (paths made relative to the checkout) and the
                           export's shard size
  vdit_outputs.safetensors the fixed inputs and vdit's output on them, float32:
      hidden_states          [2, 4, 2, 4, 6]  latent (B, C, F, H, W), a non-square grid
      timestep               [2]              Wan's units (t * 1000)
      encoder_hidden_states  [2, 8, 16]       captions of 5 and 8 real tokens, zero-padded
      text_mask              [2, 8]           int32, 1 on the real tokens (vdit's training
                                              input; diffusers takes no mask)
      sample                 [2, 4, 2, 4, 6]  `TextToVideo.apply_dit` on them, as training
                                              calls it (t in [0, 1], embeddings and mask)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "fixtures" / "wan_pipeline" / "wan21"
OUT = ROOT / "tests" / "fixtures" / "wan_export"
SHARD_BYTES = 40_000
T = (0.25, 0.8)  # the inputs' times; timestep = 1000 t
LENGTHS = (5, 8)  # real caption tokens of each input


def run_config(run_dir: Path, shards: Path) -> dict:
    """The tiny Wan run (a config dict): Wan VAE and UMT5 of the pipeline fixture."""
    return {
        "model": {"kind": "wan", "width": 24, "depth": 2, "heads": 2, "ffn_dim": 32,
                  "freq_dim": 16, "patch": [1, 2, 2]},
        "text": {"encoder": "precomputed", "width": 16, "max_length": 8},
        "autoencoder": {"kind": "wan", "checkpoint": str(PIPELINE / "vae"), "factors": [4, 8, 8],
                        "latent_channels": 4},
        "data": {"world": {"frames": 5, "height": 32, "width": 32}, "source": "shards",
                 "shards": str(shards), "num_eval_clips": 2, "stats_clips": 4, "prefetch": 1},
        "diffusion": {"eval_timesteps": [0.5]},
        "sample": {"steps": 2, "num_per_prompt": 1, "prompts": ["a red ball falls"]},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
                  "eval_every": 100, "checkpoint_every": 2, "async_checkpoint": False,
                  "tensorboard": False, "sample_at_end": False, "run_dir": str(run_dir)},
    }


def tokenize(shards: Path, clips: int, config: Path) -> None:
    """`vdit tokenize SHARDS CONFIG --physics N --text-encoder PIPELINE/text_encoder`."""
    from vdit.cli import main

    code = main(["tokenize", str(shards), str(config), "--physics", str(clips), "--text-encoder",
                 str(PIPELINE / "text_encoder"), "--shard-size", "4"])
    if code:
        raise SystemExit(f"vdit tokenize failed ({code})")


def perturbed(tree, seed: int, scale: float = 0.1):
    """tree + seeded Gaussian noise (numpy, so any mesh draws the same), shardings kept."""
    import jax

    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [
        jax.device_put(np.asarray(p) + scale * rng.standard_normal(p.shape).astype(p.dtype),
                       p.sharding) for p in leaves])


def seed_run(cfg_dict: dict) -> Path:
    """A run directory whose step-0 checkpoint holds perturbed params and EMA (different noise)
    and a fresh data iterator: `vdit train` resumes it as it resumes any run."""
    from vdit.config import from_dict, to_dict
    from vdit.data.captions import resolve_text
    from vdit.data.physics import physics_tokenizer
    from vdit.data.pipeline import train_iterator
    from vdit.io.checkpoint import Checkpointer
    from vdit.io.run_dir import save_config
    from vdit.train.trainer import build_trainer

    cfg = resolve_text(from_dict(cfg_dict))
    run = Path(cfg.train.run_dir)
    save_config(run, cfg)
    trainer = build_trainer(cfg)
    state = trainer.state.replace(params=perturbed(trainer.state.params, 0),
                                  ema_params=perturbed(trainer.state.ema_params, 1))
    data = train_iterator(cfg.data, physics_tokenizer(cfg.text.max_length), cfg.train.batch_size,
                          shuffle_seed=cfg.train.seed, patch=cfg.model.patch, embeddings=True)
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(0, state, {"data_iterator": data.get_state(), "config": to_dict(cfg),
                         "system": "dit"})
    ckpt.close()
    return run


def inputs(cfg) -> dict[str, np.ndarray]:
    """The fixed inputs (see the module doc), float32 in diffusers' layout."""
    rng = np.random.default_rng(7)
    c, s, e = cfg.autoencoder.latent_channels, cfg.text.max_length, cfg.text.width
    text = rng.standard_normal((2, s, e)).astype(np.float32)
    mask = (np.arange(s)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    t = np.asarray(T, np.float32)
    return {"hidden_states": rng.standard_normal((2, c, 2, 4, 6)).astype(np.float32),
            "timestep": t * np.float32(1000),
            "encoder_hidden_states": (text * mask[..., None]).astype(np.float32),
            "text_mask": mask}


def vdit_output(cfg, params, x: dict[str, np.ndarray]) -> np.ndarray:
    """`TextToVideo.apply_dit` on the inputs as training calls it -> diffusers' layout."""
    import jax.numpy as jnp

    from vdit.diffusion.text_to_video import TextToVideo

    latent = jnp.asarray(x["hidden_states"]).transpose(0, 2, 3, 4, 1)  # -> [B, F, H, W, C]
    t = jnp.asarray(x["timestep"]) / 1000
    out = TextToVideo(cfg).apply_dit(params, latent, t, (jnp.asarray(x["encoder_hidden_states"]),
                                                        jnp.asarray(x["text_mask"])))
    # Contiguous: safetensors stores an array's buffer as laid out in memory, so a transposed
    # view would be written scrambled.
    return np.ascontiguousarray(np.asarray(out).transpose(0, 4, 1, 2, 3))


def relative(config: dict) -> dict:
    """The run's config with the checkout's paths made relative to it (tests re-root them)."""
    text = json.dumps(config).replace(str(ROOT) + "/", "")
    return json.loads(text)


def main() -> None:
    from safetensors.numpy import save_file

    from vdit.cli import main as vdit
    from vdit.config import to_dict
    from vdit.export.run_export import export_run
    from vdit.io.run_dir import run_config as read_run_config
    from vdit.io.safetensors_io import flatten
    from vdit.io.wan_transformer import load_params
    from vdit.train.trainer import load_run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d = run_config(tmp / "run", tmp / "shards")
        (tmp / "run.yaml").write_text(json.dumps(d))
        tokenize(tmp / "shards", 4, tmp / "run.yaml")
        seed_run(d)
        if vdit(["train", str(tmp / "run.yaml")]):
            raise SystemExit("vdit train failed")
        export = export_run(tmp / "run", to="diffusers", out=tmp / "export",
                            max_shard_bytes=SHARD_BYTES)
        cfg = read_run_config(tmp / "run")
        _, _, state = load_run(tmp / "run")
        params = {k: np.asarray(v) for k, v in flatten(state.ema_params).items()}
        if OUT.exists():
            shutil.rmtree(OUT / "transformer", ignore_errors=True)
        OUT.mkdir(parents=True, exist_ok=True)
        shutil.copytree(export / "transformer", OUT / "transformer")
        save_file(params, str(OUT / "params.safetensors"))
        x = inputs(cfg)
        sample = vdit_output(cfg, state.ema_params, x)
        _, exported = load_params(export / "transformer")
        again = vdit_output(cfg, exported, x)
        if not np.array_equal(sample, again):
            raise SystemExit(f"the export's params compute another output than the run's "
                             f"(max |diff| {np.abs(sample - again).max():.2e})")
        save_file({**x, "sample": sample}, str(OUT / "vdit_outputs.safetensors"))
        record = {"config": relative(to_dict(cfg)), "max_shard_bytes": SHARD_BYTES,
                  "step": int(state.step), "weights": "ema", "lengths": list(LENGTHS)}
        del record["config"]["train"]["run_dir"], record["config"]["data"]["shards"]
        (OUT / "sample.json").write_text(json.dumps(record, indent=1) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1024:.0f} KiB); now run the diffusers side: "
          "/work/peer/bin/python tools/make_reference_fixtures.py wan_export", file=sys.stderr)


if __name__ == "__main__":
    main()
