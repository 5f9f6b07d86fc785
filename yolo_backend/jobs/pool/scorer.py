"""Scoring and storing one project's tasks with the version serving it (shared by the coordinator and the chunk
jobs): claims in Redis, the Predictor's items and embeddings, one POST per task, stale predictions deleted."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

from ...settings import Settings
from .. import TrainingError
from .plan import stale_of_done_tasks
from .progress import RunStatus

log = logging.getLogger(__name__)

POST_THREADS = 4             # prediction POSTs at once (Label Studio has no bulk call that keeps `cluster`)
SLICE = 16                   # tasks scored and stored at a time inside a chunk (memory bound, progress grain)
NO_IMAGE_CLUSTER = -1        # a task whose data has no image field: stored with an empty result in its own cluster
STORED_TTL_S = 7 * 24 * 3600
STORED_POLL_S = 3


def is_video_project(label_config: Optional[str]) -> bool:
    """Whether the project's tasks are clips (its config is a video object tracking one)."""
    from ...labelstudio.config import LabelConfigError, parse_label_config
    from ...labelstudio.video_controls import is_video_config

    try:
        return bool(label_config) and is_video_config(parse_label_config(label_config or ""))
    except LabelConfigError:
        return False


def chunk_size(settings: Settings, video: bool) -> int:
    """Tasks per chunk job: POOL_VIDEO_CHUNK_SIZE clips in a video project (a clip costs hundreds of detector
    passes), else POOL_CHUNK_SIZE images."""
    return max(1, settings.pool_video_chunk_size if video else settings.pool_chunk_size)


