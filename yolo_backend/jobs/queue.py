"""The server side of training: turn Label Studio's training triggers into RQ jobs, at once, and report on them.

``TrainingQueue`` plugs into the server as ``BackendContext.training`` (``request``, ``status``, ``job_status``,
``metrics``). A request costs one or two Redis round trips, so ``/webhook`` and ``/train`` answer in milliseconds.

Per project at most one job runs and one waits:
- the project's waiting slot (slots.py) names the job that has not read the annotations yet. A trigger while its
  job is alive *coalesces* into it (the job reads every annotation when it trains, so it covers the trigger); the
  job frees the slot once it holds the project's lock, and the next trigger queues a new waiting job. Reserving,
  coalescing and the cap are one Lua script, so any interleaving of requests from any number of server processes
  leaves one job training and at most one waiting.
- the job holds a per-project lock while it trains, so two workers never train one project at once; jobs take it
  in the order their requests were queued (job.py).
- at most MAX_QUEUED_PROJECTS projects wait at once (429 beyond): made-up project ids cannot fill the queue.

Redis unreachable or refusing writes: the request is kept in ``MODEL_DIR/pending/`` (pending.py; at most
MAX_QUEUED_PROJECTS projects, 503 beyond) and enqueued when Redis answers again, on the next request or by a light
background thread that retries every few seconds; each flush that changes something logs one summary line.

Which webhook actions train is the ``TRAINING_ACTIONS`` setting (default ``START_TRAINING``). Label Studio 1.23
sends START_TRAINING before ANNOTATION_CREATED / ANNOTATION_UPDATED when "start training on annotation submission"
is on, so training on the annotation events as well would only ever coalesce; other actions (TASKS_CREATED,
PROJECT_UPDATED, ANNOTATIONS_DELETED, ...) are acknowledged and ignored (logged: ``_say_ignored``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from ..errors import RequestRefused
from ..settings import Settings, mask_password
from .keys import LOCK_TTL_S, SETTLE_S, Keys, holder_alive, job_status_of, text
from .pending import FlushReport, PendingRequests
from .slots import SlotKind, WaitingSlots
from .states import JobPhase

log = logging.getLogger(__name__)

JOB_FUNCTION = "yolo_backend.jobs.job.run_training_job"
# How long finished/failed jobs (and their results) stay readable in Redis.
RESULT_TTL_S = 7 * 24 * 3600
REDIS_CONNECT_TIMEOUT_S = 0.5
REDIS_TIMEOUT_S = 3.0
RETRY_INTERVAL_S = 5.0
# Requests flush the saved ones at most this often (when the queue is full they stay, and each try costs a call).
FLUSH_MIN_INTERVAL_S = 1.0
IGNORED_SAID_MAX = 50  # distinct ignored webhook actions logged at INFO (the action is the sender's string)


def training_actions(settings: Settings) -> set[str]:
    return {a.strip().upper() for a in (settings.training_actions or "").split(",") if a.strip()}


def job_timeout(settings: Settings) -> int:
    """RQ kills a job after this many seconds: the training budget plus room for downloads, evaluation and
    re-predicting (RQ's default of 180 s would kill every real training job)."""
    return int(max(600.0, 2 * settings.train_time_budget_s + 900.0))


class TrainingQueue:
    """Training requests -> RQ jobs on ``settings.rq_queue_name`` at ``settings.effective_redis_url``."""

    def __init__(self, settings: Settings, redis_url: Optional[str] = None, queue_name: Optional[str] = None,
                 pending_dir: Optional[str | os.PathLike] = None, job_options: Optional[dict] = None,
                 retry_interval: float = RETRY_INTERVAL_S, job_function: str = JOB_FUNCTION):
        self.settings = settings
        self.redis_url = redis_url or settings.effective_redis_url
        self.queue_name = queue_name or settings.rq_queue_name
        self.pending_dir = Path(pending_dir) if pending_dir else Path(settings.model_dir) / "pending"
        self.pending_store = PendingRequests(self.pending_dir, settings.max_queued_projects)
        # Passed to every job: settle_s, lock_ttl.
        self.job_options = {"settle_s": SETTLE_S, "lock_ttl": LOCK_TTL_S, **(job_options or {})}
        self.job_function = job_function  # the RQ job by path (a seam for tests: one that starts slowly)
        self.retry_interval = retry_interval
        self.keys = Keys(self.queue_name)
        self._connection = None
        self._lock = threading.Lock()
        self._retry_thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._redis_down_since: Optional[float] = None
        self._last_flush = 0.0
        self._last_flush_said: Optional[tuple] = None
        self._ignored_said: set[str] = set()  # webhook actions already logged as ignored
        self.counters = {"requests": 0, "ignored": 0, "enqueued": 0, "coalesced": 0, "pending_recorded": 0,
                         "pending_enqueued": 0}
        if self.pending():  # saved while Redis was down, before a restart: queue them when Redis answers
            self._ensure_retry_thread()

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrainingQueue":
        return cls(settings)

    # --- Redis ------------------------------------------------------------------------------------------
    def connection(self):
        """One Redis client per process (thread-safe pool), with short timeouts so a dead Redis answers fast."""
        with self._lock:
            if self._connection is None:
                from redis import Redis

                self._connection = Redis.from_url(self.redis_url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
                                                  socket_timeout=REDIS_TIMEOUT_S, health_check_interval=30)
            return self._connection

    def queue(self):
        from rq import Queue

        return Queue(self.queue_name, connection=self.connection())

    @staticmethod
    def _redis_errors() -> tuple[type[BaseException], ...]:
        from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

        return (RedisConnectionError, RedisTimeoutError, OSError, RedisRefusedWrite)

    # --- requests ---------------------------------------------------------------------------------------
    def request(self, project_id: Optional[int], event: str, payload: Optional[dict] = None) -> dict:
        """A training trigger: enqueue (or coalesce, or record while Redis is down) and answer at once."""
        self._count("requests")
        event = (event or "").strip().upper()
        if event not in training_actions(self.settings):
            self._count("ignored")
            self._say_ignored(event, project_id)
            return {"status": "ignored", "action": event}
        if project_id is None:
            self._count("ignored")
            log.warning("training request %s without a project id ignored (Label Studio sends the project with "
                        "every webhook; check the sender)", event)
            return {"status": "ignored", "action": event, "error": "no project id in the request"}
        self._ensure_retry_thread()
        info = {"event": event, "source": str((payload or {}).get("source", "/webhook"))[:100],
                "requested_at": time.time()}
        try:
            with _refused_writes_as_errors():
                if time.monotonic() - self._last_flush >= FLUSH_MIN_INTERVAL_S and self.pending_store.any():
                    self.flush_pending()
                result = self._enqueue(project_id, info)
        except self._redis_errors() as exc:
            self._record_pending(project_id, info, exc)
            return {"job": None, "status": "pending", "project": project_id,
                    "message": f"Redis at {self._safe_url()} is unreachable ({type(exc).__name__}); the request "
                               f"is saved in {self.pending_dir} and will be queued when Redis is back"}
        self._redis_down_since = None
        return result

    def _say_ignored(self, event: str, project_id: Optional[int]) -> None:
        """An ignored START_TRAINING is a WARNING each time ("Start Training does nothing": TRAINING_ACTIONS leaves
        it out); another action an INFO line the first time this process sees it (Label Studio's project webhook
        sends every annotation event), then DEBUG. At most IGNORED_SAID_MAX actions are remembered."""
        shown = event[:100]
        if event == "START_TRAINING":
            log.warning("START_TRAINING for project %s ignored: TRAINING_ACTIONS=%r leaves it out; add it there for "
                        "Label Studio's Start Training and its train-on-submit switch to train", project_id,
                        self.settings.training_actions)
            return
        first = event not in self._ignored_said and len(self._ignored_said) < IGNORED_SAID_MAX
        if first:
            self._ignored_said.add(event)
        log.log(logging.INFO if first else logging.DEBUG,
                "webhook %s for project %s: not a training action (TRAINING_ACTIONS=%s), ignored%s", shown, project_id,
                self.settings.training_actions, " (said once per action)" if first else "")

    def slots(self) -> WaitingSlots:
        return WaitingSlots(self.connection(), self.keys, SlotKind.TRAINING)

    def _enqueue(self, project_id: int, info: dict, level: int = logging.INFO) -> dict:
        """Coalesce into the project's waiting job or queue a new one (slots.py: one atomic decision). ``level``:
        of its log line (a flush says one line for all)."""
        try:
            joined = self.slots().request(project_id, self.settings.max_queued_projects,
                                          lambda job_id: self._create_job(project_id, job_id, info),
                                          lambda: f"train-{project_id}-{uuid.uuid4().hex[:12]}")
        except RequestRefused:
            self._count("refused")
            raise
        if joined.status == "coalesced":
            self._count("coalesced")
            log.log(level, "training request %s for project %s coalesced into waiting job %s", info["event"],
                    project_id, joined.job)
        else:
            self.connection().set(self.keys.last(project_id), joined.job)
            self._count("enqueued")
            log.log(level, "training job %s queued for project %s (%s)", joined.job, project_id, info["event"])
        return {"job": joined.job, "status": joined.status, "project": project_id}

    def _create_job(self, project_id: int, job_id: str, info: dict) -> None:
        # At the front: a training request never waits behind the chunk jobs of a large pool's scoring.
        self.queue().enqueue(
            self.job_function, project_id, info["event"], {"source": info["source"]}, self.job_options,
            at_front=True, job_id=job_id, job_timeout=job_timeout(self.settings), result_ttl=RESULT_TTL_S,
            failure_ttl=RESULT_TTL_S, description=f"train project {project_id} ({info['event']})",
            meta={"project": project_id, "event": info["event"], "requested_at": info["requested_at"],
                  "phase": JobPhase.QUEUED.value})

    # --- Redis down: durable pending requests -----------------------------------------------------------
    def _record_pending(self, project_id: int, info: dict, exc: BaseException) -> None:
        path = self.pending_store.record(project_id, info, exc)
        self._count("pending_recorded")
        if self._redis_down_since is None:
            self._redis_down_since = time.time()
            log.warning("Redis at %s is unreachable (%s): training request for project %s saved in %s; it is "
                        "queued as soon as Redis answers (start Redis or check REDIS_URL)", self._safe_url(), exc,
                        project_id, path)

    def pending(self) -> list[dict]:
        return self.pending_store.records()

    def flush_pending(self) -> FlushReport:
        """Queue every saved request (Redis is back); logs one summary line when it says something new (never a
        line per file, never the same line per retry). Raises the Redis error when Redis is unreachable again
        (the files stay)."""
        def enqueue(project_id: int, info: dict) -> None:
            self._enqueue(project_id, info, logging.DEBUG)
            self._count("pending_enqueued")

        self._last_flush = time.monotonic()
        report = self.pending_store.flush(enqueue)
        said = report.signature()
        if report.news() or report.kept or report.error is not None:
            level = logging.INFO if report.news() or said != self._last_flush_said else logging.DEBUG
            log.log(level, "%s", report.summary())
        self._last_flush_said = said
        if report.error is not None:
            raise report.error
        return report

    def _ensure_retry_thread(self) -> None:
        """Start (once per process, after any fork) the thread that queues saved requests when Redis is back."""
        if self._retry_thread is not None and self._retry_thread.is_alive():
            return
        with self._lock:
            if self._retry_thread is not None and self._retry_thread.is_alive():
                return
            self._retry_thread = threading.Thread(target=self._retry_loop, name="training-pending-retry",
                                                  daemon=True)
            self._retry_thread.start()

    def _retry_loop(self) -> None:
        while not self._stop.wait(self.retry_interval):
            try:
                if self.pending_store.any():
                    with _refused_writes_as_errors():
                        self.flush_pending()
                    self._redis_down_since = None
            except self._redis_errors():
                continue  # still down; logged once when it went down
            except Exception:
                log.exception("queueing saved training requests failed; retrying in %.0f s", self.retry_interval)

    def close(self) -> None:
        self._stop.set()

    # --- pool scoring -----------------------------------------------------------------------------------
    def request_pool_scoring(self, project_id: Optional[int], reason: str = "requested",
                             reply_stored: int = 0) -> dict:
        """Queue the project's pool scoring (``jobs.pool``), or join the one waiting. ``reply_stored``: predictions
        the /predict reply that asks for it carries (the run waits for Label Studio to store them). Redis away:
        said, not kept (the next publish or request scores the pool; nothing is lost but time)."""
        if project_id is None:
            raise RequestRefused(400, "send the project id: {\"project\": <id>}")
        from .pool import enqueue_pool_run

        try:
            with _refused_writes_as_errors():
                return enqueue_pool_run(self.connection(), self.queue_name, project_id, reason,
                                        self.settings.max_queued_projects,
                                        {"reply_stored": int(reply_stored)} if reply_stored else None)
        except self._redis_errors() as exc:
            return {"job": None, "status": "unavailable", "project": project_id,
                    "message": f"Redis at {self._safe_url()} is unreachable ({type(exc).__name__}): pool scoring "
                               "is not queued; ask again when Redis is back"}

    def pool_status(self, project_id: int) -> dict:
        """The project's pool-scoring progress (``pool.read_status``); {} when it never ran or Redis is away."""
        from .pool import read_status

        try:
            return read_status(self.connection(), self.keys, project_id)
        except self._redis_errors():
            return {}

    # --- status -----------------------------------------------------------------------------------------
    def status(self, project_id: Optional[int]) -> dict:
        """/is_training: whether a job of the project runs, and the running / waiting / last job."""
        pending = [r for r in self.pending() if project_id is None or r.get("project") == project_id]
        base = {"is_training": False, "job": None, "pending_requests": len(pending)}
        if project_id is None:
            return base
        try:
            self._ensure_retry_thread()
            connection = self.connection()
            waiting = self.slots().job(project_id)
            last = text(connection.get(self.keys.last(project_id)))
            running = text(connection.get(self.keys.lock(project_id)))
            job_id = running or last
            job = self.job_status(job_id) if job_id else None
        except self._redis_errors() as exc:
            return {**base, "redis": f"unreachable: {type(exc).__name__}"}
        is_training = bool(job and job.get("status") == "started")
        return {**base, "is_training": is_training, "job": job_id, "waiting_job": waiting,
                "status": job.get("status") if job else None, "phase": job.get("phase") if job else None,
                "progress": job.get("progress") if job else None}

    def job_status(self, job_id: str) -> dict:
        """/job_status: state, phase, progress (epoch, loss, metrics), error, result and log file of a job."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            connection = self.connection()
            try:
                job = Job.fetch(job_id, connection=connection)
            except NoSuchJobError:
                return {"job": job_id, "status": "unknown", "error": f"no job {job_id} in queue {self.queue_name}"}
            status = job_status_of(job)
            meta = job.get_meta(refresh=False) or {}
            info: dict[str, Any] = {
                "job": job.id, "status": status, "project": meta.get("project"), "event": meta.get("event"),
                "phase": meta.get("phase"), "progress": meta.get("progress"), "log_file": meta.get("log_file"),
                "enqueued_at": _iso(job.enqueued_at), "started_at": _iso(job.started_at),
                "ended_at": _iso(job.ended_at),
                "coalesced_requests": int(text(connection.get(self.keys.coalesced(job.id))) or 0)}
            if status == "started" and self._horse_gone(job):
                info["status"] = "failed"
                info["error"] = meta.get("error") or (
                    "the worker running this job stopped (killed?) before it finished; nothing it trained was "
                    "published. The next training request trains again")
            elif status == "failed":
                info["error"] = meta.get("error") or _last_line(_exc_string(job))
            elif status == "finished":
                info["result"] = _jsonable(job.return_value(refresh=False))
            if meta.get("log_tail"):
                info["log_tail"] = meta["log_tail"]
            return info
        except self._redis_errors() as exc:
            return {"job": job_id, "status": "unknown", "error": f"Redis at {self._safe_url()} is unreachable "
                                                                 f"({type(exc).__name__})"}

    def _horse_gone(self, job) -> bool:
        """A started job whose work horse is dead: its heartbeat names a process of this machine that is gone, or
        it has no heartbeat 10 s after it started (a worker on another machine that was killed)."""
        connection = self.connection()
        if connection.exists(self.keys.alive(job.id)):
            return not holder_alive(connection, self.keys, job.id)
        return bool(job.started_at) and time.time() - job.started_at.timestamp() > 10

    def metrics(self) -> dict:
        """/metrics: this process's request counters and the queue's job counts."""
        info: dict[str, Any] = {"queue": self.queue_name, "redis_url": self._safe_url(),
                                "training_actions": sorted(training_actions(self.settings)),
                                "pending_requests": len(self.pending()), **self.counters}
        try:
            from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

            queue = self.queue()
            connection = self.connection()
            info.update(redis="up", queued=queue.count,
                        started=StartedJobRegistry(queue=queue).count,
                        finished=FinishedJobRegistry(queue=queue).count,
                        failed=FailedJobRegistry(queue=queue).count)
            info["workers"] = _worker_count(connection, queue)
        except self._redis_errors() as exc:
            info["redis"] = f"unreachable: {type(exc).__name__}"
        return info

    # --- helpers ----------------------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + 1

    def _safe_url(self) -> str:
        """The Redis URL without a password, for messages."""
        return mask_password(self.redis_url)


class RedisRefusedWrite(RuntimeError):
    """Redis answers but refuses to store (MISCONF: its disk is full; READONLY, NOREPLICAS, OOM)."""


@contextlib.contextmanager
def _refused_writes_as_errors():
    """Redis refusing a write is, for a training request, the same as Redis being away: keep it in pending/."""
    from redis.exceptions import ResponseError

    try:
        yield
    except ResponseError as exc:
        # Said first, or after "... of pipeline caused error: " / a script's "Error running script ...: ".
        if re.search(r"(^|: )(MISCONF|READONLY|NOREPLICAS|OOM|NOAUTH|WRONGPASS)\b", str(exc)):
            raise RedisRefusedWrite(str(exc)) from exc
        raise


def _worker_count(connection, queue) -> int:
    from rq import Worker

    try:
        return len(Worker.all(queue=queue, connection=connection))
    except Exception:  # informational only
        return -1


def _iso(value) -> Optional[str]:
    return value.isoformat() if value is not None else None


def _exc_string(job) -> str:
    try:
        result = job.latest_result()
        if result is not None and getattr(result, "exc_string", None):
            return result.exc_string
    except Exception:
        pass
    return ""


def _last_line(text: str) -> Optional[str]:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def _jsonable(value):
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)
