"""Bundle files: their SHA-256 (read in blocks: a shard or the compensation data can be hundreds of MB), and
one file written atomically (a temporary file beside it, renamed into place)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_file_atomically(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary path beside `path` (same suffix), then rename it to `path`; on any
    error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
