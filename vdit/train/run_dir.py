"""A run directory: resolved config.yaml, checkpoints/, metrics.jsonl, samples/."""

from __future__ import annotations

from pathlib import Path

from vdit import config as config_lib
from vdit.config import Config, ConfigError
from vdit.diffusion.text_to_video import TextToVideo
from vdit.train.checkpoint import Checkpointer
from vdit.train.state import TrainState
from vdit.train.trainer import build_trainer

# Keys that may change when a run is resumed; anything else would silently change the experiment.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint", "train.tensorboard",
    "train.sample_at_end", "data.prefetch", "mesh.", "sample.",
)


def check_resume_compatible(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume a run under a config that changes the experiment, naming the keys."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists() or not (run_dir / "checkpoints").exists():
        return
    saved = config_lib.load_config(saved_path)
    changed = [k for k in config_lib.diff(saved, cfg) if not k.startswith(RESUMABLE_KEYS)]
    if changed:
        raise ConfigError(
            f"{run_dir} holds a run whose config differs in: {', '.join(changed)}. "
            "Resume with the same values, or choose a new train.run_dir."
        )


def save_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.part"
    tmp.write_text(config_lib.dump_yaml(cfg))
    tmp.replace(run_dir / "config.yaml")


def load_run(
    run_dir: str | Path, step: int | None = None
) -> tuple[Config, TextToVideo, TrainState]:
    """Config, system and restored TrainState of a run directory (latest checkpoint by default)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a vdit run directory (no config.yaml)")
    cfg = config_lib.load_config(run_dir / "config.yaml")
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    trainer = build_trainer(cfg)
    with trainer.context():
        state, _ = ckpt.restore(trainer.state, step)
    ckpt.close()
    return cfg, trainer.system, state
