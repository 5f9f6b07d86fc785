"""`python -m yolo_backend serve` runs gunicorn, answers /health, and SIGTERM leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> set[int]:
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.add(int(entry.name))
                frontier.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_answers_health_and_stops_cleanly(tmp_path):
    port = _free_port()
    env = {**os.environ, "MODEL_DIR": str(tmp_path / "models"), "GUNICORN_ACCESS_LOG": ""}
    env.pop("MODEL_PATH", None)
    proc = subprocess.Popen([sys.executable, "-m", "yolo_backend", "serve", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    body = json.loads(reply.read())
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.3)
        assert body == {"status": "UP", "model_class": "YOLOv7Backend"}
        workers = _children(proc.pid)
        assert workers, "gunicorn should run as a child process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "serve left processes running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "MODEL_DIR" in proc.stdout.read()  # it says which model it serves
