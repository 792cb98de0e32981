"""Atomic file writes: a file is either wholly written or not there at all.

Everything the package writes (checkpoints, results, figures, tables) goes through
`atomic_path`, so an interrupted command (Ctrl-C, kill -9, an error) never leaves a
half-written file behind. The file gets the mode a plain `open(path, "w")` would give it
(0666 less the umask): `mkstemp` creates its temporary file 0600, and a rename keeps that;
a secret (a watermark key) asks for `mode=0o600` instead.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc);
    elsewhere set-and-restore, which is momentary."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    The temporary name keeps `path`'s suffix, so writers that infer the format from the
    name (matplotlib, pandas) still work. On error the temporary file is removed. The file
    gets `mode` if given, else 0666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """Write `text` to `path` atomically (with `mode`, as `atomic_path`)."""
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text)
