"""`vdit launch`: the commands that install vdit and start `vdit train` on every host of a TPU
slice (gcloud or xpk) or of a multi-node GPU cluster. Printed by default; `--run` executes them
as argument lists (no shell here; the remote side's shell gets one quoted command line).

Multi-host start-up is vdit/parallel/distributed.py's: on TPU VMs `VDIT_DISTRIBUTED=auto` lets JAX
find the slice; on GPU nodes each process gets VDIT_COORDINATOR (host:port of process 0),
VDIT_NUM_PROCESSES and VDIT_PROCESS_ID.
"""

from __future__ import annotations

import argparse
import base64
import shlex
import subprocess
import sys
from pathlib import Path

from vdit.config import ConfigError, load_config
from vdit.parallel.topologies import parse_target

REMOTE_DIR = "vdit-run"  # working directory on every host (relative to the login's home)
GPU_PORT = 1234


def default_install() -> str:
    """pip's spec for this vdit: the git remote and commit this source tree is at, so every
    host runs exactly the code that was planned; a ConfigError if there is none."""
    root = Path(__file__).resolve().parents[1]
    try:
        url = subprocess.run(["git", "-C", str(root), "remote", "get-url", "origin"],
                             capture_output=True, text=True, check=True).stdout.strip()
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        url = commit = ""
    if not url:
        raise ConfigError("--install: this vdit is not a git checkout with an 'origin' remote; "
                          "pass --install git+https://HOST/OWNER/vdit.git[@REF] or --wheel "
                          "dist/vdit-*.whl (python -m build)")
    if url.startswith("git@"):  # scp-like ssh remote -> a URL pip understands
        url = "ssh://" + url.replace(":", "/", 1)
    return f"vdit @ git+{url}@{commit}"


def _install_line(args: argparse.Namespace, extra: tuple[str, ...]) -> str:
    """`pip install ...` of vdit (from --wheel copied into REMOTE_DIR, or --install)."""
    spec = (f"{REMOTE_DIR}/{Path(args.wheel).name}" if args.wheel
            else args.install or default_install())
    return shlex.join(["python3", "-m", "pip", "install", "-U", *extra, spec])


def _train_line(config_name: str, overrides: list[str], env: dict[str, str]) -> str:
    assigns = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    return " ".join([*assigns, shlex.join(["vdit", "train", config_name, *overrides])])


def _gcloud(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, "--worker=all",
           f"--zone={args.zone}"]
    return [*cmd, f"--project={args.project}"] if args.project else cmd


def tpu_commands(args: argparse.Namespace) -> list[list[str]]:
    """gcloud: copy the config (and wheel) to every worker, then install and train on all."""
    config = Path(args.config)
    if not config.is_file():
        raise ConfigError(f"--config {args.config}: no such file")
    # This file is what every host trains on: a typo is refused here, not on each host after
    # the copy (load_config names the key; no files it names are opened).
    load_config(config, args.overrides)
    if args.wheel and not Path(args.wheel).is_file():
        raise ConfigError(f"--wheel {args.wheel}: no such file")
    if args.xpk:
        return [xpk_command(args, config)]
    copies = [str(config)] + ([args.wheel] if args.wheel else [])
    remote = " && ".join([
        f"mkdir -p {REMOTE_DIR}",
        _install_line(args, ("jax[tpu]",)),
        f"cd {REMOTE_DIR}",
        _train_line(config.name, args.overrides, {"VDIT_DISTRIBUTED": "auto"}),
    ])
    return [
        _gcloud(args, "ssh", args.name, "--command", f"mkdir -p {REMOTE_DIR}"),
        _gcloud(args, "scp", *copies, f"{args.name}:{REMOTE_DIR}/"),
        _gcloud(args, "ssh", args.name, "--command", remote),
    ]


def xpk_command(args: argparse.Namespace, config: Path) -> list[str]:
    """xpk (GKE): one workload; the config travels inside the command (base64 of the YAML),
    so the container image needs nothing but Python and pip."""
    if args.wheel:
        raise ConfigError("--wheel: xpk workloads cannot receive a local file; bake it into "
                          "--docker-image or use --install")
    if not args.cluster:
        raise ConfigError("--xpk needs --cluster (the GKE cluster xpk created)")
    blob = base64.b64encode(config.read_bytes()).decode()
    remote = " && ".join([
        _install_line(args, ("jax[tpu]",)),
        f"mkdir -p {REMOTE_DIR}", f"cd {REMOTE_DIR}",
        f"echo {blob} | base64 -d > {shlex.quote(config.name)}",
        _train_line(config.name, args.overrides, {"VDIT_DISTRIBUTED": "auto"}),
    ])
    target = parse_target(args.accelerator or "v5p-8")
    cmd = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.name}",
           f"--tpu-type={target.accelerator_type}", f"--num-slices={target.num_slices}",
           f"--docker-image={args.docker_image}", "--command", remote]
    cmd.append(f"--zone={args.zone}")
    return [*cmd, f"--project={args.project}"] if args.project else cmd


