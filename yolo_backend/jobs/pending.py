"""Training requests kept on disk while Redis cannot take them (down, or refusing writes).

Label Studio never resends a webhook, so a request that Redis cannot take is written to ``MODEL_DIR/pending/
project-<id>.json`` (one file per project: a burst coalesces there too) and queued when Redis answers again. Files
are claimed by renaming them, so several server processes never queue one twice.

Bounded, since anyone who can reach the webhook can make up project ids: at most ``max_projects`` files (the
queue's MAX_QUEUED_PROJECTS: more could not be queued anyway) and PENDING_MAX_BYTES in all; a request for another
project beyond that is refused with 503 (checked and written under a lock on the folder, so server processes
together stay within it). When even the file cannot be written (a full disk), the request is refused with 503 and a
message saying where there is no space. A flush reports what it queued and what stays pending (``FlushReport``),
for one log line per flush.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..atomic import atomic_write
from ..errors import RequestRefused

log = logging.getLogger(__name__)

PENDING_MAX_BYTES = 256 * 1024   # all pending files together (one is ~200 bytes)
SHOWN_CHARS = 100                # of a request's strings kept in its file
SHOWN_PROJECTS = 10              # project ids named in a summary line


@dataclass
class FlushReport:
    """One flush: projects queued (and the requests they covered), projects kept (refused: status and message),
    unreadable files removed, and the error that stopped it (Redis away again)."""

    queued: list[int] = field(default_factory=list)
    requests: int = 0
    kept: dict[int, tuple[int, str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    error: Optional[BaseException] = None
    left: int = 0

    def news(self) -> bool:
        """Something happened that a line must say (beyond what stays pending, see ``signature``)."""
        return bool(self.queued or self.dropped)

    def signature(self) -> tuple:
        """What stays pending and why: while it does not change, a retry has nothing new to say."""
        return tuple(sorted((p, status) for p, (status, _) in self.kept.items())), \
            type(self.error).__name__ if self.error else None, self.left

    def summary(self) -> str:
        parts = [f"queued {len(self.queued)} saved training request(s)"]
        if self.queued:
            parts[0] += f" ({_projects(self.queued)}; {self.requests} trigger(s) while Redis was away)"
        for status in sorted({s for s, _ in self.kept.values()}):
            projects = [p for p, (s, _) in self.kept.items() if s == status]
            example = next(m for s, m in self.kept.values() if s == status)
            parts.append(f"{len(projects)} stay pending ({_projects(projects)}), refused with {status}: {example}")
        if self.error is not None:
            untried = max(0, self.left - len(self.kept))
            parts.append(f"{untried} stay pending: Redis is unreachable again ({type(self.error).__name__})")
        if self.dropped:
            parts.append(f"{len(self.dropped)} unreadable file(s) removed ({', '.join(self.dropped[:3])})")
        return "; ".join(parts)


def _projects(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:SHOWN_PROJECTS])
    return f"project(s) {shown}" + (f" and {len(ids) - SHOWN_PROJECTS} more" if len(ids) > SHOWN_PROJECTS else "")


class PendingRequests:
    """The pending folder: record, list and flush the saved requests."""

    def __init__(self, folder: Path, max_projects: int, max_bytes: int = PENDING_MAX_BYTES):
        self.folder = Path(folder)
        self.max_projects, self.max_bytes = int(max_projects), int(max_bytes)

    def path(self, project_id: int) -> Path:
        return self.folder / f"project-{int(project_id)}.json"

    def record(self, project_id: int, info: dict, exc: BaseException) -> Path:
        """Save (or count into) the project's pending request; RequestRefused (503) when it cannot be written or
        the folder holds as many projects (or bytes) as it may."""
        path = self.path(project_id)
        try:
            with self._locked():
                try:
                    previous = json.loads(path.read_text())
                except (OSError, ValueError):
                    previous = {}
                record = {"project": project_id, "event": str(info["event"])[:SHOWN_CHARS],
                          "source": str(info["source"])[:SHOWN_CHARS],
                          "first_requested_at": previous.get("first_requested_at", info["requested_at"]),
                          "last_requested_at": info["requested_at"], "requests": int(previous.get("requests", 0)) + 1}
                content = json.dumps(record)
                if not previous:
                    self._check_room(project_id, len(content), exc)
                with atomic_write(path, "w") as f:
                    f.write(content)
        except OSError as write_error:
            why = (f"no space left on device in {self.folder}" if write_error.errno == errno.ENOSPC
                   else f"{path} cannot be written ({write_error})")
            raise RequestRefused(503, f"the training request for project {project_id} cannot be kept: Redis "
                                      f"cannot take it ({exc}) and {why}; free space or fix MODEL_DIR, then "
                                      "press Start Training in Label Studio") from None
        return path

    def _check_room(self, project_id: int, size: int, exc: BaseException) -> None:
        files = self._files()
        projects = {p.name.split(".json", 1)[0] for p in files}
        if self.path(project_id).stem in projects:
            return  # kept already (a flush has its file claimed right now)
        used = sum(_size(p) for p in files)
        if len(projects) >= self.max_projects or used + size > self.max_bytes:
            limit = (f"{len(projects)} projects already have a request kept in {self.folder} (the most the queue "
                     "takes: MAX_QUEUED_PROJECTS)" if len(projects) >= self.max_projects
                     else f"{self.folder} holds {used} bytes of kept requests (at most {self.max_bytes})")
            raise RequestRefused(503, f"the training request for project {project_id} is refused: Redis cannot take "
                                      f"it ({exc}) and {limit}; start Redis (REDIS_URL), then press Start Training "
                                      "in Label Studio")

    def _files(self) -> list[Path]:
        """Pending files, claimed ones included (a failed flush puts them back)."""
        return [p for p in self.folder.glob("project-*.json*") if p.name.endswith(".json") or ".json.claim-" in p.name]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Every server process records under one lock on the folder: the bounds hold across processes."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def records(self) -> list[dict]:
        records = []
        for path in sorted(self.folder.glob("project-*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return records

    def any(self) -> bool:
        return any(self.folder.glob("project-*.json"))

    def flush(self, enqueue: Callable[[int, dict], None]) -> FlushReport:
        """``enqueue(project_id, info)`` each saved request, the least recently written first. A refused one
        (RequestRefused: the queue is full) stays pending and the others go on; any other error (Redis away again)
        leaves that file in place and stops the flush (``FlushReport.error``)."""
        report = FlushReport()
        try:
            paths = sorted(self.folder.glob("project-*.json"), key=_mtime)
        except OSError:
            return report
        for path in paths:
            claim = path.with_name(f"{path.name}.claim-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, claim)
            except OSError:
                continue  # another process claimed it
            try:
                record = json.loads(claim.read_text())
                project_id = int(record["project"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                report.dropped.append(f"{claim.name}: {str(exc)[:SHOWN_CHARS]}")
                claim.unlink(missing_ok=True)
                continue
            try:
                enqueue(project_id, {"event": record.get("event", "START_TRAINING"), "source": "pending",
                                     "requested_at": record.get("last_requested_at", time.time())})
            except Exception as exc:
                _put_back(claim, path)
                if not isinstance(exc, RequestRefused):
                    report.error = exc
                    break
                report.kept[project_id] = (exc.status, str(exc)[:2 * SHOWN_CHARS])
                continue
            claim.unlink(missing_ok=True)
            report.queued.append(project_id)
            report.requests += int(record.get("requests", 1))
        report.left = len(self.records()) if report.error is not None or report.kept else 0
        return report


def _put_back(claim: Path, path: Path) -> None:
    """Still pending: back under its name, unless a newer request for the project is already saved there."""
    if not path.exists():
        os.rename(claim, path)
    else:
        claim.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
