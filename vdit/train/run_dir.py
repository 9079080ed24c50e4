"""A run directory: resolved config.yaml, checkpoints/, metrics.jsonl, samples/."""

from __future__ import annotations

from pathlib import Path

from vdit import config as config_lib
from vdit.config import Config, ConfigError
from vdit.diffusion.text_to_video import TextToVideo
from vdit.train.checkpoint import Checkpointer
from vdit.train.state import TrainState
from vdit.train.trainer import restore_target

# Keys that may change when a run is resumed; anything else would silently change the experiment.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint", "train.tensorboard",
    "train.sample_at_end", "train.max_bad_steps", "data.prefetch", "mesh.", "sample.",
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
    system = TextToVideo(cfg)
    # Restored into shapes alone: the run's data and autoencoder export need not exist anymore.
    state, _ = ckpt.restore(restore_target(cfg, system), step)
    ckpt.close()
    return cfg, system, state


def load_for_sampling(path: str | Path, step: int | None = None, raw: bool = False):
    """(config, system, params, stats, step) of a DiT run directory, a safetensors export or a
    param-only checkpoint: what `vdit sample` needs. Exports hold the params they were made with
    (EMA or raw)."""
    from vdit.export.safetensors_io import is_export, read_export
    from vdit.train.checkpoint import is_params_checkpoint, load_params

    path = Path(path)
    if is_export(path) or is_params_checkpoint(path):
        tensors, info = read_export(path) if is_export(path) else load_params(path)
        if info.get("kind") != "dit":
            raise ConfigError(f"{path} exports a {info.get('kind')!r}, not a text-to-video DiT")
        cfg = config_lib.from_dict(info["config"])
        system = TextToVideo(cfg)
        check_params_match(system.init, tensors["params"], path)
        return cfg, system, tensors["params"], tensors["stats"], int(info["step"])
    cfg, system, state = load_run(path, step)
    return cfg, system, state.params if raw else state.ema_params, state.stats, int(state.step)


def check_params_match(init, params: dict, where: Path) -> None:
    """Refuse weights whose names or shapes differ from those `init(key)["params"]` makes."""
    import flax.linen as nn
    import jax

    from vdit.export.safetensors_io import ExportError, flat_leaves

    abstract = nn.unbox(jax.eval_shape(init, jax.random.key(0)))["params"]
    expected = {k: tuple(v.shape) for k, v in flat_leaves(abstract).items()}
    found = {k: tuple(v.shape) for k, v in flat_leaves(params).items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{k}: expected shape {expected[k]}, found {found[k]}"
             for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    if missing or extra or wrong:
        lines = ([f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in extra[:5]]
                 + wrong[:5])
        raise ExportError(f"{where}: the weights do not match the config's model:\n  "
                          + "\n  ".join(lines))


def resolve_autoencoder_path(path: str | Path) -> Path:
    """`autoencoder.checkpoint` as a path: as given when it exists (absolute, or relative to
    the working directory, like every other path in a config); else a relative path is looked
    up in the vdit checkout (the folder holding `experiments/`), where the shipped
    `checkpoints/` live, so the embedded default works from any directory. Neither: refused,
    naming every place looked at."""
    if not path:
        raise ConfigError("autoencoder.checkpoint: a causal_vae autoencoder needs a trained "
                          "checkpoint (train one with `vdit train-ae`); or set "
                          "autoencoder.kind=space_to_depth")
    given = Path(path).expanduser()
    if given.exists():
        return given
    looked = [given.absolute()]
    if not given.is_absolute():
        in_checkout = config_lib.DEFAULT_CONFIG.parents[1] / given
        if in_checkout.exists():
            return in_checkout
        looked.append(in_checkout)
    raise ConfigError(f"autoencoder.checkpoint: {path} does not exist (looked for "
                      + " and ".join(str(p) for p in looked) + ")")


def load_autoencoder(path: str | Path) -> tuple[Config, dict, dict]:
    """(its config, EMA params, latent stats {"mean", "std"}) of a trained autoencoder, from
    an autoencoder run directory (latest checkpoint) or an exported directory (`vdit export`)."""
    from vdit.export.safetensors_io import is_export, read_export

    path = resolve_autoencoder_path(path)
    if is_export(path):
        tensors, info = read_export(path)
        if info.get("kind") != "autoencoder":
            raise ConfigError(f"autoencoder.checkpoint: {path} exports a {info.get('kind')!r}, "
                              "not an autoencoder")
        cfg = config_lib.from_dict(info["config"])
        from vdit.train.autoencoder_system import AutoencoderSystem

        vae_init = lambda key: {"params": AutoencoderSystem(cfg).init(key)["params"]["vae"]}
        check_params_match(vae_init, tensors["params"], path)
        return cfg, tensors["params"], tensors["stats"]
    if not (path / "config.yaml").exists():
        raise ConfigError(f"autoencoder.checkpoint: {path} is neither an autoencoder run "
                          "directory nor an exported autoencoder")
    cfg = config_lib.load_config(path / "config.yaml")
    ckpt = Checkpointer(path / "checkpoints", async_save=False)
    if ckpt.latest_step() is None:
        raise ConfigError(f"autoencoder.checkpoint: {path} has no checkpoint yet")
    state, _ = ckpt.restore_raw()
    ckpt.close()
    return cfg, state["ema_params"]["vae"], state["stats"]
