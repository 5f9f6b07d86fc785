"""Slow clients against the real server, measured from outside: while N sockets hold unfinished requests, does
/health still answer quickly and is a /predict of one task still answered?

Two kinds of slow socket, N of each kind at a time, held for --seconds (one that the server closes is reopened at
once, as an attacker would):

  dribble   ``GET /health HTTP/1.1``, then header bytes one at a time every --interval seconds, never the blank line
  body      ``POST /predict`` with ``Content-Length: 100000`` and no body at all

Meanwhile /health is asked every 0.2 s on a new connection (5 s timeout; a timeout or a refused connection is a
failure) and, after a few seconds, one /predict of one task (a data-URI image; the model was warmed up before).
The server is started here on 127.0.0.1 on a fresh MODEL_DIR with no MODEL_PATH (the untrained yolov7-tiny):

  serve     ``python -m yolo_backend serve`` (gunicorn with gunicorn.conf.py, embedded broker, one RQ worker)
  gunicorn  ``gunicorn -c gunicorn.conf.py _wsgi:app`` alone (no broker: /predict needs none)
  classic   ``python _wsgi.py`` (Flask's threaded development server)

    .venv/bin/python benchmarks/bench_slow_clients.py                         # 200 sockets of each mode, 30 s
    .venv/bin/python benchmarks/bench_slow_clients.py --worker-class gthread  # gunicorn's own worker, for contrast
    .venv/bin/python benchmarks/bench_slow_clients.py --entry classic --modes dribble

Prints a markdown table; exits 1 when a mode misses the target (/health p99 >= 1 s or a failure, or no /predict
answer).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="fire"/><Label value="smoke"/></RectangleLabels></View>"""
PROJECT = "7.1700000000"
HEALTH_EVERY_S = 0.2
HEALTH_TIMEOUT_S = 5.0
DRIBBLE_HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"
BODY_HEAD = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100000\r\n\r\n")


# --- the slow sockets -----------------------------------------------------------------------------------------

class SlowSockets:
    """``count`` sockets holding unfinished requests to host:port, kept open from a thread of their own.
    ``closed_by_server`` counts the sockets the server closed (each is reopened while running);
    ``replies`` keeps the first bytes of what the server said before closing (e.g. a 408)."""

    def __init__(self, host: str, port: int, count: int, mode: str, interval: float = 2.0):
        assert mode in ("dribble", "body"), mode
        self.address, self.count, self.mode, self.interval = (host, port), count, mode, interval
        self.closed_by_server = 0
        self.opened = 0
        self.failed_connects = 0
        self.replies: list[bytes] = []
        self.lifetimes: list[float] = []  # seconds from connect to the server's close
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"slow-{mode}", daemon=True)
        self._sockets: dict[socket.socket, tuple[float, int]] = {}  # socket -> (opened at, bytes of padding sent)

    def __enter__(self) -> "SlowSockets":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in list(self._sockets):
            sock.close()

    @property
    def held(self) -> int:
        return len(self._sockets)

    def _open(self) -> bool:
        try:
            sock = socket.create_connection(self.address, timeout=5)
            sock.sendall(DRIBBLE_HEAD if self.mode == "dribble" else BODY_HEAD)
        except OSError:
            self.failed_connects += 1
            return False
        sock.setblocking(False)
        self._sockets[sock] = (time.monotonic(), 0)
        self.opened += 1
        return True

    def _run(self) -> None:
        padding = b"X-Slow: " + b"y" * 10_000_000  # never ends: one more byte every interval
        next_dribble = time.monotonic() + self.interval
        while not self._stop.is_set():
            while len(self._sockets) < self.count and not self._stop.is_set():
                if not self._open():
                    break  # the backlog is full: try again on the next round
            dribble = self.mode == "dribble" and time.monotonic() >= next_dribble
            for sock, (opened_at, sent) in list(self._sockets.items()):
                if self._closed_by_server(sock, opened_at):
                    continue
                if dribble:
                    try:
                        sock.send(padding[sent:sent + 1])
                        self._sockets[sock] = (opened_at, sent + 1)
                    except OSError:
                        self._forget(sock, opened_at, b"")
            if dribble:
                next_dribble = time.monotonic() + self.interval
            self._stop.wait(0.25)

    def _closed_by_server(self, sock: socket.socket, opened_at: float) -> bool:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        self._forget(sock, opened_at, data)
        return True

    def _forget(self, sock: socket.socket, opened_at: float, reply: bytes) -> None:
        self._sockets.pop(sock, None)
        sock.close()
        self.closed_by_server += 1
        self.lifetimes.append(time.monotonic() - opened_at)
        if reply and len(self.replies) < 20:
            self.replies.append(reply[:200])


