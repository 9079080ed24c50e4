"""Atomic writes (vdit/io/atomic.py): the ordinary mode (umask respected), nothing half-written
left under the final name or beside it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vdit.io import atomic


@pytest.fixture(params=[0o022, 0o027, 0o002])
def mask(request) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ordinary(tmp_path: Path) -> int:
    """The mode open(path, "w") gives under the current umask."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    return _mode(probe)


def test_umask_is_read_without_changing_it(mask):
    assert atomic.umask() == mask
    assert atomic.umask() == mask


def test_atomic_files_get_the_ordinary_mode(tmp_path, mask):
    want = _ordinary(tmp_path)
    assert want == 0o666 & ~mask
    assert _mode(atomic.write_text(tmp_path / "a.json", "{}", fsync=True)) == want
    assert _mode(atomic.write_bytes(tmp_path / "b.bin", b"\0")) == want
    with atomic.atomic_path(tmp_path / "c.bin", suffix=".tmp") as tmp:
        tmp.write_bytes(b"1")
    assert _mode(tmp_path / "c.bin") == want


def test_sidecar_and_video_share_the_mode(tmp_path, mask):
    """The issue's case: VIDEO.mp4 was 0644 and VIDEO.mp4.json 0600."""
    from vdit.data.video_io import write_gif, write_mp4
    from vdit.provenance.manifest import write_sidecar

    want = _ordinary(tmp_path)
    video = write_mp4(tmp_path / "v.mp4", np.zeros((2, 16, 16, 3), np.uint8), 8.0)
    sidecar = write_sidecar(video, {"ai_generated": True})
    gif = write_gif(tmp_path / "v.gif", np.zeros((2, 16, 16, 3), np.uint8), 8.0)
    assert (_mode(video), _mode(sidecar), _mode(gif)) == (want, want, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe", "v.gif", "v.mp4", "v.mp4.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = atomic.write_text(tmp_path / "config.yaml", "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
