"""Every `vdit` subcommand given a wrong argument ends with one line, `vdit CMD: error: ...`,
naming the argument, a non-zero exit and no traceback, and leaves files already there alone
(issue #23). The CLI runs in this process (`vdit.cli.main`) so the table costs no start-ups;
one case runs the real command to check what a user's shell sees. A real bug still raises."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_dict

from vdit.cli import main

DEFAULT = str(Path(__file__).resolve().parents[1] / "experiments" / "default.yaml")
SHIPPED_AE = str(Path(__file__).resolve().parents[1] / "checkpoints" / "autoencoder-4x8x8")
LAUNCH = ["--name", "a", "--zone", "z", "--install", "vdit"]

# (argv, what the error line must name). "{tiny}": a param-only checkpoint of a tiny DiT (the
# cases that must read the run's config to judge the argument); "{ae}": the shipped VAE.
CASES: list[tuple[list[str], str]] = [
    (["train", "missing.yaml"], "missing.yaml"),
    (["train", "emptydir"], "emptydir is a folder"),
    (["train", "bin.dat"], "bin.dat: not a text file"),
    (["train", "bad.yaml"], "bad.yaml: not valid YAML"),
    (["train", "list.yaml"], "list.yaml"),
    (["train", "train.steps=abc"], "train.steps"),
    (["train", "train.steps=0"], "train.steps"),
    (["train", "model.widht=3"], "model.widht"),
    (["train", "train.run_dir=text.txt"], "train.run_dir: text.txt exists and is not a folder"),
    (["train", "train.run_dir=text.txt/run"], "train.run_dir: text.txt/run is under text.txt"),
    (["train-ae", "train.run_dir=text.txt"], "train.run_dir"),
    (["train-ae", "train.warmup_steps=-1"], "warmup_steps"),
    (["eval-ae", "missing"], "missing does not exist"),
    (["eval-ae", "text.txt"], "text.txt is neither"),
    (["eval-ae", "dit_run"], "dit_run is a DiT run, not an autoencoder run"),
    (["eval-ae", "dit_export"], "exports a 'dit', not an autoencoder"),
    (["eval-ae", "dit_export", "--clips", "0"], "--clips"),
    (["eval-ae", "{ae}", "--out", "text.txt"], "--out: text.txt"),
    (["eval-physics", "missing"], "missing is not a vdit run directory"),
    (["eval-physics", "text.txt"], "text.txt is not a vdit run directory"),
    (["eval-physics", "dit_run", "dit_run"], "--out"),
    (["eval-physics", "dit_run", "--out", "text.txt"], "--out: text.txt"),
    (["eval-physics", "{tiny}", "--context-frames", "9"], "--context-frames"),
    (["eval-physics", "{tiny}", "--clips", "0"], "--clips"),
    (["export", "missing"], "missing is not a vdit run directory"),
    (["export", "text.txt"], "text.txt is not a vdit run directory"),
    (["export", "dit_run", "--out", "text.txt"], "--out: text.txt"),
    (["export", "dit_run", "--out", "earlier_export"], "--overwrite"),
    (["export", "dit_run", "--step", "-1"], "--step"),
    (["export", "dit_run", "--to", "onnx"], "--to"),
    (["sample", "missing"], "missing is not a vdit run directory"),
    (["sample", "{ae}"], "not a text-to-video DiT"),
    (["sample", "dit_run", "--out", "text.txt"], "--out: text.txt"),
    (["sample", "dit_run", "--c2pa-cert", "text.txt"], "--c2pa-cert needs --c2pa-key"),
    (["sample", "dit_run", "--c2pa-key", "text.txt", "--c2pa-cert", "none.pem"],
     "--c2pa-cert: none.pem"),
    (["sample", "dit_run", "--num", "0"], "--num"),
    # Files that exist but are no certificate: found at the first signature, after sampling;
    # the video written before it stays.
    (["sample", "{tiny}", "--out", "signed", "--c2pa-cert", "text.txt", "--c2pa-key",
      "text.txt"], "C2PA signing of"),
    (["sample", "{tiny}", "--context", "text.txt", "--context-frames", "1"], "--context"),
    (["sample", "{tiny}", "--context", "missing.mp4", "--context-frames", "1"], "--context"),
    (["sample", "{tiny}", "--context-frames", "1"], "--context"),
    (["bench", "missing.yaml"], "missing.yaml"),
    (["bench", "--steps", "0"], "--steps"),
    (["detect", "missing.mp4"], "missing.mp4"),
    (["detect", "emptydir"], "emptydir"),
    (["detect", "text.txt"], "text.txt: cannot decode video"),
    (["tokenize", "text.txt", "--physics", "2"], "out: text.txt exists and is not a folder"),
    (["tokenize", "o", "--physics", "0"], "--physics"),
    (["tokenize", "o", "--videos", "missing", "--captions", "caps.csv"], "--videos: missing"),
    (["tokenize", "o", "--videos", "videos"], "--captions"),
    (["tokenize", "o", "--videos", "videos", "--captions", "caps_wrong.csv"],
     "--captions: caps_wrong.csv: needs columns 'path' and 'caption'"),
    (["tokenize", "o", "--videos", "videos", "--captions", "caps_empty.csv"],
     "--captions: caps_empty.csv"),
    (["tokenize", "o", "--videos", "videos", "--captions", "missing.csv"],
     "--captions: missing.csv"),
    (["tokenize", "o", "--videos", "videos", "--captions", "emptydir"], "--captions: emptydir"),
    (["tokenize", "o", "--videos", "videos", "--captions", "caps.txt"], "--captions: caps.txt"),
    (["tokenize", "o", "--videos", "videos", "--captions", "caps_bad.jsonl"],
     "--captions: caps_bad.jsonl:1: not JSON"),
    (["tokenize", "o", "--physics", "2", "--buckets", "3x4"], "--buckets"),
    (["tokenize", "o", "--physics", "2", "--process", "2", "--processes", "2"], "process 2"),
    (["tokenize", "o", "--tfds", "no_such_dataset_vdit"], "--tfds no_such_dataset_vdit"),
    (["sweep", "run", "missing.yaml"], "missing.yaml"),
    (["sweep", "run", "emptydir"], "emptydir is a folder"),
    (["sweep", "run", "bin.dat"], "bin.dat: not a text file"),
    (["sweep", "run", "list.yaml"], "list.yaml"),
    (["sweep", "fit", "missing"], "missing"),
    (["sweep", "fit", "ledger_empty.jsonl"], "ledger_empty.jsonl: 0 finished runs"),
    (["sweep", "fit", "text.txt"], "text.txt: 0 finished runs"),
    (["sweep", "fit", "ledger_short.jsonl"], "ledger_short.jsonl: 1 finished runs"),
    (["sweep", "fit", "ledger_wrong.jsonl"], "ledger_wrong.jsonl: row 1"),
    (["sweep", "fit", "ledger_short.jsonl", "--bootstrap", "-1"], "--bootstrap"),
    (["sweep", "fit", "ledger_short.jsonl", "--out", "text.txt"], "--out: text.txt"),
    (["plan", "--topology", "v9-8"], "--topology"),
    (["plan", "missing.yaml", "--topology", "v5p-8"], "missing.yaml"),
    (["plan", "--topology", "v5p-8", "--mfu", "0"], "--mfu"),
    (["launch", "tpu", "--config", "missing.yaml", *LAUNCH], "--config missing.yaml"),
    (["launch", "tpu", "--config", "text.txt", *LAUNCH], "text.txt"),
    (["launch", "tpu", "--config", DEFAULT, *LAUNCH, "model.widht=3"], "model.widht"),
    (["launch", "tpu", "--config", DEFAULT, *LAUNCH, "--wheel", "missing.whl"],
     "--wheel missing.whl"),
    (["launch", "gpu", "--config", DEFAULT, "--nodes", "0"], "--hosts"),
    (["launch", "gpu", "--config", DEFAULT, "--nodes", "2", "--coordinator", "h"],
     "--coordinator"),
]


def _case_id(case: tuple[list[str], str]) -> str:
    return " ".join(a.replace("/", "_") for a in case[0])[:100]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder of wrong inputs: a text file, a folder, binary bytes, broken YAML and CSV,
    ledgers too short to fit, a DiT run (config + a checkpoint, no autoencoder in it), a DiT
    export, and an earlier export that must survive."""
    from vdit.config import dump_yaml, from_dict
    from vdit.io.checkpoint import Checkpointer
    from vdit.io.safetensors_io import write_export

    d = tmp_path_factory.mktemp("cli_errors")
    (d / "text.txt").write_text("hello\n")
    (d / "emptydir").mkdir()
    (d / "videos").mkdir()
    (d / "bin.dat").write_bytes(b"\xff\xfe\x00\x01binary")
    (d / "bad.yaml").write_text("model: [unclosed\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "caps.csv").write_text("path,caption\na.mp4,a ball\n")
    (d / "caps.txt").write_text("a.mp4 a ball\n")
    (d / "caps_wrong.csv").write_text("file,text\na.mp4,a ball\n")
    (d / "caps_empty.csv").write_text("")
    (d / "caps_bad.jsonl").write_text("{not json\n")
    (d / "ledger_empty.jsonl").write_text("")
    row = '{"per_token_params": 1, "tokens": 2, "eval_loss": 3.0, "flops": 4}\n'
    (d / "ledger_short.jsonl").write_text(row)
    (d / "ledger_wrong.jsonl").write_text('{"loss": 1}\n' * 7)
    cfg = from_dict(tiny_dict(d / "dit_run"))
    run = d / "dit_run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(cfg))
    # A DiT's state has no "vae" params: what `vdit eval-ae` used to die on (KeyError: 'vae').
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(1, {"params": {"dit": {"w": np.zeros(2, np.float32)}},
                  "ema_params": {"dit": {"w": np.zeros(2, np.float32)}},
                  "stats": {"mean": np.zeros(1, np.float32)}}, {"system": "dit"})
    ckpt.close()
    write_export(d / "dit_export", {"params": {"w": np.zeros(2, np.float32)}},
                 {"kind": "dit", "config": yaml.safe_load(dump_yaml(cfg)), "step": 1})
    write_export(d / "earlier_export", {"params": {"w": np.ones(2, np.float32)}},
                 {"kind": "dit", "config": {}, "step": 0})
    return d


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) -> (exit code, stdout + stderr); an exception escaping main is a traceback."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("argv,names", CASES, ids=[_case_id(c) for c in CASES])
def test_a_wrong_argument_is_one_error_line(argv, names, workdir, tiny_run, monkeypatch,
                                            capsys):
    monkeypatch.chdir(workdir)
    argv = [a.format(tiny=tiny_run, ae=SHIPPED_AE) for a in argv]
    before = _snapshot(workdir)
    rc, output = _run(argv, capsys)
    assert rc not in (0, None), output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if f"vdit {argv[0]}" in line
              and ": error: " in line]
    assert errors, f"no 'vdit {argv[0]}...: error:' line in:\n{output}"
    assert names in output, f"the error does not name {names!r}:\n{output}"
    after = _snapshot(workdir)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"files already there were changed or removed: {changed}"


def test_the_real_command_prints_no_traceback(workdir):
    """What a user's shell sees: the installed entry point, not main() in a test."""
    proc = subprocess.run([sys.executable, "-m", "vdit.cli", "tokenize", "o", "--videos",
                           "videos", "--captions", "caps_wrong.csv"], cwd=workdir,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("vdit tokenize: error: --captions:")


def test_a_real_bug_still_raises(workdir, monkeypatch):
    """Only known user errors are translated: anything else keeps its traceback."""
    import vdit.export.run_export as run_export

    def bug(*args, **kwargs):
        raise KeyError("vae")

    monkeypatch.setattr(run_export, "export_run", bug)
    monkeypatch.chdir(workdir)
    with pytest.raises(KeyError):
        main(["export", "dit_run"])
    # A ValueError that is not a user's input error is not swallowed either.
    monkeypatch.setattr(run_export, "export_run",
                        lambda *a, **k: np.zeros(2).reshape(3))
    with pytest.raises(ValueError):
        main(["export", "dit_run"])
