"""The named states of the back half, one home each: what a job is doing (``JobPhase``), how a training run ended
(``RunOutcome``) and where a pool-scoring run is (``PoolState``). ``str`` Enums (as rq's ``JobStatus``): they compare
equal to the words stored in RQ job meta, the run history and Redis, so what is stored stays plain text.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class JobPhase(str, Enum):
    """A job's ``phase`` (RQ job meta; /job_status, /status and the dashboard read it)."""

    QUEUED = "queued"
    STARTED = "started"
    WAITING = "waiting"                          # for the project's lock (another job of it trains)
    READING_ANNOTATIONS = "reading annotations"
    DOWNLOADING = "downloading"
    MEASURING = "measuring"                      # the start model's serving size, before the first training
    PREPARING = "preparing"
    TRAINING = "training"
    EVALUATING = "evaluating"
    TRAINED = "trained"
    PUBLISHING = "publishing"
    SYNCING = "syncing label studio"
    SCORING = "scoring"                          # a pool-scoring chunk
    SUPERSEDED = "superseded"                    # replaced by another job before it ran
    DONE = "done"
    FAILED = "failed"


class RunOutcome(str, Enum):
    """How a training run ended (the project's run history, the dashboard, /prometheus)."""

    PUBLISHED = "published"
    REJECTED = "rejected"
    SKIPPED = "skipped"
    FAILED = "failed"
    WAITING = "waiting"                          # fewer annotations than MIN_ANNOTATIONS_FIRST_TRAINING yet


class PoolState(str, Enum):
    """Where a project's pool-scoring run is (its progress hash in Redis)."""

    SCORING = "scoring"
    DONE = "done"
    FAILED = "failed"


def plain(value: Any) -> Any:
    """A state as the plain string stored (RQ pickles job meta: an Enum there would need this module to unpickle)."""
    return value.value if isinstance(value, Enum) else value