# --- what a user sees meanwhile -------------------------------------------------------------------------------

class HealthProbe:
    """GET /health every HEALTH_EVERY_S on a new connection, from a thread; latencies of the 200 answers, count of
    failures (timeouts, refused connections, other statuses)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(HEALTH_TIMEOUT_S + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            status = get(self.host, self.port, "/health", HEALTH_TIMEOUT_S)[0]
            if status == 200:
                self.latencies.append(time.monotonic() - started)
            else:
                self.failures += 1
            self._stop.wait(max(0.0, HEALTH_EVERY_S - (time.monotonic() - started)))

    def summary(self) -> dict:
        ordered = sorted(self.latencies)
        pick = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else (lambda q: None)
        return {"asked": len(ordered) + self.failures, "failures": self.failures, "p50": pick(0.5),
                "p99": pick(0.99), "max": ordered[-1] if ordered else None}


def get(host: str, port: int, path: str, timeout: float, body: Optional[dict] = None) -> tuple[Optional[int], bytes]:
    """One request on a new connection: (status, body), or (None, b"") when it failed or timed out."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if body is None:
            connection.request("GET", path)
        else:
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        return reply.status, reply.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        connection.close()


def predict_body() -> dict:
    import cv2
    import numpy as np

    image = np.full((64, 96, 3), 90, np.uint8)
    cv2.rectangle(image, (24, 16), (48, 32), (0, 80, 255), -1)
    uri = "data:image/png;base64," + base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()
    return {"tasks": [{"id": 1, "data": {"image": uri}}], "project": PROJECT, "label_config": CONFIG}


def timed_predict(host: str, port: int, timeout: float = 120.0) -> tuple[Optional[int], float]:
    started = time.monotonic()
    status, _ = get(host, port, "/predict", timeout, predict_body())
    return status, time.monotonic() - started


