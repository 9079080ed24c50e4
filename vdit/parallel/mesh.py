"""Build the device mesh from config: the one place besides the attention dispatch that knows
about hardware."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vdit.config import ConfigError, MeshConfig
from vdit.parallel.rules import MESH_AXES


def axis_sizes(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Resolve the -1 entry so the product of axis sizes equals `num_devices`."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.context]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh: data x fsdp x tensor x context = {math.prod(sizes)} but there are "
            f"{num_devices} devices; set one axis to -1 to fill"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, context), Auto axis types (GSPMD propagation)."""
    devices = devices if devices is not None else jax.devices()
    sizes = axis_sizes(cfg, len(devices))
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
