"""Multi-host start-up: one `jax.distributed.initialize` per process, before any device use.

Explicit (GPU clusters, tests on one machine): VDIT_COORDINATOR=host:port, VDIT_NUM_PROCESSES,
VDIT_PROCESS_ID (and optionally VDIT_LOCAL_DEVICES=0,1,...). Automatic (TPU pods, SLURM, Open
MPI): VDIT_DISTRIBUTED=auto lets JAX detect the cluster. Neither set: a single process.
"""

from __future__ import annotations

import os

import jax

ENV_VARS = ("VDIT_COORDINATOR", "VDIT_NUM_PROCESSES", "VDIT_PROCESS_ID")


class DistributedError(RuntimeError):
    """The environment describes a multi-host run inconsistently."""


def cluster_from_env(env: dict | None = None) -> dict | None:
    """kwargs for `jax.distributed.initialize` from the environment; {} for auto-detection,
    None for a single process."""
    env = dict(os.environ if env is None else env)
    given = [k for k in ENV_VARS if env.get(k)]
    if not given:
        return {} if env.get("VDIT_DISTRIBUTED", "").lower() == "auto" else None
    missing = [k for k in ENV_VARS if k not in given]
    if missing:
        raise DistributedError(f"multi-host: {', '.join(given)} set but {', '.join(missing)} "
                               "missing; set all three (or none)")
    try:
        count, index = int(env["VDIT_NUM_PROCESSES"]), int(env["VDIT_PROCESS_ID"])
    except ValueError:
        raise DistributedError("multi-host: VDIT_NUM_PROCESSES and VDIT_PROCESS_ID must be "
                               "integers") from None
    if not 0 <= index < count:
        raise DistributedError(f"multi-host: VDIT_PROCESS_ID={index} is outside "
                               f"[0, VDIT_NUM_PROCESSES={count})")
    if ":" not in env["VDIT_COORDINATOR"]:
        raise DistributedError(f"multi-host: VDIT_COORDINATOR={env['VDIT_COORDINATOR']!r} must "
                               "be host:port")
    kwargs = {"coordinator_address": env["VDIT_COORDINATOR"], "num_processes": count,
              "process_id": index}
    if env.get("VDIT_LOCAL_DEVICES"):
        kwargs["local_device_ids"] = [int(i) for i in env["VDIT_LOCAL_DEVICES"].split(",")]
    return kwargs


_initialized = False


def initialize(env: dict | None = None) -> bool:
    """Join the cluster the environment describes (once per process); True if multi-host."""
    global _initialized
    kwargs = cluster_from_env(env)
    if kwargs is None:
        return False
    if not _initialized:
        jax.distributed.initialize(**kwargs)
        _initialized = True
    return True


def is_primary() -> bool:
    """Process 0 writes the run's files (metrics, plots, config, samples)."""
    return jax.process_index() == 0


_barriers = 0


def align_processes(name: str, timeout_s: int = 1800) -> None:
    """Wait until every process gets here (no-op for one process).

    CPU collectives (gloo) give a peer only 30 s to join the first collective on a new device
    group, and processes that compiled at different speeds drift further apart than that; this
    barrier runs on the coordination service, with a long timeout, before such collectives."""
    global _barriers
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # no public barrier with a timeout

    _barriers += 1
    jax_distributed.global_state.client.wait_at_barrier(f"vdit:{name}:{_barriers}",
                                                        timeout_s * 1000)