def gpu_commands(args: argparse.Namespace) -> list[list[str]]:
    """One command per node: the same `vdit train`, told its place in the cluster by
    VDIT_COORDINATOR / VDIT_NUM_PROCESSES / VDIT_PROCESS_ID. With --hosts, wrapped in ssh."""
    hosts = [h for h in (args.hosts or "").split(",") if h]
    nodes = len(hosts) or args.nodes
    if nodes < 1:
        raise ConfigError("vdit launch gpu: give --hosts h1,h2,... or --nodes N")
    coordinator = args.coordinator or (f"{hosts[0]}:{GPU_PORT}" if hosts else "")
    if not coordinator or ":" not in coordinator:
        raise ConfigError("--coordinator: host:port of node 0, reachable from every node "
                          f"(default with --hosts: the first host, port {GPU_PORT})")
    commands = []
    for i in range(nodes):
        env = {"VDIT_COORDINATOR": coordinator, "VDIT_NUM_PROCESSES": str(nodes),
               "VDIT_PROCESS_ID": str(i)}
        line = _train_line(args.config, args.overrides, env)
        if args.install or args.wheel:
            line = f"{_install_line(args, ())} && {line}"
        commands.append(["ssh", hosts[i], line] if hosts else ["bash", "-c", line])
    return commands


def _show(cmd: list[str]) -> str:
    """A command as one copy-pasteable shell line (every argument quoted as needed)."""
    if cmd[:2] == ["bash", "-c"]:
        return cmd[2]
    return shlex.join(cmd)


def _cmd_launch(args: argparse.Namespace) -> int:
    commands = tpu_commands(args) if args.target == "tpu" else gpu_commands(args)
    if args.target == "tpu" and args.accelerator:
        t = parse_target(args.accelerator)
        print(f"# {t.name}: {t.chips} chips on {t.hosts} hosts; plan it first: vdit plan "
              f"{shlex.quote(args.config)} --topology {t.name}")
    if args.target == "gpu" and not args.hosts:
        print("# run one line on each node (node 0 first: it hosts the coordinator)")
    for cmd in commands:
        print(_show(cmd))
    if not args.run:
        return 0
    if args.target == "gpu":
        if not args.hosts:
            raise ConfigError("--run on GPU nodes needs --hosts (it starts them over ssh)")
        procs = [subprocess.Popen(cmd) for cmd in commands]  # all nodes at once
        return max(p.wait() for p in procs)
    for cmd in commands:  # copy, then start: in order, stopping at the first failure
        rc = subprocess.run(cmd, check=False).returncode
        if rc:
            print(f"vdit launch: {cmd[0]} exited with {rc}", file=sys.stderr)
            return rc
    return 0


def register(sub) -> None:
    """Add `vdit launch tpu|gpu` to the CLI's subparsers."""
    p = sub.add_parser("launch", help="print (or --run) the commands that install vdit and "
                       "start training on every host of a TPU slice or GPU cluster")
    targets = p.add_subparsers(dest="target", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, help="the YAML config to train")
    common.add_argument("overrides", nargs="*", help="dotted overrides for vdit train")
    common.add_argument("--install", default=None, help="pip spec of vdit on the hosts "
                        "(default: git+ORIGIN@HEAD of this checkout)")
    common.add_argument("--wheel", default=None, help="a built vdit wheel to copy and install "
                        "instead of --install")
    common.add_argument("--run", action="store_true", help="execute instead of only printing")

    t = targets.add_parser("tpu", parents=[common], help="a Cloud TPU VM slice (gcloud), or "
                           "a GKE cluster with --xpk")
    t.add_argument("--name", required=True, help="TPU VM name (xpk: the workload name)")
    t.add_argument("--zone", required=True, help="e.g. us-east5-a")
    t.add_argument("--project", default=None)
    t.add_argument("--accelerator", default=None, help="e.g. v5p-64, 2xv5p-64 (xpk: required "
                   "to size the workload; default v5p-8)")
    t.add_argument("--xpk", action="store_true", help="an xpk workload instead of gcloud ssh")
    t.add_argument("--cluster", default=None, help="xpk: the GKE cluster")
    t.add_argument("--docker-image", default="python:3.11", help="xpk: the image (default "
                   "python:3.11)")
    t.set_defaults(func=_cmd_launch)

    g = targets.add_parser("gpu", parents=[common], help="multi-node GPUs: one process per "
                           "node, jax.distributed from VDIT_* environment variables")
    g.add_argument("--hosts", default=None, help="h1,h2,...: ssh to each (node i = host i)")
    g.add_argument("--nodes", type=int, default=0, help="without --hosts: how many nodes")
    g.add_argument("--coordinator", default=None, help="host:port of node 0")
    g.set_defaults(func=_cmd_launch)
