"""`vdit eval-ae`: reconstruction quality of a trained autoencoder on held-out physics clips."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vdit.data.physics import physics_tokenizer
from vdit.data.pipeline import fixed_batch
from vdit.data.video_io import write_gif
from vdit.io.run_dir import check_output_dir, load_autoencoder
from vdit.train.autoencoder_system import AutoencoderSystem, side_by_side


def evaluate_autoencoder(path: str | Path, *, clips: int = 64, batch: int = 8,
                         out: str | Path | None = None) -> dict:
    """PSNR / SSIM (mean, min) of the EMA autoencoder on the first `clips` eval-split clips of
    its own physics world; writes eval_ae.json and eval_ae.gif to `out` (default: `path`; for
    an autoencoder shipped with vdit, found outside the working directory, `./eval-ae-NAME`)."""
    cfg, params, _ = load_autoencoder(path)
    if out is not None:  # refused before the evaluation rather than after it
        check_output_dir(out, "--out")
    system = AutoencoderSystem(cfg)
    params = {"vae": jax.tree.map(jnp.asarray, params)}
    videos = fixed_batch(cfg.data, physics_tokenizer(cfg.text.max_length), "eval",
                         clips)["video"]
    metrics = jax.jit(system.evaluate_per_clip)
    psnrs, ssims = [], []
    t0 = time.perf_counter()
    for i in tqdm(range(0, clips, batch), desc="eval-ae", dynamic_ncols=True):
        m = jax.device_get(metrics(params, jnp.asarray(videos[i: i + batch])))
        psnrs += m["psnr"].tolist()
        ssims += m["ssim"].tolist()
    seconds = time.perf_counter() - t0
    w, ae = cfg.data.world, cfg.autoencoder
    result = {
        "autoencoder": str(path), "clips": clips,
        "video": [w.frames, w.height, w.width], "factors": list(ae.factors),
        "latent": list(cfg.latent_shape()),
        "psnr_db": float(np.mean(psnrs)), "psnr_db_min": float(np.min(psnrs)),
        "ssim": float(np.mean(ssims)), "ssim_min": float(np.min(ssims)),
        "seconds": round(seconds, 2),
    }
    if out is None:
        shipped = not Path(path).exists()  # resolved among vdit's shipped files: never write there
        out = Path(f"eval-ae-{Path(path).name}") if shipped else Path(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_ae.json").write_text(json.dumps(result, indent=2))
    write_gif(out / "eval_ae.gif", side_by_side(system, params, videos[:4]), w.fps)
    return result
