"""The training worker's own stop (jobs/worker.py), against a real Redis-protocol server."""

from __future__ import annotations

import threading
import time

from redis import Redis
from rq import Queue

from yolo_backend.jobs.worker import SimpleTrainingWorker, TrainingWorker
from tests.support import wait_for


def test_worker_stop_does_not_wait_a_minute_for_its_pubsub_thread(redis_server):
    """RQ 3.0 sends UNSUBSCRIBE before it tells its pubsub thread to end; a thread that reads the reply first
    (a busy machine) waits 60 s for a new subscription, and redis-py 8 waits for the thread. Forced here: the
    stopping thread goes on only once the pubsub thread has read the reply."""
    connection = Redis.from_url(redis_server.url)
    for worker_class in (TrainingWorker, SimpleTrainingWorker):
        assert_unsubscribe_is_quick(worker_class([Queue("stop-test", connection=connection)], connection=connection))
    connection.close()


def assert_unsubscribe_is_quick(worker):
    worker.subscribe()
    pubsub, thread = worker.pubsub, worker.pubsub_thread
    wait_for(lambda: pubsub.subscribed, 5, "the worker did not subscribe")
    send = pubsub.unsubscribe

    def unsubscribe_then_let_the_reader_run(*args):
        result = send(*args)
        wait_for(lambda: not pubsub.subscribed, 5, "the pubsub thread did not read the UNSUBSCRIBE reply")
        return result

    pubsub.unsubscribe = unsubscribe_then_let_the_reader_run
    stopping = threading.Thread(target=worker.unsubscribe, daemon=True)
    began = time.monotonic()
    stopping.start()
    stopping.join(15)
    assert not stopping.is_alive(), f"{type(worker).__name__}.unsubscribe hangs"
    assert time.monotonic() - began < 5
    wait_for(lambda: not thread.is_alive(), 5, "the pubsub thread still runs")
