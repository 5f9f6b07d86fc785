"""The RQ worker that runs training jobs: ``python -m yolo_backend worker``.

A plain ``rq worker -u $REDIS_URL $RQ_QUEUE_NAME`` (started in the repository root) works as well: the job
function is ``yolo_backend.jobs.job.run_training_job``; it lacks the bounded stop below.

The default worker forks a work horse per job, so each training runs in a fresh process: CUDA is initialised
inside the job (never before a fork), and a horse killed mid-training is reported failed by the worker. This
process imports no torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from redis.exceptions import RedisError
from rq import SimpleWorker, Worker

from ..settings import Settings, mask_password

log = logging.getLogger(__name__)

# How long a stopping worker waits for its pubsub thread (which listens for `rq` commands) to end. The thread is
# a daemon: if it has not ended by then, the process exits without it.
PUBSUB_STOP_WAIT_S = 1.0


# The mixin's methods use the worker's attributes: for the type checker it is a Worker.
if TYPE_CHECKING:
    _WorkerBase = Worker
else:
    _WorkerBase = object


class BoundedUnsubscribe(_WorkerBase):
    """RQ's worker, with a stop that cannot hang in its pubsub thread.

    RQ 3.0 ends that thread by sending UNSUBSCRIBE and only then clearing the thread's run flag. When the thread
    reads the reply before the flag is cleared (likely on a busy machine), it goes round again and waits up to
    60 s for a new subscription, and redis-py 8's ``PubSubWorkerThread.stop()`` waits for the thread with no time
    limit: the worker hung a minute after its cold shutdown, and `serve` killed it after STOP_TIMEOUT_S. Here the
    flag is cleared first, so the reply ends the thread, and the wait for it is bounded."""

    def unsubscribe(self) -> None:
        thread, self.pubsub_thread = self.pubsub_thread, None
        if thread is None:
            return
        self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
        try:
            thread.stop(timeout=0)  # redis-py >= 8: clears the run flag, waits 0 s
        except TypeError:
            thread.stop()  # redis-py 5-7: only clears the run flag
        try:
            self.pubsub.unsubscribe()  # its reply wakes the thread, which now sees the flag and ends
        except RedisError as exc:  # the broker is gone: the thread ends on its own connection error
            self.log.debug("Worker %s: could not unsubscribe (%s)", self.name, exc)
        thread.join(PUBSUB_STOP_WAIT_S)  # the thread closes the pubsub connection as it ends


class TrainingWorker(BoundedUnsubscribe, Worker):
    """One forked work horse per job."""


class SimpleTrainingWorker(BoundedUnsubscribe, SimpleWorker):
    """Jobs in the worker process itself."""


def run_worker(settings: Settings, redis_url: Optional[str] = None, queue_name: Optional[str] = None,
               burst: bool = False, simple: bool = False, name: Optional[str] = None,
               max_jobs: Optional[int] = None) -> bool:
    """Work on the training queue until stopped (or, with ``burst``, until it is empty). Returns whether any job
    ran. ``simple`` runs jobs in this process (no fork; for debugging)."""
    from redis import Redis
    from rq import Queue

    url = redis_url or settings.effective_redis_url
    queue_name = queue_name or settings.rq_queue_name
    connection = Redis.from_url(url)
    try:
        connection.ping()
    except Exception as exc:
        raise ConnectionError(f"cannot reach Redis at {mask_password(url)} ({exc}); start Redis or set REDIS_URL "
                              "(or REDIS_HOST / REDIS_PORT)") from None
    queue = Queue(queue_name, connection=connection)
    worker_class = SimpleTrainingWorker if simple else TrainingWorker
    worker = worker_class([queue], connection=connection, name=name)
    log.info("training worker %s on queue %r at %s (%s)", worker.name, queue_name, mask_password(url),
             "in-process jobs" if simple else "one forked process per job")
    return worker.work(burst=burst, logging_level=settings.log_level.upper(), max_jobs=max_jobs,
                       with_scheduler=False)
