"""The RQ worker that runs training jobs: ``python -m yolo_backend worker``.

A plain ``rq worker -u $REDIS_URL $RQ_QUEUE_NAME`` (started in the repository root) works as well: the job
function is ``yolo_backend.jobs.job.run_training_job``.

The default worker forks a work horse per job, so each training runs in a fresh process: CUDA is initialised
inside the job (never before a fork), and a horse killed mid-training is reported failed by the worker. This
process imports no torch.
"""

from __future__ import annotations

import logging
from typing import Optional

from ..settings import Settings, mask_password

log = logging.getLogger(__name__)


def run_worker(settings: Settings, redis_url: Optional[str] = None, queue_name: Optional[str] = None,
               burst: bool = False, simple: bool = False, name: Optional[str] = None,
               max_jobs: Optional[int] = None) -> bool:
    """Work on the training queue until stopped (or, with ``burst``, until it is empty). Returns whether any job
    ran. ``simple`` runs jobs in this process (no fork; for debugging)."""
    from redis import Redis
    from rq import Queue, SimpleWorker, Worker

    url = redis_url or settings.effective_redis_url
    queue_name = queue_name or settings.rq_queue_name
    connection = Redis.from_url(url)
    try:
        connection.ping()
    except Exception as exc:
        raise ConnectionError(f"cannot reach Redis at {mask_password(url)} ({exc}); start Redis or set REDIS_URL "
                              "(or REDIS_HOST / REDIS_PORT)") from None
    queue = Queue(queue_name, connection=connection)
    worker_class = SimpleWorker if simple else Worker
    worker = worker_class([queue], connection=connection, name=name)
    log.info("training worker %s on queue %r at %s (%s)", worker.name, queue_name, mask_password(url),
             "in-process jobs" if simple else "one forked process per job")
    return worker.work(burst=burst, logging_level=settings.log_level.upper(), max_jobs=max_jobs,
                       with_scheduler=False)
