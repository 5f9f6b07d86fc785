"""Pool scoring: one prediction of the serving version for every task of a project (regions, task score and an
image cluster), stored in Label Studio, so that its Data Manager sorts, and its uncertainty sampling serves, by them.

A run for (project, version):
1. the coordinator (``run_pool_job``) lists the project's tasks and predictions, skips tasks that already have a
   prediction of this version with a cluster, and, once per version, fits the cluster centroids on a sample of the
   pool (saved in MODEL_DIR, so every worker and every rerun gives a task the same cluster id); it scores and
   stores that sample itself, then queues the rest as chunk jobs (``run_pool_chunk``, POOL_CHUNK_SIZE tasks each) on
   the same RQ queue, so every worker listening shares the pool;
2. a chunk job claims its tasks (a Redis set per version: a retried or doubled chunk stores no second prediction),
   scores them a few batches at a time (boxes and embedding from one forward pass; never the whole pool in
   memory), stores one prediction per task through ``/api/predictions`` (the only call that keeps ``cluster``), and
   deletes the task's stale predictions: this version's without a cluster (stored from ``/predict`` replies or by
   the version switch) and, unless KEEP_OLD_PREDICTIONS, older versions' with a cluster (Label Studio takes the
   ``Max`` cluster over all of a solved task's predictions);
3. a chunk of a version that no longer serves the project stops at once: the newer version's run covers it;
4. the job that completes the run lists the predictions once more and deletes the stale ones stored since the plan
   (Label Studio stores a ``/predict`` reply after it was sent; a run started by that reply's deadline leftovers
   also waits for it to be stored before it plans).

Progress (done, failed, total, chunks, rate, ETA) is a Redis hash per project, read by ``/status``, the dashboard
and ``/prometheus``. Without Redis (``score-pool --here``) the run goes through every chunk in process.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path
from typing import Any, Callable, Collection, Optional

import numpy as np

from ..settings import Settings
from . import TrainingError
from .keys import text

log = logging.getLogger(__name__)

COORDINATOR_FUNCTION = "yolo_backend.jobs.pool.run_pool_job"
CHUNK_FUNCTION = "yolo_backend.jobs.pool.run_pool_chunk"
DEFAULT_BACKEND = "yolo_backend.backend:YOLOv7Backend"
CLUSTER_SAMPLE = 1000        # most tasks the version's centroids are fitted on (scored and stored by the coordinator)
SAMPLE_PER_CLUSTER = 10      # ... and as many as this per cluster (at least a chunk): the rest goes to chunk jobs
POST_THREADS = 4             # prediction POSTs at once (Label Studio has no bulk call that keeps `cluster`)
SLICE = 16                   # tasks scored and stored at a time inside a chunk (memory bound, progress grain)
NO_IMAGE_CLUSTER = -1        # a task whose data has no image field: stored with an empty result in its own cluster
RUN_ALIVE_S = 120            # a run of the same version updated this recently is still going: coalesce into it
STORED_TTL_S = 7 * 24 * 3600
COORDINATOR_TIMEOUT_S = 3600
CHUNK_TIMEOUT_S = 1800
REPLY_STORED_WAIT_S = 180    # most a run started by /predict leftovers waits for Label Studio to store that reply
STORED_POLL_S = 3


# --- which predictions a task needs ---------------------------------------------------------------------------
def plan(tasks: list[dict], predictions: list[dict], version: str, keep_old: bool,
         ours: Collection[str] = ()) -> tuple[list[dict], dict]:
    """(tasks still to score, {task id: stale prediction ids to delete once its new one is stored}).

    A task is done when it has a prediction of ``version`` with a cluster. Stale (``_stale_ids``): this version's
    predictions without a cluster and, unless ``keep_old``, the task's predictions of the backend's other versions
    (``ours``), so a task keeps one prediction of ours. A prediction of any other version (another model's,
    imported ones) is never touched."""
    by_task = _by_task(predictions)
    todo, stale = [], {}
    for task in tasks:
        mine = by_task.get(int(task["id"]), [])
        if _is_done(mine, version):
            continue
        todo.append(task)
        old = _stale_ids(mine, version, keep_old, ours)
        if old:
            stale[int(task["id"])] = old
    return todo, stale


def stale_of_done_tasks(predictions: list[dict], version: str, keep_old: bool, ours: Collection[str] = ()) -> \
        list[int]:
    """Stale prediction ids (``plan``'s rule) on tasks that are done: what a finished run still deletes. Label
    Studio may store a ``/predict`` reply's predictions (no cluster) after the run listed them, e.g. the reply
    whose leftovers at PREDICT_DEADLINE_S started the run."""
    return [old for mine in _by_task(predictions).values() if _is_done(mine, version)
            for old in _stale_ids(mine, version, keep_old, ours)]


def _by_task(predictions: list[dict]) -> dict[int, list[dict]]:
    by_task: dict[int, list[dict]] = {}
    for p in predictions:
        by_task.setdefault(int(p["task"]), []).append(p)
    return by_task


def _is_done(predictions: list[dict], version: str) -> bool:
    return any(p.get("model_version") == version and p.get("cluster") is not None for p in predictions)


def _stale_ids(predictions: list[dict], version: str, keep_old: bool, ours: Collection[str]) -> list[int]:
    return [int(p["id"]) for p in predictions
            if (p.get("model_version") == version and p.get("cluster") is None)
            or (not keep_old and p.get("model_version") != version and p.get("model_version") in ours)]


def cluster_path(settings: Settings, project_id: int, version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", version)[:120].lstrip(".") or "version"
    return Path(settings.model_dir) / "pool" / f"project-{int(project_id)}" / f"{safe}.npz"


def version_seed(version: str) -> int:
    return zlib.crc32(version.encode())


# --- progress in Redis -------------------------------------------------------------------------------------------
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
                                     "failed": 0, "chunks": 0, "chunks_done": 0, "state": "scoring",
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
        if status.get("state") == "scoring" and status.get("chunks_done", 0) >= status.get("chunks", 0) and \
                status.get("coordinated"):
            return bool(self.connection.hsetnx(self.key, "finished_at", time.time()))  # one caller only
        return False

    def done(self) -> None:
        """The run is over (after the sweep): what /status, the dashboard and waiting clients see."""
        if self.connection is None:
            return
        self.connection.hset(self.key, "state", "done")
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
            self.connection.hset(self.key, mapping={"state": "failed", "error": message[:500],
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

    from .slots import NOT_STARTED, SlotKind, WaitingSlots

    job_id = WaitingSlots(connection, keys, SlotKind.POOL).job(project_id)
    if not job_id:
        return None
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return None
    state = job.get_status(refresh=False)
    if getattr(state, "value", state) not in NOT_STARTED:
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
    status["eta_s"] = round(left / status["rate"], 1) if status["rate"] > 0 and status.get("state") == "scoring" \
        else None
    return status


# --- scoring and storing -------------------------------------------------------------------------------------------
class PoolScorer:
    """Scores and stores tasks of one project with the version serving it (shared by coordinator and chunks)."""

    def __init__(self, settings: Settings, project_id: int, label_config: Optional[str] = None,
                 backend_spec: str = DEFAULT_BACKEND, connection=None, keys=None):
        from ..runtime import BackendContext
        from .trainer import import_by_path

        self.settings, self.project_id = settings, int(project_id)
        self.context = BackendContext.from_settings(settings)
        self.client = self.context.client()
        if self.client is None:
            raise TrainingError("pool scoring stores predictions through the Label Studio API: set LABEL_STUDIO_URL "
                                "and LABEL_STUDIO_API_KEY (a personal access token or legacy token) for the worker")
        self.context.connection.require(self.project_id)  # ProjectNotConnected: nothing is read or written there
        if label_config is None:
            label_config = self.client.get_project(self.project_id).get("label_config")
        self.label_config = label_config
        backend_class = import_by_path(backend_spec, "backend class", "YOLOv7Backend")
        self.backend = backend_class(project_id=self.project_id, label_config=label_config, context=self.context)
        self.connection, self.keys = connection, keys
        self.status = RunStatus(connection, keys, self.project_id)

    def serving_version(self) -> str:
        """The version serving the project now (the server's rule, ``model_holder``)."""
        from ..labelstudio.config import find_rectangle_target, parse_label_config

        labels = find_rectangle_target(parse_label_config(self.label_config), self.settings.from_name).labels
        version = self.context.models.version(self.project_id, tuple(labels))
        if not version:
            raise TrainingError(f"project {self.project_id} has no model to score with: set MODEL_PATH or train")
        return version

    def ours(self, version: str) -> set[str]:
        """The versions whose predictions are the backend's own in this project (``history.served_versions``)."""
        from .history import served_versions

        from ..yolov7.untrained import UNTRAINED_VERSION

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
        scored_version, scored = self.backend.score_tasks(tasks)
        if scored_version != version:
            raise Superseded(scored_version)
        return [(task, prediction, embedding) for task, (prediction, embedding) in zip(tasks, scored)]

    def store(self, version: str, scored: list[tuple[dict, dict, Optional[np.ndarray]]], centroids: np.ndarray,
              stale: dict) -> tuple[int, int]:
        """Store one prediction per scored task (with its cluster) and delete its stale ones; (stored, failed)."""
        from ..clusters import assign_clusters
        from ..labelstudio.client import LabelStudioAuthError

        rows = [i for i, (_, _, e) in enumerate(scored) if e is not None]
        clusters: dict[int, int] = {}
        if rows:
            found = assign_clusters(np.stack([scored[i][2] for i in rows]).astype(np.float32), centroids)
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
                        report: Callable[[int, int], None]) -> tuple[int, int]:
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


def load_or_fit_clusters(scorer: PoolScorer, version: str, todo: list[dict], total: int, stale: dict,
                         report: Callable[[int, int], None]) -> tuple[np.ndarray, list[dict], tuple[int, int]]:
    """The version's centroids (fitted on a sample of ``todo``, which is then stored, when there are none yet);
    returns (centroids, the tasks left to score, (stored, failed) of the sample)."""
    from ..clusters import ClusterModel, auto_cluster_count, fit_centroids

    path = cluster_path(scorer.settings, scorer.project_id, version)
    if path.is_file():
        try:
            return ClusterModel.load(path).centroids, todo, (0, 0)
        except Exception as exc:
            log.warning("cluster centroids %s unreadable (%s): fitting them again", path, exc)
    seed = version_seed(version)
    rng = np.random.default_rng(seed)
    wanted = scorer.settings.pool_clusters or auto_cluster_count(total)
    size = min(CLUSTER_SAMPLE, max(scorer.settings.pool_chunk_size, SAMPLE_PER_CLUSTER * wanted), len(todo))
    take = sorted(rng.choice(len(todo), size=size, replace=False).tolist()) if todo else []
    sample = scorer.claim(version, [todo[i] for i in take])
    try:
        scored = scorer.score(version, sample)
    except BaseException:
        scorer.unclaim(version, [int(t["id"]) for t in sample])
        raise
    embeddings = [e for _, _, e in scored if e is not None]
    if not embeddings:
        scorer.unclaim(version, [int(t["id"]) for t in sample])
        raise TrainingError(f"project {scorer.project_id}: no image of the {len(sample)} sampled task(s) could be "
                            "had (see the log lines above): nothing to cluster")
    matrix = np.stack(embeddings).astype(np.float32)
    model = ClusterModel(fit_centroids(matrix, min(wanted, len(matrix)), seed=seed), version, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    log.info("project %s: %d clusters for %s fitted on %d image embedding(s)", scorer.project_id,
             len(model.centroids), version, len(matrix))
    counts = scorer.store(version, scored, model.centroids, stale)
    report(*counts)
    chosen = {int(t["id"]) for t in [todo[i] for i in take]}
    return model.centroids, [t for t in todo if int(t["id"]) not in chosen], counts


def score_project(settings: Settings, project_id: int, reason: str = "requested", connection=None,
                  queue_name: Optional[str] = None, job_id: Optional[str] = None,
                  backend_spec: str = DEFAULT_BACKEND, force: bool = False, reply_stored: int = 0) -> dict:
    """The coordinator: plan the run, fit or load the clusters, store the sample, then queue the chunks (with a
    Redis connection) or score them here (without). ``reply_stored``: predictions a ``/predict`` reply sent just
    before (the run scores its leftovers), waited for first. Returns the run's summary."""
    from ..labelstudio.client import ProjectNotFound
    from ..labelstudio.version_sync import switch_version
    from .keys import Keys

    keys = Keys(queue_name or settings.rq_queue_name) if connection is not None else None
    try:
        scorer = PoolScorer(settings, project_id, backend_spec=backend_spec, connection=connection, keys=keys)
    except ProjectNotFound as exc:  # ProjectNotConnected too: nothing is done there with the key
        log.warning("project %s: %s; pool scoring dropped", project_id, exc)
        return {"project": project_id, "scored": False, "reason": str(exc)}
    version = scorer.serving_version()
    previous = scorer.status.read()
    if not force and previous.get("version") == version and previous.get("state") == "scoring" and \
            time.time() - previous.get("updated_at", 0) < RUN_ALIVE_S:
        log.info("project %s: a pool-scoring run with %s is going on: this request joins it", project_id, version)
        return {"project": project_id, "model_version": version, "scored": False, "status": "coalesced"}
    client = scorer.client
    # Predictions first, tasks after: a task created in between is then planned as unscored, never missed.
    predictions = scorer.wait_for_stored(version, reply_stored, REPLY_STORED_WAIT_S) if reply_stored else \
        client.predictions(project_id)
    tasks = [{"id": int(t["id"]), "data": t.get("data") or {}} for t in client.tasks(project_id,
                                                                                     with_annotations=False)]
    todo, stale = plan(tasks, predictions, version, settings.keep_old_predictions, scorer.ours(version))
    done_before = len(tasks) - len(todo)
    if connection is not None:  # Label Studio is the truth: claims of a dead run must not block its tasks
        key = keys.pool_stored(project_id, version)
        pipe = connection.pipeline()
        pipe.delete(key)
        done_ids = sorted({int(t["id"]) for t in tasks} - {int(t["id"]) for t in todo})
        for start in range(0, len(done_ids), 1000):
            pipe.sadd(key, *done_ids[start:start + 1000])
        pipe.expire(key, STORED_TTL_S)
        pipe.execute()
    scorer.status.start(version, len(tasks), done_before, reason, job_id)
    log.info("project %s: pool scoring with %s (%s): %d task(s), %d already scored, %d to score", project_id,
             version, reason, len(tasks), done_before, len(todo))
    summary: dict[str, Any] = {"project": project_id, "model_version": version, "tasks": len(tasks),
                               "already_scored": done_before, "to_score": len(todo)}
    try:
        report = lambda stored, failed: scorer.status.add(version, stored, failed)  # noqa: E731
        centroids, rest, (stored, failed) = load_or_fit_clusters(scorer, version, todo, len(tasks), stale, report) \
            if todo else (None, [], (0, 0))
        if stored:
            with contextlib.suppress(Exception):  # Label Studio serves by this version only once it is the project's
                switch_version(client, scorer.context.connection, project_id, version, settings.uncertainty_sampling)
        chunk_size = max(1, settings.pool_chunk_size)
        chunks = [rest[i:i + chunk_size] for i in range(0, len(rest), chunk_size)]
        scorer.status.set_chunks(len(chunks))
        if connection is not None and chunks:
            from rq import Queue

            queue = Queue(queue_name or settings.rq_queue_name, connection=connection)
            for n, chunk in enumerate(chunks):
                queue.enqueue(CHUNK_FUNCTION, project_id, version, chunk,
                              {int(t["id"]): stale[int(t["id"])] for t in chunk if int(t["id"]) in stale},
                              scorer.label_config, {"backend": backend_spec},
                              job_id=f"pool-{project_id}-{uuid.uuid4().hex[:12]}", job_timeout=CHUNK_TIMEOUT_S,
                              result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600,
                              description=f"score pool of project {project_id} with {version}: chunk {n + 1} of "
                                          f"{len(chunks)} ({len(chunk)} tasks)",
                              meta={"project": project_id, "kind": "pool-chunk", "phase": "queued"})
            summary["chunks_queued"] = len(chunks)
        else:
            for chunk in chunks:
                s, f = scorer.score_and_store(version, chunk, centroids, stale, report)
                stored, failed = stored + s, failed + f
                log.info("project %s: pool scoring %d of %d task(s) stored", project_id, done_before + stored,
                         len(tasks))
        if scorer.status.coordinated():
            summary["swept"] = scorer.finish_run(version)
    except Superseded as exc:
        scorer.status.fail(f"superseded by {exc.version}")
        return {**summary, "superseded_by": exc.version}
    except Exception as exc:
        scorer.status.fail(f"{type(exc).__name__}: {exc}")
        raise
    summary.update(stored=stored, failed=failed, clusters=None if centroids is None else int(len(centroids)))
    return summary


def score_chunk(settings: Settings, project_id: int, version: str, tasks: list[dict], stale: dict,
                label_config: Optional[str], connection=None, queue_name: Optional[str] = None,
                backend_spec: str = DEFAULT_BACKEND, progress: Optional[Callable[[dict], None]] = None) -> dict:
    from ..clusters import ClusterModel
    from .keys import Keys

    keys = Keys(queue_name or settings.rq_queue_name) if connection is not None else None
    scorer = PoolScorer(settings, project_id, label_config=label_config, backend_spec=backend_spec,
                        connection=connection, keys=keys)
    summary = {"project": project_id, "model_version": version, "tasks": len(tasks)}
    now = scorer.serving_version()
    if now != version:
        log.info("project %s: pool chunk of %s skipped: %s serves now (its run scores the pool)", project_id,
                 version, now)
        if scorer.status.add(version, chunk_done=True):
            scorer.finish_run(version, sweep=False)  # not the serving version: its stale rule no longer applies
        return {**summary, "superseded_by": now}
    centroids = ClusterModel.load(cluster_path(settings, project_id, version)).centroids
    done = [0, 0]

    def report(stored: int, failed: int) -> None:
        done[0] += stored
        done[1] += failed
        scorer.status.add(version, stored, failed)
        if progress:
            progress({"phase": "scoring", "done": done[0], "failed": done[1], "total": len(tasks)})

    try:
        stored, failed = scorer.score_and_store(version, tasks, centroids, stale, report)
    except Superseded as exc:
        if scorer.status.add(version, chunk_done=True):
            scorer.finish_run(version, sweep=False)
        return {**summary, "superseded_by": exc.version}
    if scorer.status.add(version, chunk_done=True):  # the run's last chunk
        summary["swept"] = scorer.finish_run(version)
    return {**summary, "stored": stored, "failed": failed}


# --- the RQ jobs and queueing them -----------------------------------------------------------------------------
def run_pool_job(project_id: int, reason: str = "requested", options: Optional[dict] = None) -> dict:
    """RQ job: coordinate a pool-scoring run of the project (``score_project``)."""
    from rq import get_current_job

    from .keys import Keys
    from .slots import SlotKind, WaitingSlots

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
                         backend_spec=options.get("backend", DEFAULT_BACKEND), force=bool(options.get("force")),
                         reply_stored=int(options.get("reply_stored", 0)))


def run_pool_chunk(project_id: int, version: str, tasks: list[dict], stale: dict, label_config: Optional[str],
                   options: Optional[dict] = None) -> dict:
    """RQ job: score and store one chunk of a run (``score_chunk``)."""
    from rq import get_current_job

    job = get_current_job()
    settings = Settings.from_env()

    def progress(event: dict) -> None:
        if job is not None:
            job.meta.update(event)
            with contextlib.suppress(Exception):
                job.save_meta()

    return score_chunk(settings, int(project_id), version, tasks, stale, label_config,
                       connection=job.connection if job else None, queue_name=job.origin if job else None,
                       backend_spec=(options or {}).get("backend", DEFAULT_BACKEND), progress=progress)


def enqueue_pool_run(connection, queue_name: str, project_id: int, reason: str, max_waiting: int,
                     options: Optional[dict] = None) -> dict:
    """Queue a coordinator for the project unless one is already waiting (the request joins it). RequestRefused
    (429) when ``max_waiting`` projects already have one waiting, so made-up project ids cannot fill the queue. The
    decision is the training queue's (slots.py), on the pool's own slots."""
    from rq import Queue

    from .keys import Keys
    from .slots import SlotKind, WaitingSlots

    def create(job_id: str) -> None:
        Queue(queue_name, connection=connection).enqueue(
            COORDINATOR_FUNCTION, project_id, reason, options or {}, job_id=job_id,
            job_timeout=COORDINATOR_TIMEOUT_S, result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600,
            description=f"score the pool of project {project_id} ({reason})",
            meta={"project": project_id, "kind": "pool", "phase": "queued", "reason": reason})

    joined = WaitingSlots(connection, Keys(queue_name), SlotKind.POOL).request(
        project_id, max_waiting, create, lambda: f"pool-{project_id}-{uuid.uuid4().hex[:12]}")
    if joined.status == "queued":
        log.info("pool scoring of project %s queued as job %s (%s)", project_id, joined.job, reason)
    return {"job": joined.job, "status": joined.status, "project": project_id}
