"""File hashes that name model versions and key the ONNX cache. Standard library only (every layer uses it)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_cache: dict[tuple, str] = {}
_lock = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached by (path, size, mtime) so repeated calls cost one stat."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        cached = _cache.get(key)
    if cached:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _lock:
        _cache[key] = value
    return value
