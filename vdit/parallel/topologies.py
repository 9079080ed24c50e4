"""Accelerator targets by name: TPU slices (`v5p-64`, `v5e-256`, `2xv5p-64`) and GPU nodes
(`8xH100`, `2x8xH200`), with their chips, hosts, HBM and bf16 peak, for `vdit plan` and
`vdit launch`.

TPU names follow Cloud TPU's accelerator types: v4-N and v5p-N count TensorCores (2 per chip,
one JAX device per chip in megacore mode), v5e-N and v6e-N count chips. A `Kx` prefix asks for
K slices (multi-slice over DCN). `tpu_devices` asks libtpu for compile-only device descriptions
of the slice (`jax.experimental.topologies`), which a CPU host can compile real TPU programs for.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from vdit.config import ConfigError
from vdit.parallel.hardware import ALIASES, GENERATIONS, Generation

TPU_EXAMPLES = ("v4-8", "v4-128", "v5p-8", "v5p-64", "v5e-16", "v5e-256", "v6e-8", "v6e-256",
                "2xv5p-64")
GPU_EXAMPLES = ("8xH100", "8xH200", "2x8xH100")
ALLOWED = (f"TPU slices GEN-N with GEN in v4, v5p (N = TensorCores, 8..) or v5e, v6e (N = chips, "
           f"1..256), optionally KxGEN-N for K slices, e.g. {', '.join(TPU_EXAMPLES)}; GPU nodes "
           f"[NODESx]GPUSxH100|H200, e.g. {', '.join(GPU_EXAMPLES)}")


@dataclass(frozen=True)
class Target:
    """What `vdit plan` compiles for and `vdit launch` starts on."""

    name: str
    generation: Generation
    chips: int  # all slices / nodes together (one JAX device per chip)
    hosts: int  # processes: TPU VMs or GPU nodes
    num_slices: int = 1
    topology: str = ""  # TPU: libtpu topology of one slice, e.g. v5p:2x4x4
    host_bounds: tuple[int, int, int] = (1, 1, 1)  # TPU chips per host

    @property
    def platform(self) -> str:
        return self.generation.platform

    @property
    def accelerator_type(self) -> str:
        """One slice's Cloud TPU accelerator type (v5p-64), or the GPU node (8xH100)."""
        if self.platform == "gpu":
            return f"{self.chips // self.hosts}x{self.generation.name}"
        per_slice = self.chips // self.num_slices * self.generation.cores_per_chip
        return f"{self.generation.cloud_name}-{per_slice}"


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's slice shape for `chips`: 3D slices grow 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4,
    4x4x8, ... (the last of the smallest dims doubles); 2D ones 1x1, 2x2, 2x4, 4x4, 4x8, ..."""
    if dims == 2:
        shape = [1, 1]
        while math.prod(shape) < chips:
            small = min(shape)
            shape[max(i for i, s in enumerate(shape) if s == small)] *= 2
        shape.sort()
        return tuple(shape)
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        small = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == small)] *= 2
    return tuple(shape)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_target(name: str) -> Target:
    """`v5p-64`, `2xv5e-256`, `8xH100`, `2x8xH200` -> Target; a ConfigError lists the allowed
    forms for anything else."""
    bad = ConfigError(f"--topology {name!r}: not a known target; allowed: {ALLOWED}")
    m = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip())
    if m:
        gen = GENERATIONS[ALIASES.get(m.group(2), m.group(2))]
        slices, count = int(m.group(1) or 1), int(m.group(3))
        chips = count // gen.cores_per_chip
        smallest = 4 if gen.dims == 3 else 1
        largest = 256 if gen.dims == 2 else 8960
        if (count % gen.cores_per_chip or not _is_pow2(chips) or not smallest <= chips <= largest
                or slices < 1):
            raise bad
        shape = _torus(chips, gen.dims)
        # Multi-host v5e/v6e slices have 4 chips per host; single-host ones up to 8.
        bounds = (*shape, 1) if gen.dims == 2 and chips <= 8 else (2, 2, 1)
        hosts = chips // math.prod(bounds)
        return Target(name, gen, chips * slices, hosts * slices, slices,
                      f"{gen.libtpu_name}:{'x'.join(map(str, shape))}", bounds)
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)x(H100|H200)", name.strip(), flags=re.IGNORECASE)
    if m:
        gen = GENERATIONS[m.group(3).upper()]
        nodes, per_node = int(m.group(1) or 1), int(m.group(2))
        if not 1 <= per_node <= 8 or nodes < 1:
            raise bad
        return Target(name, gen, nodes * per_node, nodes, nodes)
    raise bad


def tpu_devices(target: Target) -> list:
    """Compile-only TPU devices of `target`, from libtpu (no TPU needed)."""
    if target.platform != "tpu":
        raise ValueError(f"{target.name} is not a TPU target")
    # libtpu takes a machine-wide lock file that a process on a TPU VM needs to own the chips;
    # describing a topology to compile for owns nothing, and other processes here (a training
    # run, tests) may hold that lock through the libtpu they loaded at start-up.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always ships it
        raise ConfigError(f"--topology {target.name}: {e}") from None
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology,
            chip_config_name=target.generation.chip_config,
            chips_per_host_bounds=target.host_bounds, num_slices=target.num_slices)
    except Exception as e:  # no libtpu, or libtpu rejects the topology
        raise ConfigError(f"--topology {target.name}: libtpu could not describe "
                          f"{target.topology} ({type(e).__name__}: {str(e)[:300]}); TPU plans "
                          "need `pip install libtpu` (the test extra)") from None
    devices = list(topo.devices)
    if len(devices) != target.chips:
        raise ConfigError(f"--topology {target.name}: libtpu gave {len(devices)} devices for "
                          f"{target.topology}, expected {target.chips}")
    return devices
