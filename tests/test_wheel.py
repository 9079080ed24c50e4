"""`pip install` of a built wheel works outside the checkout: the shipped configs and the trained
autoencoder travel as package data, and `vdit train`, `vdit sample` and `vdit eval-ae` run from an
empty directory. Needs the package index (or a warm pip cache) for the dependencies; set
VDIT_OFFLINE=1 to skip it where neither is reachable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.environ.get("VDIT_OFFLINE") == "1",
                                reason="VDIT_OFFLINE=1: no package index to install from")


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n" \
                                f"{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment, outside the checkout, with the wheel built from it."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a clean copy of the source: a checkout's stale build/ would hide missing files.
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", ".cache", "runs", "__pycache__",
        ".pytest_cache", ".ruff_cache"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
         str(source)], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("vdit-*.whl")
    venv.create(tmp / "venv", with_pip=True)
    pip = tmp / "venv" / "bin" / "pip"
    run([str(pip), "install", "-q", str(wheel)], cwd=tmp)
    return tmp / "venv" / "bin"


def test_the_installed_wheel_trains_samples_and_evaluates_from_an_empty_directory(
        installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed}:{env['PATH']}"
    vdit = str(installed / "vdit")
    python = str(installed / "python")

    # The wheel's vdit, not the checkout's.
    where = run([python, "-c", "import vdit; print(vdit.__file__)"], cwd=work, env=env)
    assert str(ROOT) not in where and "site-packages" in where

    version = run([python, "-c", "from importlib.metadata import version; print(version('vdit'))"],
                  cwd=work, env=env).strip()
    assert run([vdit, "--version"], cwd=work, env=env).strip() == f"vdit {version}"

    # The embedded default config and the shipped autoencoder, found as package data.
    run([vdit, "train", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
         "train.sample_at_end=false", "train.run_dir=run", "data.num_eval_clips=8"],
        cwd=work, env=env)
    assert (work / "run" / "checkpoints" / "2").is_dir()
    run([vdit, "sample", "run", "--prompt", "a red ball falls", "--num", "1"], cwd=work, env=env)
    (video,) = (work / "run" / "samples").glob("*.mp4")
    sidecar = json.loads(Path(f"{video}.json").read_text())
    assert version in json.dumps(sidecar)

    run([vdit, "export", "run", "--to", "safetensors", "--out", "exported"], cwd=work, env=env)
    assert json.loads((work / "exported" / "config.json").read_text())["vdit_version"] == version

    run([vdit, "eval-ae", "checkpoints/autoencoder-4x8x8", "--clips", "4", "--batch", "4"],
        cwd=work, env=env)
    report = json.loads((work / "eval-ae-autoencoder-4x8x8" / "eval_ae.json").read_text())
    assert report["psnr_db"] > 25  # the shipped VAE's weights, not a fresh init
    assert not (work / "checkpoints").exists()  # nothing written where the shipped files resolve
