"""Host memory allocator settings for training on a CPU (XLA:CPU).

XLA:CPU allocates a step's large buffers (activations, attention probabilities, gradients) with
`malloc`. glibc serves a request above 32 MiB, and any request that outgrows a worker thread's
arena, with a fresh `mmap`, and returns it with `munmap` when freed; so every step faults its
temporaries in again, one 4 KiB page at a time, and the kernel zeroes each page. On the 2-core
machine that was 3.7 M page faults and 9 s of kernel time in each 16 s step of
`experiments/bench_cpu.yaml`. With one arena, no `mmap` and no trimming, freed memory stays in
the process for the next step: from the third step on there are no faults at all, and the step
takes 10.5 s (docs/performance.md). The cost: the process keeps its peak heap (it returned that
memory to the system at the end of each step before).

glibc reads these settings from the environment once, when the process starts, so `vdit` (the
CLI) re-executes itself with them when the compute backend is the CPU (`ensure()`), and
`make test` runs pytest under them (`python -m vdit.host_allocator` prints them).
`VDIT_HOST_ALLOCATOR=system` leaves the allocator as it is.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

# glibc's malloc tunables (mallopt(3)): one arena, never mmap, never give memory back.
SETTINGS = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
}
OPT_OUT = "VDIT_HOST_ALLOCATOR"


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether this process should run under SETTINGS: Linux with glibc, a CPU backend (JAX
    limited to the CPU, or no GPU or TPU device on the machine), and no opt-out."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "") == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    accelerators = glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/accel*")
    return not accelerators and not os.path.exists("/dev/vfio")


def active(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return all(env.get(k) == v for k, v in SETTINGS.items())


def ensure() -> None:
    """Re-execute this process with SETTINGS in its environment when it wants them and does
    not run under them yet (see the module doc). Returns only when nothing needs doing."""
    if active() or not wanted():
        return
    os.environ.update(SETTINGS)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


if __name__ == "__main__":  # `env $(python -m vdit.host_allocator) CMD`: CMD under SETTINGS
    print(" ".join(f"{k}={v}" for k, v in SETTINGS.items()) if wanted() else "")
