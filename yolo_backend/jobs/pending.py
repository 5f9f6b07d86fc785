"""Training requests kept on disk while Redis cannot take them (down, or refusing writes).

Label Studio never resends a webhook, so a request that Redis cannot take is written to ``MODEL_DIR/pending/
project-<id>.json`` (one file per project: a burst coalesces there too) and queued when Redis answers again. Files
are claimed by renaming them, so several server processes never queue one twice. When even the file cannot be
written (a full disk), the request is refused with 503 and a message saying where there is no space.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable

from ..atomic import atomic_write
from ..errors import RequestRefused

log = logging.getLogger(__name__)


class PendingRequests:
    """The pending folder: record, list and flush the saved requests."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, project_id: int) -> Path:
        return self.folder / f"project-{int(project_id)}.json"

    def record(self, project_id: int, info: dict, exc: BaseException) -> Path:
        """Save (or count into) the project's pending request; RequestRefused (503) when it cannot be written."""
        path = self.path(project_id)
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        record = {"project": project_id, "event": info["event"], "source": info["source"],
                  "first_requested_at": previous.get("first_requested_at", info["requested_at"]),
                  "last_requested_at": info["requested_at"], "requests": int(previous.get("requests", 0)) + 1}
        try:
            with atomic_write(path, "w") as f:
                json.dump(record, f)
        except OSError as write_error:
            why = (f"no space left on device in {self.folder}" if write_error.errno == errno.ENOSPC
                   else f"{path} cannot be written ({write_error})")
            raise RequestRefused(503, f"the training request for project {project_id} cannot be kept: Redis "
                                      f"cannot take it ({exc}) and {why}; free space or fix MODEL_DIR, then "
                                      "press Start Training in Label Studio") from None
        return path

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

    def flush(self, enqueue: Callable[[int, dict], None]) -> int:
        """``enqueue(project_id, info)`` each saved request, oldest file first; returns how many were queued. An
        error from ``enqueue`` (Redis still away) leaves that file in place and is raised."""
        try:
            paths = sorted(self.folder.glob("project-*.json"))
        except OSError:
            return 0
        done = 0
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
                log.error("unreadable pending training request %s (%s): removed", claim, exc)
                claim.unlink(missing_ok=True)
                continue
            try:
                enqueue(project_id, {"event": record.get("event", "START_TRAINING"), "source": "pending",
                                     "requested_at": record.get("last_requested_at", time.time())})
            except RequestRefused as exc:  # e.g. the queue is full: this one waits, the others (and the caller) go on
                log.info("saved training request for project %s stays pending: %s", project_id, exc)
                if not path.exists():
                    os.rename(claim, path)
                else:
                    claim.unlink(missing_ok=True)
                continue
            except BaseException:
                if not path.exists():
                    os.rename(claim, path)  # still pending
                else:
                    claim.unlink(missing_ok=True)  # a newer request for the project is already saved
                raise
            claim.unlink(missing_ok=True)
            done += 1
            log.info("queued the training request for project %s saved while Redis was unreachable "
                     "(%d request(s) since %s)", project_id, record.get("requests", 1),
                     time.strftime("%H:%M:%S", time.localtime(record.get("first_requested_at", time.time()))))
        return done
