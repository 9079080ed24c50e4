"""`vdit export RUN_DIR --to safetensors`: a run's weights, loadable without orbax or vdit."""

from __future__ import annotations

from pathlib import Path

from vdit import config as config_lib
from vdit.export.safetensors_io import write_export
from vdit.train.checkpoint import Checkpointer


def export_run(run_dir: str | Path, *, to: str = "safetensors", out: str | Path | None = None,
               raw: bool = False, step: int | None = None) -> Path:
    """Export the EMA (or raw) params and stats of a DiT or autoencoder run; returns the folder.

    An autoencoder exports its VAE params (the discriminator stays behind); a DiT exports its
    params with the frozen autoencoder's inside `stats/autoencoder`."""
    if to != "safetensors":
        raise ValueError(f"--to {to!r}; allowed: safetensors")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a vdit run directory (no config.yaml)")
    cfg = config_lib.load_config(run_dir / "config.yaml")
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    state, meta = ckpt.restore_raw(step)
    ckpt.close()
    kind = meta.get("system", "dit")
    params = state["params"] if raw else state["ema_params"]
    if kind == "autoencoder":
        params = params["vae"]
    info = {"kind": kind, "config": config_lib.to_dict(cfg), "step": int(state["step"]),
            "weights": "raw" if raw else "ema"}
    return write_export(Path(out) if out else run_dir / "export",
                        {"params": params, "stats": state["stats"]}, info)