# --- the server -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The backend as a child process on 127.0.0.1 (its own process group, killed at the end)."""

    def __init__(self, entry: str, workdir: Path, env_extra: Optional[dict] = None):
        self.host, self.port = "127.0.0.1", free_port()
        env = {k: v for k, v in os.environ.items()
               if k not in ("MODEL_PATH", "MODEL_VERSION", "REDIS_URL", "REDIS_HOST", "REDIS_PORT",
                            "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "GUNICORN_CMD_ARGS")}
        env.update({"MODEL_DIR": str(workdir / "models"), "GUNICORN_ACCESS_LOG": "", "TORCH_THREADS": "1",
                    "OMP_NUM_THREADS": "1", "INFERENCE_BACKEND": "torch", "LOG_LEVEL": "WARNING",
                    "PYTHONPATH": str(REPO), **(env_extra or {})})
        if entry == "serve":
            command = [sys.executable, "-m", "yolo_backend", "serve", "--host", self.host, "--port", str(self.port)]
        elif entry == "gunicorn":
            command = [sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py"), "--chdir", str(REPO),
                       "--bind", f"{self.host}:{self.port}", "_wsgi:app"]
        else:
            command = [sys.executable, str(REPO / "_wsgi.py"), "--host", self.host, "--port", str(self.port)]
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if get(self.host, self.port, "/health", 2)[0] == 200:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"no /health answer within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def warm_up(self) -> float:
        """/setup and one /predict, so the measured /predict does not build the model; its seconds."""
        status, _ = get(self.host, self.port, "/setup", 60, {"project": PROJECT, "schema": CONFIG})
        if status != 200:
            raise RuntimeError(f"/setup answered {status}:\n{self.log()[-3000:]}")
        status, _ = timed_predict(self.host, self.port)
        if status != 200:
            raise RuntimeError(f"the warm-up /predict answered {status}:\n{self.log()[-3000:]}")
        return timed_predict(self.host, self.port)[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# --- one run --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    mode: str
    sockets: int
    seconds: float
    held_min: int
    health: dict
    predict_status: Optional[int]
    predict_s: float
    closed_by_server: int
    median_lifetime_s: Optional[float]
    replies: list

    def passed(self) -> bool:
        return (self.health["failures"] == 0 and self.health["p99"] is not None and self.health["p99"] < 1.0
                and self.predict_status == 200)


def attack(server: Server, mode: str, sockets: int, seconds: float, interval: float,
           predict_after: float = 5.0) -> Result:
    held_min = sockets
    with SlowSockets(server.host, server.port, sockets, mode, interval) as slow:
        wait_until = time.monotonic() + 10
        while slow.held < sockets and time.monotonic() < wait_until:
            time.sleep(0.1)
        started = time.monotonic()
        with HealthProbe(server.host, server.port) as probe:
            predict: dict = {}

            def run_predict():
                time.sleep(predict_after)
                predict["status"], predict["seconds"] = timed_predict(server.host, server.port,
                                                                      timeout=max(30.0, seconds))
            thread = threading.Thread(target=run_predict, daemon=True)
            thread.start()
            while time.monotonic() - started < seconds:
                time.sleep(0.5)
                held_min = min(held_min, slow.held)
            thread.join(max(30.0, seconds) + 10)
        lifetimes = slow.lifetimes
        return Result(mode, sockets, seconds, held_min, probe.summary(), predict.get("status"),
                      predict.get("seconds", float("nan")), slow.closed_by_server,
                      statistics.median(lifetimes) if lifetimes else None, slow.replies[:3])


def fmt(value: Optional[float], unit: str = " s") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


def table(label: str, results: list[Result], idle_predict_s: float) -> str:
    lines = [f"server: {label}; /predict of one task with no slow sockets: {idle_predict_s:.2f} s", "",
             "| mode | slow sockets | seconds | /health asked | failed | p50 | p99 | max | /predict | "
             "closed by server | median socket life |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        h = r.health
        answer = f"{r.predict_status} in {r.predict_s:.2f} s" if r.predict_status else "no answer"
        lines.append(f"| {r.mode} | {r.sockets} | {r.seconds:.0f} | {h['asked']} | {h['failures']} | {fmt(h['p50'])} "
                     f"| {fmt(h['p99'])} | {fmt(h['max'])} | {answer} | {r.closed_by_server} | "
                     f"{fmt(r.median_lifetime_s)} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entry", choices=("serve", "gunicorn", "classic"), default="serve")
    parser.add_argument("--worker-class", default=None,
                        help="gunicorn worker class instead of gunicorn.conf.py's (e.g. gthread), for contrast")
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between two dribbled header bytes")
    parser.add_argument("--modes", default="dribble,body")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="extra server environment")
    args = parser.parse_args(argv)

    env = dict(pair.split("=", 1) for pair in args.env)
    if args.worker_class:
        env["GUNICORN_CMD_ARGS"] = f"--worker-class {args.worker_class}"
    label = args.entry + (f" (gunicorn --worker-class {args.worker_class})" if args.worker_class else "")
    if args.env:
        label += " with " + " ".join(args.env)
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as tmp:
        server = Server(args.entry, Path(tmp), env)
        try:
            server.wait_healthy()
            idle_predict_s = server.warm_up()
            results = []
            for mode in args.modes.split(","):
                results.append(attack(server, mode, args.sockets, args.seconds, args.interval))
                time.sleep(2)  # let the server close what is left before the next mode
        finally:
            server.stop()
    print(table(label, results, idle_predict_s))
    for r in results:
        if r.replies:
            print(f"{r.mode}: the server's first words to a closed slow socket: {r.replies[0][:80]!r}")
    return 0 if all(r.passed() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
