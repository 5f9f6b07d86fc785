"""A pool-scoring run's progress in Redis (done, failed, total, chunks, rate, ETA) and the run waiting to start:
what /status, the dashboard and /prometheus read."""

from __future__ import annotations

import logging
import re
import time
from datetime import timezone
from typing import Any, Optional

from ..keys import job_status_of, text
from ..states import PoolState

log = logging.getLogger(__name__)


class RunStatus:
    """The project's pool-scoring progress hash (no-op without a Redis connection)."""

    def __init__(self, connection, keys, project_id: int):
        self.connection, self.keys, self.project_id = connection, keys, project_id
        self.key = keys.pool(project_id) if keys else None

    def read(self) -> dict:
        if self.connection is None:
            return {}
        return _read_run(self.connection, self.keys, self.project_id)

    def start(self, version: str, total: int, done: int, reason: str, job_id: Optional[str]) -> None:
        if self.connection is None:
            return
        now = time.time()
        pipe = self.connection.pipeline()
        pipe.delete(self.key)
        pipe.hset(self.key, mapping={"version": version, "total": total, "done": done, "done_at_start": done,
                                     "failed": 0, "chunks": 0, "chunks_done": 0, "state": PoolState.SCORING.value,
                                     "reason": reason, "job": job_id or "", "started_at": now, "updated_at": now})
        pipe.execute()

    def set_chunks(self, chunks: int) -> None:
        if self.connection is not None:
            self.connection.hset(self.key, mapping={"chunks": chunks, "updated_at": time.time()})

    def add(self, version: str, stored: int = 0, failed: int = 0, chunk_done: bool = False) -> bool:
        """Count stored/failed tasks (and a finished chunk); True when this call completed the run."""
        if self.connection is None or text(self.connection.hget(self.key, "version")) != version:
            return False
        pipe = self.connection.pipeline()
        pipe.hincrby(self.key, "done", stored)
        pipe.hincrby(self.key, "failed", failed)
        if chunk_done:
            pipe.hincrby(self.key, "chunks_done", 1)
        pipe.hset(self.key, "updated_at", time.time())
        pipe.execute()
        return self.finish_if_complete() if chunk_done else False

    def finish_if_complete(self) -> bool:
        """True for the one caller that sees the run complete (every chunk done, the coordinator finished): it
        sweeps up after the run and then calls ``done()``."""
        status = self.read()
        if status.get("state") == PoolState.SCORING and status.get("chunks_done", 0) >= status.get("chunks", 0) and \
                status.get("coordinated"):
            return bool(self.connection.hsetnx(self.key, "finished_at", time.time()))  # one caller only
        return False

    def done(self) -> None:
        """The run is over (after the sweep): what /status, the dashboard and waiting clients see."""
        if self.connection is None:
            return
        self.connection.hset(self.key, "state", PoolState.DONE.value)
        status = self.read()
        log.info("project %s: pool scoring with %s done: %d of %d task(s) have a prediction, %d failed",
                 self.project_id, status.get("version"), status.get("done", 0), status.get("total", 0),
                 status.get("failed", 0))

    def coordinated(self) -> bool:
        """The coordinator queued every chunk: the run is complete when they are. True when it is now (without
        Redis: always, the run went through every chunk in process)."""
        if self.connection is None:
            return True
        self.connection.hset(self.key, "coordinated", 1)
        return self.finish_if_complete()

    def fail(self, message: str) -> None:
        if self.connection is not None:
            self.connection.hset(self.key, mapping={"state": PoolState.FAILED.value, "error": message[:500],
                                                    "updated_at": time.time()})


def read_status(connection, keys, project_id: int) -> dict:
    """The project's pool-scoring progress: version, state (scoring, done, failed), total, done, failed, chunks,
    chunks_done, rate (tasks/s this run), eta_s, started_at, updated_at, and ``queued`` (``queued_run``) while
    the next run's coordinator waits in the queue; {} when it never ran and none waits."""
    status = _read_run(connection, keys, project_id)
    queued = queued_run(connection, keys, project_id)
    return {**status, "queued": queued} if queued else status


def queued_run(connection, keys, project_id: int) -> Optional[dict]:
    """The coordinator job waiting in the queue (not started: the progress hash still holds the run before it):
    {"job", "reason", "version" (of a "published <version>" reason, else None), "enqueued_at"}; None if none."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from ..slots import NOT_STARTED, SlotKind, WaitingSlots

    job_id = WaitingSlots(connection, keys, SlotKind.POOL).job(project_id)
    if not job_id:
        return None
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return None
    if job_status_of(job) not in NOT_STARTED:
        return None  # started: it deletes the key itself in a moment
    reason = str((job.meta or {}).get("reason") or "")
    published = re.fullmatch(r"published (\S+)", reason)
    enqueued = job.enqueued_at.replace(tzinfo=job.enqueued_at.tzinfo or timezone.utc).timestamp() \
        if job.enqueued_at else None  # rq writes UTC
    return {"job": job_id, "reason": reason, "version": published.group(1) if published else None,
            "enqueued_at": enqueued}


def _read_run(connection, keys, project_id: int) -> dict:
    """The progress hash of the project's newest run (``read_status`` without the queued one)."""
    raw = connection.hgetall(keys.pool(project_id))
    if not raw:
        return {}
    status: dict[str, Any] = {}
    for k, v in raw.items():
        k, v = text(k), text(v)
        if k in ("total", "done", "failed", "chunks", "chunks_done", "done_at_start", "coordinated"):
            status[k] = int(float(v))
        elif k in ("started_at", "updated_at", "finished_at"):
            status[k] = float(v)
        else:
            status[k] = v
    end = status.get("finished_at") or time.time()
    elapsed = max(1e-6, end - status.get("started_at", end))
    scored = status.get("done", 0) - status.get("done_at_start", 0) + status.get("failed", 0)
    status["rate"] = round(scored / elapsed, 3) if scored > 0 else 0.0
    left = max(0, status.get("total", 0) - status.get("done", 0) - status.get("failed", 0))
    status["left"] = left
    scoring = status["rate"] > 0 and status.get("state") == PoolState.SCORING
    status["eta_s"] = round(left / status["rate"], 1) if scoring \
        else None
    return status
