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
    assert main(["bench", str(path), "--steps", "3", "--warmup", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = from_dict(tiny_dict(tmp_path / "run"))
    assert r["flops_per_step"] == pytest.approx(train_flops_per_step(cfg))
    assert r["tokens_per_step"] == 4 * cfg.num_tokens()
    assert r["step_s"] > 0 and r["compile_s"] > 0 and r["peak_memory_bytes"] > 0
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / r["peak_flops_per_s"])
    assert 0 < r["mfu"] < 1.5
    assert r["peak_source"] == "cpu f32 matmul, measured"
    assert not (tmp_path / "run").exists()  # a benchmark writes no run directory
