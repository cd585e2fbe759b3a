"""Atomic files: readers only ever see them whole. Each is written under a temporary name beside its target, then
renamed over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path, suffix: str | None = None, keep: bool = True) -> Iterator[Path]:
    """A new empty temporary file beside `path` (hidden, ending in `suffix`, by default path's own) for the block to
    write. When the block succeeds and `keep`, it is renamed to `path` (atomically: a reader that opened or
    memory-mapped the old file keeps it); in every other case it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if keep:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
