"""FLOPs of a compiled step and the device's peak, for achieved FLOP/s and MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from vdit.parallel.hardware import PEAK_BF16

_measured_cpu_peak: float | None = None


def measure_matmul_peak(n: int = 2048, repeats: int = 20) -> float:
    """Best-of-`repeats` float32 FLOP/s of an n x n matmul on the default device.

    Best of many: on a shared or virtual machine single timings vary by 20 % or more, and an
    underestimated peak would overstate MFU."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak(device: jax.Device | None = None, remeasure: bool = False) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from). On a CPU the peak is measured
    once per process; `remeasure` measures again and keeps the higher figure."""
    global _measured_cpu_peak
    device = device or jax.devices()[0]
    kind = device.device_kind
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak, f"{kind} bf16 datasheet"
    if device.platform == "cpu":
        if _measured_cpu_peak is None or remeasure:
            _measured_cpu_peak = max(_measured_cpu_peak or 0.0, measure_matmul_peak())
        return _measured_cpu_peak, "cpu f32 matmul, measured"
    return float("nan"), f"{kind}: peak unknown"


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled function (per device), from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))
