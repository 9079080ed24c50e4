"""`vdit export --to safetensors`: round trip, bit-identical sampling, refusal of bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import tiny_dict

from vdit.cli import main
from vdit.export.safetensors_io import ExportError, read_export
from vdit.sample.generate import generate
from vdit.train.run_dir import load_for_sampling


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    d = tiny_dict(tmp / "run")
    d["train"]["steps"] = 2
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(d))
    assert main(["train", str(tmp / "cfg.yaml")]) == 0
    assert main(["export", str(tmp / "run"), "--out", str(tmp / "export")]) == 0
    return tmp


def test_export_round_trips_and_samples_bit_identically(exported):
    cfg, system, params, stats, step = load_for_sampling(exported / "run")
    cfg2, system2, params2, stats2, step2 = load_for_sampling(exported / "export")
    assert (cfg2, step2) == (cfg, step)
    tensors, info = read_export(exported / "export")
    assert info["kind"] == "dit" and info["weights"] == "ema"
    names = set(_names(tensors))
    assert "params/patch_embed/kernel" in names and "stats/mean" in names
    kwargs = dict(num=1, seed=3, cfg=cfg.sample)
    a = generate(system, params, stats, ["a red ball falls"], **kwargs)
    b = generate(system2, params2, stats2, ["a red ball falls"], **kwargs)
    np.testing.assert_array_equal(a, b)


def _names(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _names(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}"


def test_tampered_weights_and_mismatched_configs_are_refused(exported, tmp_path, capsys):
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(exported / "export", bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    with pytest.raises(ExportError, match=r"SHA-256 .* does not match"):
        read_export(bad)
    assert main(["sample", str(bad)]) == 2
    assert "corrupt or altered" in capsys.readouterr().err

    other = tmp_path / "mismatch"
    shutil.copytree(exported / "export", other)
    info = json.loads((other / "config.json").read_text())
    info["config"]["model"]["width"] = 64
    (other / "config.json").write_text(json.dumps(info))
    with pytest.raises(ExportError, match="do not match the config's model"):
        load_for_sampling(other)
