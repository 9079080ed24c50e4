"""Atomic file writes, the one helper for every file vdit renames into place: the content goes
to a unique temporary name beside the target, then one rename, so a reader (or a resumed job)
never sees half a file under the final name. The file gets the permissions an ordinary
`open(path, "w")` would have given (0666 less the umask): `mkstemp` alone creates 0600, which
left a video's provenance sidecar unreadable to the people who could read the video."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process's umask. Read from /proc where the kernel reports it: setting the umask to
    read it back (the portable way) briefly changes it for every thread of the process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode() -> int:
    """The mode a new file written with `open(path, "w")` gets."""
    return 0o666 & ~umask()


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".part") -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller (or a library) to write; when the
    block ends without an exception it gets the ordinary mode and is renamed to `path`,
    otherwise it is removed. `suffix` ends the temporary name (some writers pick their format
    from it); the name starts with a dot so folder listings skip it."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed: the rename moved it


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically; `fsync` also flushes it to disk before the rename
    (for small records that must survive a power cut, not for bulk outputs)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return path


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` atomically; see `write_bytes`."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)
