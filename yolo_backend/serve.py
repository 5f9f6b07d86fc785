"""`python -m yolo_backend serve`: run the HTTP server (gunicorn with gunicorn.conf.py) from one command.

The server process is a child of this one; Ctrl-C / SIGTERM here stops it (and gunicorn stops its workers), so
nothing is left running.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# The repository root holds _wsgi.py, model_backend.py and gunicorn.conf.py.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def gunicorn_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(PROJECT_ROOT / "gunicorn.conf.py"),
            "--chdir", str(PROJECT_ROOT), "--bind", f"{host}:{port}", "_wsgi:app"]


def serve(host: str, port: int) -> int:
    if not (PROJECT_ROOT / "_wsgi.py").is_file():
        raise FileNotFoundError(f"{PROJECT_ROOT / '_wsgi.py'} is missing: run `serve` from a checkout of the "
                                f"project (the server entry point lives beside the yolo_backend package)")
    _describe_model()
    server = subprocess.Popen(gunicorn_command(host, port), cwd=PROJECT_ROOT)

    def forward(signum, _frame):
        if server.poll() is None:
            server.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def _describe_model() -> None:
    """Say which model will be served, so a user sees at once whether the defaults are what they want."""
    model_path = os.environ.get("MODEL_PATH")
    model_dir = os.environ.get("MODEL_DIR", "./data/models")
    if model_path:
        print(f"serve: model from MODEL_PATH={model_path}", file=sys.stderr)
    else:
        print(f"serve: model = the newest published version in MODEL_DIR={model_dir} (none yet: /predict will "
              f"ask for MODEL_PATH until one is published)", file=sys.stderr)
