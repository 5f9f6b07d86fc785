"""Small Linux process helpers for ``serve``: children in their own sessions that die with their parent, the
process tree below a PID (from /proc), reaping re-parented orphans, and killing a tree by PID."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("yolo_backend.serve")

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # not Linux
        return False


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `serve` itself is killed (SIGKILL leaves it no other chance)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty where /proc is missing)."""
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not (name.isascii() and name.isdigit()):
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree."""
    found, frontier = [], [pid]
    while frontier:
        for child in children_of(frontier.pop()):
            if child not in found:
                found.append(child)
                frontier.append(child)
    return found


def reap(keep: set) -> None:
    """Collect exited processes that were re-parented to us (we are a subreaper), so none stays a zombie. Our own
    children (``keep``: their Popen objects collect them, with their exit codes) are left alone."""
    for pid in children_of(os.getpid()):
        if pid in keep:
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


class Child:
    """One supervised child process, in its own session, output to our stdout/stderr."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path):
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.proc: Optional[subprocess.Popen] = None
        self.started_at = 0.0

    def start(self) -> "Child":
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv[1:]))
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.returncode if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:  # running()
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        """True when the child has exited within ``timeout`` seconds."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill_tree(self) -> None:
        """SIGKILL the child and everything below it (by PID: only processes we started)."""
        if self.proc is None or self.proc.poll() is not None:
            return  # reaped: its PID may belong to someone else now (leftovers are our orphans, killed by PID)
        for pid in descendants(self.proc.pid) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.wait(5.0)
