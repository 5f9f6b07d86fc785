"""A pool-scoring run: the coordinator (plan, clusters, sample, then the chunks) and one chunk."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ...settings import Settings
from .clustering import load_or_fit_clusters
from .plan import cluster_path, plan
from .scorer import STORED_TTL_S, PoolScorer, Superseded
from ..states import JobPhase, PoolState

log = logging.getLogger(__name__)

CHUNK_FUNCTION = "yolo_backend.jobs.pool.run_pool_chunk"
RUN_ALIVE_S = 120            # a run of the same version updated this recently is still going: coalesce into it
CHUNK_TIMEOUT_S = 1800
REPLY_STORED_WAIT_S = 180    # most a run started by /predict leftovers waits for Label Studio to store that reply


@dataclass
class RunPlan:
    """What a run does: the version, every task, those still to score and each one's stale predictions."""

    version: str
    tasks: list[dict]
    todo: list[dict]
    stale: dict

    @property
    def done_before(self) -> int:
        return len(self.tasks) - len(self.todo)


def score_project(settings: Settings, project_id: int, reason: str = "requested", connection=None,
                  queue_name: Optional[str] = None, job_id: Optional[str] = None, force: bool = False,
                  reply_stored: int = 0) -> dict:
    """The coordinator: plan the run, fit or load the clusters, store the sample, then queue the chunks (with a
    Redis connection) or score them here (without). ``reply_stored``: predictions a ``/predict`` reply sent just
    before (the run scores its leftovers), waited for first. Returns the run's summary."""
    from ...labelstudio.client import ProjectNotFound
    from ..keys import Keys

    keys = Keys(queue_name or settings.rq_queue_name) if connection is not None else None
    try:
        scorer = PoolScorer(settings, project_id, connection=connection, keys=keys)
    except ProjectNotFound as exc:  # ProjectNotConnected too: nothing is done there with the key
        log.warning("project %s: %s; pool scoring dropped", project_id, exc)
        return {"project": project_id, "scored": False, "reason": str(exc)}
    version = scorer.serving_version()
    if not force and _joins_a_running_run(scorer, version):
        return {"project": project_id, "model_version": version, "scored": False, "status": "coalesced"}
    run = plan_run(scorer, version, reply_stored)
    scorer.status.start(version, len(run.tasks), run.done_before, reason, job_id)
    log.info("project %s: pool scoring with %s (%s): %d task(s), %d already scored, %d to score", project_id,
             version, reason, len(run.tasks), run.done_before, len(run.todo))
    summary: dict[str, Any] = {"project": project_id, "model_version": version, "tasks": len(run.tasks),
                               "already_scored": run.done_before, "to_score": len(run.todo)}
    try:
        summary.update(_coordinate(scorer, run, queue_name))
    except Superseded as exc:
        scorer.status.fail(f"superseded by {exc.version}")
        return {**summary, "superseded_by": exc.version}
    except Exception as exc:
        scorer.status.fail(f"{type(exc).__name__}: {exc}")
        raise
    return summary


def _joins_a_running_run(scorer: PoolScorer, version: str) -> bool:
    previous = scorer.status.read()
    alive = previous.get("version") == version and previous.get("state") == PoolState.SCORING and \
        time.time() - previous.get("updated_at", 0) < RUN_ALIVE_S
    if alive:
        log.info("project %s: a pool-scoring run with %s is going on: this request joins it", scorer.project_id,
                 version)
    return alive


def plan_run(scorer: PoolScorer, version: str, reply_stored: int) -> RunPlan:
    """List the project's predictions, then its tasks (a task created in between is planned as unscored, never
    missed), plan (``plan.plan``), and reset the run's claims from Label Studio's truth (claims of a dead run must
    not block its tasks)."""
    client, project_id = scorer.client, scorer.project_id
    predictions = scorer.wait_for_stored(version, reply_stored, REPLY_STORED_WAIT_S) if reply_stored else \
        client.predictions(project_id)
    tasks: list[dict[str, Any]] = [{"id": int(t["id"]), "data": t.get("data") or {}}
             for t in client.tasks(project_id, with_annotations=False)]
    todo, stale = plan(tasks, predictions, version, scorer.settings.keep_old_predictions, scorer.ours(version))
    run = RunPlan(version, tasks, todo, stale)
    if scorer.connection is not None:
        key = scorer.keys.pool_stored(project_id, version)
        pipe = scorer.connection.pipeline()
        pipe.delete(key)
        done_ids = sorted({int(t["id"]) for t in tasks} - {int(t["id"]) for t in todo})
        for start in range(0, len(done_ids), 1000):
            pipe.sadd(key, *done_ids[start:start + 1000])
        pipe.expire(key, STORED_TTL_S)
        pipe.execute()
    return run


