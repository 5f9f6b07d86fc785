"""The RQ entry points of pool scoring and queueing a run (the waiting-slot rule of ``jobs.slots``)."""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Optional

from ...settings import Settings
from .run import score_chunk, score_project
from ..states import JobPhase, plain

log = logging.getLogger(__name__)

COORDINATOR_FUNCTION = "yolo_backend.jobs.pool.run_pool_job"
COORDINATOR_TIMEOUT_S = 3600


def run_pool_job(project_id: int, reason: str = "requested", options: Optional[dict] = None) -> dict:
    """RQ job: coordinate a pool-scoring run of the project (``score_project``)."""
    from rq import get_current_job

    from ..keys import Keys
    from ..slots import SlotKind, WaitingSlots

    job = get_current_job()
    settings = Settings.from_env()
    options = options or {}
    if job is not None:  # from now on a request queues a new run (this one plans after it)
        slots = WaitingSlots(job.connection, Keys(job.origin), SlotKind.POOL)
        ticket, replaced_by = slots.take(int(project_id), job.id)
        if ticket is None:
            log.info("pool scoring job %s of project %s does not run: job %s took its place", job.id, project_id,
                     replaced_by)
            return {"project": int(project_id), "scored": False, "status": "superseded", "superseded_by": replaced_by}
        slots.release(int(project_id), job.id)
    return score_project(settings, int(project_id), reason, connection=job.connection if job else None,
                         queue_name=job.origin if job else None, job_id=job.id if job else None,
                         force=bool(options.get("force")), reply_stored=int(options.get("reply_stored", 0)))


def run_pool_chunk(project_id: int, version: str, tasks: list[dict], stale: dict, label_config: Optional[str],
                   options: Optional[dict] = None) -> dict:
    """RQ job: score and store one chunk of a run (``score_chunk``). ``options``: none are read (kept so chunks
    queued by an earlier version of the backend still run)."""
    from rq import get_current_job

    job = get_current_job()
    settings = Settings.from_env()

    def progress(event: dict) -> None:
        if job is not None:
            job.meta.update({k: plain(v) for k, v in event.items()})
            with contextlib.suppress(Exception):
                job.save_meta()

    return score_chunk(settings, int(project_id), version, tasks, stale, label_config,
                       connection=job.connection if job else None, queue_name=job.origin if job else None,
                       progress=progress)


def enqueue_pool_run(connection, queue_name: str, project_id: int, reason: str, max_waiting: int,
                     options: Optional[dict] = None) -> dict:
    """Queue a coordinator for the project unless one is already waiting (the request joins it). RequestRefused
    (429) when ``max_waiting`` projects already have one waiting, so made-up project ids cannot fill the queue. The
    decision is the training queue's (slots.py), on the pool's own slots."""
    from rq import Queue

    from ..keys import Keys
    from ..slots import SlotKind, WaitingSlots

    def create(job_id: str) -> None:
        Queue(queue_name, connection=connection).enqueue(
            COORDINATOR_FUNCTION, project_id, reason, options or {}, job_id=job_id,
            job_timeout=COORDINATOR_TIMEOUT_S, result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600,
            description=f"score the pool of project {project_id} ({reason})",
            meta={"project": project_id, "kind": "pool", "phase": JobPhase.QUEUED.value, "reason": reason})

    joined = WaitingSlots(connection, Keys(queue_name), SlotKind.POOL).request(
        project_id, max_waiting, create, lambda: f"pool-{project_id}-{uuid.uuid4().hex[:12]}")
    if joined.status == "queued":
        log.info("pool scoring of project %s queued as job %s (%s)", project_id, joined.job, reason)
    return {"job": joined.job, "status": joined.status, "project": project_id}
