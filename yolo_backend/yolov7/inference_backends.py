"""The inference backends ``load_model`` can run a model on, and the defaults for a caller that names none.

The app passes its INFERENCE_BACKEND and ONNX_CACHE_DIR settings in. A caller that passes None (a script, a
benchmark, the tests' session-wide cache folder) gets those two environment variables, read here and nowhere
else in yolov7; the app's Settings are never read from the detector. Standard library only.
"""

from __future__ import annotations

import os
from typing import Optional, Union

BACKENDS = ("auto", "torch", "onnxruntime")
DEFAULT_BACKEND = "auto"
# In the user's cache folder, so `detect`, `info` and `val` leave nothing in the folder they run in.
DEFAULT_CACHE_DIR = "~/.cache/yolo-backend/onnx"


def check_backend(backend: str) -> str:
    """The backend name, normalised; a ValueError naming the choices for an unknown one."""
    text = str(backend).strip().lower()
    if text not in BACKENDS:
        raise ValueError(f"inference backend {backend!r} is unknown; use one of {', '.join(BACKENDS)} "
                         "(INFERENCE_BACKEND / --backend)")
    return text


def backend_or_default(backend: Optional[str]) -> str:
    """``backend``, or the INFERENCE_BACKEND environment variable, or ``auto``; checked."""
    if backend is None:
        backend = os.environ.get("INFERENCE_BACKEND") or DEFAULT_BACKEND
    return check_backend(backend)


def cache_dir_or_default(cache_dir: Union[None, str, os.PathLike]) -> str:
    """``cache_dir``, or the ONNX_CACHE_DIR environment variable, or DEFAULT_CACHE_DIR (``~`` expanded)."""
    if cache_dir is None:
        cache_dir = os.environ.get("ONNX_CACHE_DIR") or DEFAULT_CACHE_DIR
    return os.path.expanduser(os.fspath(cache_dir))
