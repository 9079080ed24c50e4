"""Shared fixtures: a tiny config that compiles in seconds on a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests compile far more than they run: XLA:CPU's cheapest LLVM code generation cuts compile
# time by a third to a half (a sharded tiny DiT step: 31 s -> 18 s) for slower, same-valued code.
# Set before JAX starts a backend; inherited by the processes tests start.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_backend_optimization_level=0",
                                    "--xla_llvm_disable_expensive_passes=true"]).strip()

import vdit  # noqa: F401, I001  (imported before jax: it quiets libtpu on machines without a TPU)
import jax
from vdit.config import Config, from_dict

# Reuse compiled programs across test runs (and across the processes the CLI tests start).
CACHE = os.environ.setdefault(
    "VDIT_COMPILATION_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "jax")
)
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

TINY = {
    "model": {"width": 32, "depth": 2, "heads": 2, "patch": [1, 2, 2]},
    "text": {"width": 16, "depth": 1, "heads": 2, "max_length": 12},
    "autoencoder": {"kind": "space_to_depth", "factors": [1, 4, 4]},
    "data": {"world": {"frames": 4, "height": 16, "width": 16}, "num_eval_clips": 4,
             "stats_clips": 8, "prefetch": 1},
    "diffusion": {"eval_timesteps": [0.25, 0.75]},
    "sample": {"steps": 3, "num_per_prompt": 1, "prompts": ["a red ball falls"]},
    "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 2,
              "checkpoint_every": 2, "async_checkpoint": False, "tensorboard": False,
              "sample_at_end": False},
}


def tiny_dict(run_dir: str | Path = "runs/test") -> dict:
    import copy

    d = copy.deepcopy(TINY)
    d["train"]["run_dir"] = str(run_dir)
    return d


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    return from_dict(tiny_dict(tmp_path / "run"))


# The longest test files (minutes on 2 cores), started first: `make test` hands whole files to
# its 2 workers in collection order, and a long file collected last (test_wheel.py) would run
# alone at the end while the other worker idles.
LONGEST_FIRST = ("test_parallel.py", "test_wheel.py", "test_scaling.py", "test_context_parallel.py",
                 "test_wan_experts.py", "test_real_data.py", "test_autoencoder.py",
                 "test_wan_autoencoder.py", "test_fine_tuning.py", "test_wan_run.py",
                 "test_lora_train.py", "test_validation_samples.py", "test_lora_run.py")


def pytest_collection_modifyitems(config, items):
    """Order the longest files first; skip `gpu`-marked tests unless JAX's default backend is a
    GPU."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or jax.default_backend() == "gpu":  # ask only when it matters
        return
    skip = pytest.mark.skip(reason="needs a GPU (jax.default_backend() is not 'gpu')")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A param-only checkpoint (`vdit export --to params`) of an untrained TINY DiT: what
    sampling and evaluation read, without the cost of training or an optimizer state."""
    import flax.linen as nn

    from vdit.config import to_dict
    from vdit.data.pipeline import fixed_batch
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.io.checkpoint import save_params

    cfg = from_dict(tiny_dict())
    system = TextToVideo(cfg)
    params = nn.unbox(jax.jit(system.init)(jax.random.key(0)))["params"]
    videos = fixed_batch(cfg.data, system.tokenizer, "train", cfg.data.stats_clips)["video"]
    tensors = {"params": params, "stats": system.initial_stats(videos)}
    return save_params(tmp_path_factory.mktemp("tiny") / "params", jax.device_get(tensors),
                       {"kind": "dit", "config": to_dict(cfg), "step": 0})
