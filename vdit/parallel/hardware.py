"""Hardware facts, one place: each accelerator generation's HBM per chip and dense bf16 peak.

`vdit plan` and `vdit launch` (parallel/topologies.py) size targets with them; the train loop and
`vdit bench` (train/throughput.py) compute MFU against them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Published dense bf16 peak FLOP/s per chip (vendor datasheets).
PEAK_BF16 = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H100": 989e12,  # SXM, dense
    "H200": 989e12,
}

GIB = 2**30


@dataclass(frozen=True)
class Generation:
    """One accelerator generation: how names count it and what one chip has."""

    name: str  # as written in a target name: v5p, H100
    platform: str  # tpu | gpu
    device_kind: str  # JAX's device_kind (key of PEAK_BF16)
    hbm_bytes: float  # per chip
    dims: int = 0  # TPU torus dimensions (2 or 3)
    cores_per_chip: int = 1  # how the accelerator-type number counts chips
    chip_config: str = "default"  # libtpu chip config (v4 needs megacore: 1 device per chip)
    libtpu_name: str = ""  # the generation as libtpu's topology names spell it
    cloud_name: str = ""  # ... and as Cloud TPU accelerator types (gcloud, xpk) spell it

    @property
    def peak_flops(self) -> float:
        return PEAK_BF16[self.device_kind]


# HBM per chip. Cloud TPU's "GB" are binary: a v5p reports a 95 GiB limit, and libtpu's
# compiler gives a v5e 15.75 GiB of its 16. NVIDIA's "80 GB" / "141 GB" as the devices report
# them, in MiB.
GENERATIONS = {g.name: g for g in (
    Generation("v4", "tpu", "TPU v4", 32 * GIB, 3, 2, "megacore", "v4", "v4"),
    Generation("v5p", "tpu", "TPU v5p", 95 * GIB, 3, 2, "default", "v5p", "v5p"),
    Generation("v5e", "tpu", "TPU v5e", 16 * GIB, 2, 1, "default", "v5e", "v5litepod"),
    Generation("v6e", "tpu", "TPU v6e", 32 * GIB, 2, 1, "default", "v6e", "v6e"),
    Generation("H100", "gpu", "H100", 81559 * 2**20),  # H100 SXM 80 GB
    Generation("H200", "gpu", "H200", 143771 * 2**20),  # H200 SXM 141 GB
)}
ALIASES = {"v5litepod": "v5e"}  # Cloud TPU's name for v5e slices
