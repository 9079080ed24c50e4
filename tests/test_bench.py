import json

import pytest
import yaml
from conftest import tiny_dict

from vdit.cli import main
from vdit.config import from_dict
from vdit.scaling.flops import train_flops_per_step


def test_bench_prints_a_json_line_with_measured_figures(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path / "run")))
    assert main(["bench", str(path), "--steps", "3", "--warmup", "1", "--runs", "3",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = from_dict(tiny_dict(tmp_path / "run"))
    assert r["flops_per_step"] == pytest.approx(train_flops_per_step(cfg))
    assert r["encoder_flops_per_step"] == 0.0  # space_to_depth: no encoder work in the step
    assert r["tokens_per_step"] == 4 * cfg.num_tokens()
    assert r["step_s"] > 0 and r["compile_s"] > 0 and r["peak_memory_bytes"] > 0
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / r["peak_flops_per_s"])
    # Three rounds of three steps: the MFU is the median round's, against one peak.
    assert len(r["mfu_runs"]) == 3 and r["mfu"] == pytest.approx(sorted(r["mfu_runs"])[1])
    assert r["mfu_runs"][0] * r["peak_flops_per_s"] <= r["flops_per_step"] / r["step_s_min"]
    # Utilisation is a fraction of the measured peak: no round, nor the fastest step, beats it.
    fastest = r["flops_per_step"] / r["step_s_min"] / r["peak_flops_per_s"]
    assert 0 < r["mfu"] <= max(r["mfu_runs"]) <= fastest <= 1
    assert r["peak_source"] == "cpu f32 matmul, measured"
    assert not (tmp_path / "run").exists()  # a benchmark writes no run directory


def test_ab_step_alternates_two_variants_and_reports_the_ratio(tmp_path):
    """tools/ab_step.py: B is A plus its own overrides and XLA options; both compile, their
    steps alternate, and the per-round ratios give the reported median."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path / "run")))
    tool = Path(__file__).parents[1] / "tools" / "ab_step.py"
    out = subprocess.run([sys.executable, str(tool), str(path), "model.depth=1", "--b",
                          "model.remat=full", "--b-xla", "xla_cpu_prefer_vector_width=256",
                          "--rounds", "3", "--warmup", "1"],
                         capture_output=True, text=True, check=True).stdout
    rounds = re.findall(r"round \d: A ([\d.]+) ms, B ([\d.]+) ms, B/A ([\d.]+)", out)
    assert len(rounds) == 3
    ratios = sorted(float(r) for _, _, r in rounds)  # each printed to 3 decimals
    median = float(re.search(r"B/A: median ([\d.]+)", out).group(1))
    assert median == pytest.approx(ratios[1], abs=1.1e-3)
    assert "B is model.remat=full xla_cpu_prefer_vector_width=256" in out


def test_report_splits_the_encoders_flops_and_gives_the_fastest_steps_mfu():
    from vdit.train.bench import format_report

    r = {"device": "cpu", "devices": 1, "params": 6.2e6, "dtype": "float32", "remat": "none",
         "scan_layers": False, "compile_s": 4.6, "step_s": 0.2, "step_s_min": 0.16,
         "tokens_per_s": 1920.0, "tokens_per_step": 384, "flops_per_step": 14.1e9,
         "dit_flops_per_step": 10.0e9, "encoder_flops_per_step": 4.1e9, "flops_ratio_xla": 0.977,
         "flops_per_s": 70.5e9, "peak_flops_per_s": 200e9, "peak_source": "measured",
         "mfu": 0.3525, "peak_memory_bytes": 2**28, "memory_source": "XLA estimate"}
    report = format_report(r)
    assert "14.1 GFLOP: DiT 10.0 analytic + frozen encoders 4.1 (97.7 % of XLA's count)" in report
    assert "MFU           35.2 % (fastest step 44.1 %)" in report
    r.update(flops_per_step=10.0e9, encoder_flops_per_step=0.0)
    assert "10.0 GFLOP analytic (" in format_report(r)


def _tool(name: str):
    """A script under tools/ as a module (tools/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_attention_flops_are_vdit_attention_flops():
    """tools/bench_peer.py adds the attention torch's FlopCounterMode misses on CPU: it must be
    exactly vdit's analytic self- and cross-attention matmuls (3 x forward), so the two sides'
    FLOP counts compare like for like. No torch needed."""
    from vdit.config import load_config
    from vdit.scaling.flops import forward_breakdown

    peer = _tool("bench_peer")
    overrides = ["model.depth=3", "model.width=128", "model.heads=2", "text.max_length=8"]
    cfg = load_config("experiments/bench_cpu.yaml", overrides)
    shape = peer.peer_shape("experiments/bench_cpu.yaml", overrides, steps=1, warmup=0)
    assert (shape["depth"], shape["width"], shape["text_length"]) == (3, 128, 8)
    f = forward_breakdown(cfg)
    n, s, d = cfg.num_tokens(), cfg.text.max_length, cfg.model.width
    attention = f.self_attention + cfg.model.depth * 4.0 * n * s * d  # cross: QK and AV only
    assert peer.sdpa_flops(shape) == 3 * attention * cfg.train.batch_size


def test_bench_of_a_wan_config_without_shards_runs_on_a_synthetic_batch(tmp_path, capsys):
    """model.kind wan on precomputed captions whose shards are not here: the bench builds the
    model from random weights, runs the step on a synthetic batch of the config's shapes and
    counts Wan's FLOPs (what experiments/bench_gpu_wan.yaml does at 32,760 tokens)."""
    from vdit.scaling.flops import wan_forward_flops
    from vdit.train.bench import format_report

    d = tiny_dict(tmp_path / "run")
    d["model"].update(kind="wan", ffn_dim=64, freq_dim=16, dtype="bfloat16", remat="dots")
    d["text"].update(encoder="precomputed", width=24, max_length=8)
    d["data"].update(source="shards", shards=str(tmp_path / "absent"))
    path = tmp_path / "wan.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["bench", str(path), "--steps", "1", "--warmup", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = from_dict(d)
    assert r["synthetic_batch"] and r["model_kind"] == "wan"
    assert r["flops_per_step"] == pytest.approx(3 * 4 * wan_forward_flops(cfg).forward)
    assert r["loss"] > 0 and r["step_s"] > 0
    assert "synthetic batch" in format_report(r)