def _coordinate(scorer: PoolScorer, run: RunPlan, queue_name: Optional[str]) -> dict:
    """Clusters and their sample, the project's version switch, then the chunks: queued (with Redis) or scored
    here; the run is finished by whoever completes it."""
    from ...labelstudio.version_sync import switch_version

    settings, version = scorer.settings, run.version
    report = lambda stored, failed: scorer.status.add(version, stored, failed)  # noqa: E731
    centroids, rest, (stored, failed) = load_or_fit_clusters(scorer, version, run.todo, len(run.tasks), run.stale,
                                                             report) if run.todo else (None, [], (0, 0))
    if stored:
        with contextlib.suppress(Exception):  # Label Studio serves by this version only once it is the project's
            switch_version(scorer.client, scorer.context.connection, scorer.project_id, version,
                           settings.uncertainty_sampling)
    size = scorer.chunk_size
    chunks = [rest[i:i + size] for i in range(0, len(rest), size)]
    scorer.status.set_chunks(len(chunks))
    summary: dict[str, Any] = {}
    if scorer.connection is not None and chunks:
        summary["chunks_queued"] = _queue_chunks(scorer, run, chunks, queue_name or settings.rq_queue_name)
    for chunk in chunks if scorer.connection is None else []:
        assert centroids is not None  # chunks are what the clustering left
        s, f = scorer.score_and_store(version, chunk, centroids, run.stale, report)
        stored, failed = stored + s, failed + f
        log.info("project %s: pool scoring %d of %d task(s) stored", scorer.project_id, run.done_before + stored,
                 len(run.tasks))
    if scorer.status.coordinated():
        summary["swept"] = scorer.finish_run(version)
    return {**summary, "stored": stored, "failed": failed,
            "clusters": None if centroids is None else int(len(centroids))}


def _queue_chunks(scorer: PoolScorer, run: RunPlan, chunks: list[list[dict]], queue_name: str) -> int:
    from rq import Queue

    queue = Queue(queue_name, connection=scorer.connection)
    project_id, version = scorer.project_id, run.version
    for n, chunk in enumerate(chunks):
        queue.enqueue(CHUNK_FUNCTION, project_id, version, chunk,
                      {int(t["id"]): run.stale[int(t["id"])] for t in chunk if int(t["id"]) in run.stale},
                      scorer.label_config, {}, job_id=f"pool-{project_id}-{uuid.uuid4().hex[:12]}",
                      job_timeout=CHUNK_TIMEOUT_S, result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600,
                      description=f"score pool of project {project_id} with {version}: chunk {n + 1} of "
                                  f"{len(chunks)} ({len(chunk)} tasks)",
                      meta={"project": project_id, "kind": "pool-chunk", "phase": JobPhase.QUEUED.value})
    return len(chunks)


def score_chunk(settings: Settings, project_id: int, version: str, tasks: list[dict], stale: dict,
                label_config: Optional[str], connection=None, queue_name: Optional[str] = None,
                progress: Optional[Callable[[dict], None]] = None) -> dict:
    """One chunk job: score and store ``tasks`` with ``version`` unless another version serves now."""
    from ...clusters import ClusterModel
    from ..keys import Keys

    keys = Keys(queue_name or settings.rq_queue_name) if connection is not None else None
    scorer = PoolScorer(settings, project_id, label_config=label_config, connection=connection, keys=keys)
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
            progress({"phase": JobPhase.SCORING, "done": done[0], "failed": done[1], "total": len(tasks)})

    try:
        stored, failed = scorer.score_and_store(version, tasks, centroids, stale, report)
    except Superseded as exc:
        if scorer.status.add(version, chunk_done=True):
            scorer.finish_run(version, sweep=False)
        return {**summary, "superseded_by": exc.version}
    if scorer.status.add(version, chunk_done=True):  # the run's last chunk
        summary["swept"] = scorer.finish_run(version)
    return {**summary, "stored": stored, "failed": failed}
