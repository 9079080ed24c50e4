import os
import subprocess
import sys

import pytest

from vdit import host_allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc malloc settings apply on Linux only")


def test_wanted_on_cpu_only_and_opt_out():
    assert host_allocator.wanted({"JAX_PLATFORMS": "cpu"})
    assert not host_allocator.wanted({"JAX_PLATFORMS": "cuda"})
    assert not host_allocator.wanted({"JAX_PLATFORMS": "tpu,cpu"})
    assert not host_allocator.wanted({"JAX_PLATFORMS": "cpu", host_allocator.OPT_OUT: "system"})


def test_ensure_reexecutes_the_process_under_the_settings():
    """The process restarts itself with the glibc settings; only the restarted one prints."""
    code = ("from vdit import host_allocator as h; h.ensure(); import os; "
            "print('active', h.active(), os.environ['MALLOC_ARENA_MAX'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip().splitlines() == ["active True 1"]
    env[host_allocator.OPT_OUT] = "system"  # left alone: never re-executed, settings absent
    code = ("from vdit import host_allocator as h; h.ensure(); import os; "
            "print('active', h.active())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "active False"
