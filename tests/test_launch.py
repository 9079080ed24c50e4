"""`vdit launch`: the printed gcloud / xpk / per-node commands, checked without running any."""

from __future__ import annotations

import base64
import shlex
import subprocess

import pytest

from vdit.cli import build_parser, main
from vdit.config import ConfigError
from vdit.launch import gpu_commands, tpu_commands

INSTALL = "git+https://github.com/acme/vdit.git@v0.1"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "my run.yaml"  # a space: quoting must hold it together
    # A config that loads (launch refuses one that would fail on every host): 9 = 1 + 4k frames
    # for the default causal autoencoder.
    path.write_text("model:\n  depth: 2\ndata:\n  world:\n    frames: 9\n")
    return path


def _args(*argv):
    return build_parser().parse_args(["launch", *argv])


def _remote(cmd: list[str]) -> list[str]:
    """The words the remote shell sees in a gcloud/xpk --command."""
    return shlex.split(cmd[cmd.index("--command") + 1])


def test_tpu_gcloud_copies_the_config_then_trains_on_every_worker(config):
    args = _args("tpu", "--name", "pod-1", "--zone", "us-east5-a", "--project", "p1",
                 "--config", str(config), "--install", INSTALL, "train.steps=100",
                 "train.run_dir=gs://bucket/run 1")
    mkdir, scp, ssh = tpu_commands(args)
    for cmd in (mkdir, scp, ssh):
        assert cmd[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        assert "--worker=all" in cmd and "--zone=us-east5-a" in cmd and "--project=p1" in cmd
    assert scp[4] == "scp" and str(config) in scp and "pod-1:vdit-run/" in scp
    assert ssh[4:6] == ["ssh", "pod-1"]
    words = _remote(ssh)
    assert words[words.index("install"):][:4] == ["install", "-U", "jax[tpu]", INSTALL]
    train = words[words.index("VDIT_DISTRIBUTED=auto"):]
    assert train == ["VDIT_DISTRIBUTED=auto", "vdit", "train", "my run.yaml", "train.steps=100",
                     "train.run_dir=gs://bucket/run 1"]
    # The whole printed line survives a shell: it splits back into the same argument list.
    assert shlex.split(shlex.join(ssh)) == ssh


def test_tpu_xpk_carries_the_config_inside_the_command(config):
    args = _args("tpu", "--xpk", "--cluster", "gke-1", "--name", "wl-1", "--zone", "z1",
                 "--accelerator", "2xv5e-256", "--config", str(config), "--install", INSTALL)
    (cmd,) = tpu_commands(args)
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=gke-1", "--workload=wl-1", "--tpu-type=v5litepod-256",
            "--num-slices=2", "--zone=z1"} <= set(cmd)
    words = _remote(cmd)
    blob = words[words.index("echo") + 1]
    assert base64.b64decode(blob) == config.read_bytes()
    assert words[-4:] == ["VDIT_DISTRIBUTED=auto", "vdit", "train", "my run.yaml"]


def test_gpu_nodes_get_coordinator_count_and_rank(config):
    args = _args("gpu", "--hosts", "gpu-a,gpu-b", "--config", str(config), "--install",
                 INSTALL, "mesh.fsdp=-1")
    commands = gpu_commands(args)
    assert [c[:2] for c in commands] == [["ssh", "gpu-a"], ["ssh", "gpu-b"]]
    for rank, cmd in enumerate(commands):
        words = shlex.split(cmd[2])
        assert {"VDIT_COORDINATOR=gpu-a:1234", "VDIT_NUM_PROCESSES=2",
                f"VDIT_PROCESS_ID={rank}"} <= set(words)
        assert words[-4:] == ["vdit", "train", str(config), "mesh.fsdp=-1"]
        assert INSTALL in words


def test_gpu_without_hosts_prints_one_line_per_node(config, capsys):
    assert main(["launch", "gpu", "--nodes", "3", "--coordinator", "10.0.0.1:9999",
                 "--config", str(config)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 3
    assert all("VDIT_COORDINATOR=10.0.0.1:9999 VDIT_NUM_PROCESSES=3" in ln for ln in lines)
    assert "VDIT_PROCESS_ID=2" in lines[2]


def test_run_executes_argument_lists_without_a_shell(config, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr("vdit.launch.subprocess.run", fake_run)
    assert main(["launch", "tpu", "--name", "p", "--zone", "z", "--config", str(config),
                 "--install", INSTALL, "--run"]) == 0
    assert len(calls) == 3
    assert all(isinstance(c, list) and not kw.get("shell") for c, kw in calls)


def test_missing_install_source_is_a_clear_error(config, monkeypatch):
    def no_git(cmd, **kw):
        raise subprocess.CalledProcessError(2, cmd)

    monkeypatch.setattr("vdit.launch.subprocess.run", no_git)
    with pytest.raises(ConfigError, match="--install"):
        tpu_commands(_args("tpu", "--name", "p", "--zone", "z", "--config", str(config)))


def test_wheel_is_copied_and_installed(config, tmp_path):
    wheel = tmp_path / "vdit-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    _, scp, ssh = tpu_commands(_args("tpu", "--name", "p", "--zone", "z", "--config",
                                     str(config), "--wheel", str(wheel)))
    assert str(wheel) in scp
    assert "vdit-run/vdit-0.1.0-py3-none-any.whl" in _remote(ssh)
