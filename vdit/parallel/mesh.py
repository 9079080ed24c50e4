"""Build the device mesh from config: the one place besides the attention dispatch that knows
about hardware.

Within a slice (a TPU slice's ICI torus, or one GPU node's NVLink island) the axes are
`mesh.data/fsdp/tensor/context`; across slices (DCN) `mesh.dcn_data` and `mesh.dcn_fsdp`
multiply the data and fsdp axes, slice-major, so only the cheap collectives cross the slow
network."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vdit.config import ConfigError, MeshConfig
from vdit.parallel.rules import MESH_AXES


def axis_sizes(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Per-slice axis sizes (data, fsdp, tensor, context), the -1 entry resolved so that their
    product times the number of slices equals `num_devices`."""
    slices = cfg.num_slices
    if num_devices % slices:
        raise ConfigError(f"mesh: {slices} slices (dcn_data x dcn_fsdp) do not divide the "
                          f"{num_devices} devices")
    per_slice = num_devices // slices
    sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.context]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise ConfigError(
                f"mesh: the fixed axes multiply to {known}, which does not divide the "
                f"{per_slice} devices per slice"
            )
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ConfigError(
            f"mesh: data x fsdp x tensor x context = {math.prod(sizes)} but there are "
            f"{per_slice} devices per slice ({num_devices} in {slices} slice(s)); set one axis "
            "to -1 to fill"
        )
    return tuple(sizes)


def _slices(devices: list, count: int) -> list[list]:
    """Devices grouped into `count` slices: by TPU slice, else by host (GPU nodes), else in
    contiguous blocks (one process with fake devices, as in the tests)."""
    if hasattr(devices[0], "slice_index"):
        key = lambda d: d.slice_index
    elif len({d.process_index for d in devices}) == count:
        key = lambda d: d.process_index
    else:
        per = len(devices) // count
        return [devices[i * per:(i + 1) * per] for i in range(count)]
    groups: dict[int, list] = {}
    for d in sorted(devices, key=lambda d: (key(d), d.id)):
        groups.setdefault(key(d), []).append(d)
    if len(groups) != count:
        raise ConfigError(f"mesh: dcn_data x dcn_fsdp = {count} slices, but the devices form "
                          f"{len(groups)}")
    return list(groups.values())


def _slice_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """One slice's devices arranged as `shape`; on TPU in torus order, so neighbours on a mesh
    axis are neighbours on the interconnect."""
    if devices[0].platform == "tpu":
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return np.asarray(devices).reshape(shape)


def device_grid(cfg: MeshConfig, devices: list) -> np.ndarray:
    """[data, fsdp, tensor, context] array of devices: slices outermost on data and fsdp."""
    ici = axis_sizes(cfg, len(devices))
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1, 1)
    if cfg.num_slices == 1:
        return _slice_grid(ici, list(devices))
    grids = [_slice_grid(ici, s) for s in _slices(list(devices), cfg.num_slices)]
    # Block matrix: slice (i, j) fills rows i of data and j of fsdp, each block one slice.
    blocks = np.empty(dcn, dtype=object)
    for n, index in enumerate(np.ndindex(*dcn)):
        blocks[index] = grids[n]
    return np.block(blocks.tolist())


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, context), Auto axis types (GSPMD propagation)."""
    devices = devices if devices is not None else jax.devices()
    grid = device_grid(cfg, list(devices))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def batch_shards(mesh: Mesh) -> int:
    """How many ways `batch_sharding` splits the batch (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