class PoolScorer:
    """Scores and stores tasks of one project with the version serving it (shared by coordinator and chunks)."""

    def __init__(self, settings: Settings, project_id: int, label_config: Optional[str] = None, connection=None,
                 keys=None):
        from ...predictor import Predictor
        from ...runtime import BackendContext

        self.settings, self.project_id = settings, int(project_id)
        self.context = BackendContext.from_settings(settings)
        client = self.context.client()
        if client is None:
            raise TrainingError("pool scoring stores predictions through the Label Studio API: set LABEL_STUDIO_URL "
                                "and LABEL_STUDIO_API_KEY (a personal access token or legacy token) for the worker")
        self.client = client
        self.context.connection.require(self.project_id)  # ProjectNotConnected: nothing is read or written there
        if label_config is None:
            label_config = self.client.get_project(self.project_id).get("label_config")
        self.label_config = label_config
        self.video = is_video_project(label_config)  # its tasks are clips
        self.predictor = Predictor(self.context)
        self.connection, self.keys = connection, keys
        self.status = RunStatus(connection, keys, self.project_id)

    @property
    def chunk_size(self) -> int:
        return chunk_size(self.settings, self.video)

    def serving_version(self) -> str:
        """The version serving the project now (the server's rule, ``model_holder``), without loading it."""
        version = self.predictor.version(self.project_id, self.label_config)
        if not version:
            raise TrainingError(f"project {self.project_id} has no model to score with: set MODEL_PATH or train")
        return version

    def ours(self, version: str) -> set[str]:
        """The versions whose predictions are the backend's own in this project (``history.served_versions``)."""
        from ...yolov7.untrained import UNTRAINED_VERSION
        from ..history import served_versions

        return served_versions(self.settings.model_dir, self.project_id) | {version, UNTRAINED_VERSION}

    def claim(self, version: str, tasks: list[dict]) -> list[dict]:
        """The tasks no other chunk of this version has taken (all of them without Redis)."""
        if self.connection is None:
            return tasks
        key = self.keys.pool_stored(self.project_id, version)
        pipe = self.connection.pipeline()
        for task in tasks:
            pipe.sadd(key, int(task["id"]))
        pipe.expire(key, STORED_TTL_S)
        taken = pipe.execute()[:-1]
        return [task for task, new in zip(tasks, taken) if new]

    def unclaim(self, version: str, task_ids: list[int]) -> None:
        if self.connection is not None and task_ids:
            self.connection.srem(self.keys.pool_stored(self.project_id, version), *task_ids)

    def score(self, version: str, tasks: list[dict]) -> list[tuple[dict, dict, Optional[np.ndarray]]]:
        """(task, prediction, embedding) per task, scored by ``version`` (TrainingError when another serves now)."""
        scored_version, scored = self.predictor.score(self.project_id, self.label_config, tasks)
        if scored_version != version:
            raise Superseded(scored_version)
        return [(task, one.item, one.embedding) for task, one in zip(tasks, scored)]

    def store(self, version: str, scored: list[tuple[dict, dict, Optional[np.ndarray]]], centroids: np.ndarray,
              stale: dict) -> tuple[int, int]:
        """Store one prediction per scored task (with its cluster) and delete its stale ones; (stored, failed)."""
        from ...clusters import assign_clusters
        from ...labelstudio.client import LabelStudioAuthError

        embedded = [(i, e) for i, (_, _, e) in enumerate(scored) if e is not None]
        rows = [i for i, _ in embedded]
        clusters: dict[int, int] = {}
        if rows:
            found = assign_clusters(np.stack([e for _, e in embedded]).astype(np.float32), centroids)
            clusters = {i: int(c) for i, c in zip(rows, found)}

        def post(i: int) -> bool:
            task, prediction, _ = scored[i]
            if "result" not in prediction:  # the image could not be had: left for the next run
                return False
            cluster = clusters.get(i, NO_IMAGE_CLUSTER)
            try:
                self.client.create_prediction(task["id"], prediction["result"], prediction.get("score"), version,
                                              cluster=cluster)
                for old in stale.get(int(task["id"]), []):
                    self.client.delete_prediction(old)
            except LabelStudioAuthError:
                raise
            except Exception as exc:  # one task's failure must not lose the others
                log.warning("project %s: could not store the prediction of task %s: %s", self.project_id,
                            task["id"], exc)
                return False
            return True

        with ThreadPoolExecutor(max_workers=POST_THREADS, thread_name_prefix="pool-post") as pool:
            outcome = list(pool.map(post, range(len(scored))))
        self.unclaim(version, [int(scored[i][0]["id"]) for i, ok in enumerate(outcome) if not ok])
        stored = sum(outcome)
        return stored, len(outcome) - stored

    def sweep(self, version: str) -> int:
        """After a finished run: delete the stale predictions of tasks that have theirs (``stale_of_done_tasks``),
        so every task ends with exactly one prediction of the version. Returns how many went."""
        try:
            stale = stale_of_done_tasks(self.client.predictions(self.project_id), version,
                                        self.settings.keep_old_predictions, self.ours(version))
            for prediction_id in stale:
                self.client.delete_prediction(prediction_id)
        except Exception as exc:  # the next run deletes them; the predictions stored are what counts
            log.warning("project %s: could not delete stale predictions after pool scoring with %s: %s",
                        self.project_id, version, exc)
            return 0
        if stale:
            log.info("project %s: deleted %d stale prediction(s) stored while pool scoring with %s ran",
                     self.project_id, len(stale), version)
        return len(stale)

    def finish_run(self, version: str, sweep: bool = True) -> int:
        """For the one job that completed the run: sweep (``sweep``), then mark the run done. Returns the swept."""
        swept = self.sweep(version) if sweep else 0
        self.status.done()
        return swept

    def wait_for_stored(self, version: str, expected: int, timeout: float) -> list[dict]:
        """Wait (at most ``timeout`` s) until Label Studio holds ``expected`` predictions of ``version``: a
        ``/predict`` reply is stored after it was sent (one by one on SQLite), and planning before would score
        its tasks again. Returns the project's predictions as last listed (the run plans on them)."""
        deadline = time.monotonic() + timeout
        while True:
            predictions = self.client.predictions(self.project_id)
            held = sum(1 for p in predictions if p.get("model_version") == version)
            if held >= expected or time.monotonic() > deadline:
                log.info("project %s: %d of the %d prediction(s) of the /predict reply are stored%s", self.project_id,
                         min(held, expected), expected, "" if held >= expected else f" after {timeout:g} s: going on")
                return predictions
            time.sleep(STORED_POLL_S)

    def score_and_store(self, version: str, tasks: list[dict], centroids: np.ndarray, stale: dict,
                        report: Callable[[int, int], object]) -> tuple[int, int]:
        """Claim, score and store ``tasks`` a slice at a time; ``report(stored, failed)`` after each slice. A slice
        is stored while the next one is scored (the POSTs wait on Label Studio, the scoring on the CPU); at most
        two slices wait to be stored, so memory stays bounded."""
        totals = [0, 0]
        waiting: list = []

        def finish(future) -> None:
            s, f = future.result()
            totals[0], totals[1] = totals[0] + s, totals[1] + f
            report(s, f)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-store") as storing:
            try:
                for start in range(0, len(tasks), SLICE):
                    mine = self.claim(version, tasks[start:start + SLICE])
                    if not mine:
                        continue
                    try:
                        scored = self.score(version, mine)
                    except BaseException:
                        self.unclaim(version, [int(t["id"]) for t in mine])
                        raise
                    waiting.append(storing.submit(self.store, version, scored, centroids, stale))
                    while len(waiting) > 2 or (waiting and waiting[0].done()):
                        finish(waiting.pop(0))
            finally:
                while waiting:  # what was scored is stored even when a later slice failed
                    finish(waiting.pop(0))
        return totals[0], totals[1]


class Superseded(Exception):
    """Another version serves the project now; its own run scores the pool."""

    def __init__(self, version: str):
        super().__init__(version)
        self.version = version
