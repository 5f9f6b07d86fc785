"""The RQ job (``yolo_backend.jobs.job.run_training_job``, importable by path for a plain ``rq worker``): keep a
heartbeat, take the project's waiting slot (or stop when another job replaced it: slots.py), report progress to the
job's meta and log file, take the project's lock in ticket order (passing over a holder known dead), free the
waiting slot, and run the backend's ``fit()``; a full disk is said as such.

Nothing here imports torch at module level: CUDA is initialised only inside the job (after the worker's fork).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from ..logs import LOG_FORMAT
from ..registry import Registry
from ..settings import Settings
from . import TrainingError
from .states import JobPhase, plain

log = logging.getLogger(__name__)

class JobReporter:
    """Job progress into the RQ job's meta (throttled) and the job's log into MODEL_DIR/jobs/<id>.log."""

    MIN_INTERVAL_S = 1.0

    def __init__(self, job, settings: Settings):
        self.job = job
        self.log_path = Path(settings.model_dir) / "jobs" / f"{job.id if job else 'local'}.log"
        self.tail: deque[str] = deque(maxlen=30)
        self._last_save = 0.0
        self._phase = None
        self._handler: Optional[logging.Handler] = None
        self._tail_handler: Optional[logging.Handler] = None
        self._lock = threading.Lock()
        self._dirty = False
        self._stop = threading.Event()
        # Saves what throttling held back (the last progress before a long epoch would otherwise wait for it).
        self._flusher = threading.Thread(target=self._flush_loop, name="job-meta-flush", daemon=True)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.MIN_INTERVAL_S):
            if self._dirty:
                self.update({}, force=True)

    def __enter__(self) -> "JobReporter":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        formatter = logging.Formatter(LOG_FORMAT)
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(formatter)
        self._handler.setLevel(logging.INFO)
        tail = self.tail

        class _Tail(logging.Handler):
            def emit(self, record):
                try:
                    tail.append(formatter.format(record))
                except Exception:
                    pass

        self._tail_handler = _Tail(logging.INFO)
        root = logging.getLogger()
        root.addHandler(self._handler)
        root.addHandler(self._tail_handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        self.update({"log_file": str(self.log_path), "pid": os.getpid(), "phase": JobPhase.STARTED}, force=True)
        if self.job is not None:
            self._flusher.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if exc is not None:
            log.error("training job failed: %s: %s", type(exc).__name__, exc)
            self.update({"phase": JobPhase.FAILED, "error": f"{type(exc).__name__}: {exc}"}, force=True)
        root = logging.getLogger()
        for handler in (self._handler, self._tail_handler):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()

    def progress(self, event: dict) -> None:
        phase = event.get("phase")
        fields = {"phase": phase} if phase else {}
        details = {k: v for k, v in event.items() if k != "phase"}
        if details:
            fields["progress"] = details
        self.update(fields, force=phase != self._phase)
        self._phase = phase or self._phase

    def update(self, fields: dict, force: bool = False) -> None:
        if self.job is None:
            return
        fields = {k: plain(v) for k, v in fields.items()}  # job meta holds plain words, not this package's Enums
        with self._lock:
            if "progress" in fields and isinstance(self.job.meta.get("progress"), dict) and \
                    fields.get("phase", self.job.meta.get("phase")) == self.job.meta.get("phase"):
                fields = {**fields, "progress": {**self.job.meta["progress"], **fields["progress"]}}
            self.job.meta.update(fields)
            now = time.monotonic()
            if not force and now - self._last_save < self.MIN_INTERVAL_S:
                self._dirty = True
                return
            self._last_save, self._dirty = now, False
            self.job.meta["log_tail"] = list(self.tail)[-15:]
            try:
                self.job.save_meta()
            except Exception as exc:  # reporting must never kill training
                log.debug("could not save job meta: %s", exc)


class _Heartbeat:
    """Refreshes the job's alive key (and the project lock it holds) so servers can tell a killed worker."""

    def __init__(self, connection, keys, job_id: str, ttl: int):
        self.connection, self.keys, self.job_id, self.ttl = connection, keys, job_id, max(2, int(ttl))
        self.lock_key: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-heartbeat", daemon=True)

    def __enter__(self):
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.connection.delete(self.keys.alive(self.job_id))

    def beat(self) -> None:
        from .keys import heartbeat_value, text

        # "<process space>:<pid>": where it is ours, a dead work horse is known at once (jobs.keys.holder_alive).
        self.connection.set(self.keys.alive(self.job_id), heartbeat_value(), ex=self.ttl)
        if self.lock_key:
            holder = text(self.connection.get(self.lock_key))
            if holder == self.job_id:
                self.connection.expire(self.lock_key, self.ttl)
            elif holder is None:  # expired while Redis was away (or restarted empty): take it back
                if not self.connection.set(self.lock_key, self.job_id, nx=True, ex=self.ttl):
                    log.warning("job %s lost the project's training lock to job %s", self.job_id,
                                text(self.connection.get(self.lock_key)))
            else:
                log.warning("job %s lost the project's training lock to job %s", self.job_id, holder)

    def _run(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl / 4)):
            with contextlib.suppress(Exception):
                self.beat()


LOCK_POLL_S = 0.5
LOCK_QUEUE_TTL_S = 24 * 3600


@contextlib.contextmanager
def _project_lock(connection, keys, heartbeat: _Heartbeat, project_id: int, job_id: str, ticket: int, ttl: int,
                  reporter):
    """At most one training job per project at a time, first come first served: the jobs waiting for the lock take
    it in ticket order (the order their requests were queued). A holder, or a job first in line, known dead (its
    work horse is gone, or its heartbeat expired) is passed over at once, so nobody waits out its TTL."""
    from .keys import ACQUIRE, DELETE_IF_EQUAL, holder_alive

    key, line = keys.lock(project_id), keys.lock_queue(project_id)
    said = None
    try:
        while True:
            reply = connection.eval(ACQUIRE, 2, key, line, job_id, int(ticket), max(2, int(ttl)), LOCK_QUEUE_TTL_S)
            if int(reply[0]):
                break
            holder, first = (v.decode() if isinstance(v, bytes) else v for v in reply[1:3])
            if holder and not holder_alive(connection, keys, holder):
                if connection.eval(DELETE_IF_EQUAL, 1, key, holder):
                    log.info("job %s of project %s held the training lock but its process is gone: lock released",
                             holder, project_id)
                continue
            if not holder and first != job_id and not holder_alive(connection, keys, first):
                if connection.zrem(line, first):
                    log.info("job %s of project %s was first in line for the training lock but its process is "
                             "gone: passed over", first, project_id)
                continue
            ahead = holder or first
            if said != ahead:
                log.info("job %s of project %s is %s; waiting for it", ahead, project_id,
                         "training" if holder else "ahead in line")
                reporter.progress({"phase": JobPhase.WAITING, "message": f"waiting for job {ahead} of this project"})
                said = ahead
            time.sleep(LOCK_POLL_S)
    except BaseException:
        with contextlib.suppress(Exception):
            connection.zrem(line, job_id)  # leaving the line (failed, stopped): the next job goes on
        raise
    heartbeat.lock_key = key
    try:
        yield
    finally:
        heartbeat.lock_key = None
        with contextlib.suppress(Exception):
            connection.eval(DELETE_IF_EQUAL, 1, key, job_id)



def run_training_job(project_id: int, event: str = "START_TRAINING", payload: Optional[dict] = None,
                     options: Optional[dict] = None) -> dict:
    """The RQ job (``yolo_backend.jobs.job.run_training_job``): train one project and publish."""
    from rq import get_current_job

    from .keys import LOCK_TTL_S, SETTLE_S, Keys
    from .slots import SlotKind, WaitingSlots

    options = {"settle_s": SETTLE_S, "lock_ttl": LOCK_TTL_S, **(options or {})}
    job = get_current_job()
    settings = Settings.from_env()
    project_id = int(project_id)
    if job is None:  # in process (tests, tools): no queue, no lock
        with JobReporter(None, settings) as reporter:
            log.info("training project %s (%s) in process %d", project_id, event, os.getpid())
            return _train(settings, project_id, event, options, None, reporter)
    keys = Keys(job.origin)
    slots = WaitingSlots(job.connection, keys, SlotKind.TRAINING)
    with _Heartbeat(job.connection, keys, job.id, options["lock_ttl"]) as heartbeat:
        # First, with the heartbeat written: from here a trigger sees a started job, alive, in the waiting slot.
        ticket, replaced_by = slots.take(project_id, job.id)
        if ticket is None:
            log.info("training job %s of project %s does not run: job %s took its place (it covers this request)",
                     job.id, project_id, replaced_by)
            job.meta.update(phase=JobPhase.SUPERSEDED.value, superseded_by=replaced_by)
            with contextlib.suppress(Exception):
                job.save_meta()
            return {"project": project_id, "trained": False, "published": False,
                    "reason": f"superseded by job {replaced_by}, which covers this request"}
        try:
            with JobReporter(job, settings) as reporter:
                log.info("training job %s for project %s (%s) in process %d", job.id, project_id, event,
                         os.getpid())
                with _project_lock(job.connection, keys, heartbeat, project_id, job.id, ticket,
                                   options["lock_ttl"], reporter):
                    # Only now, holding the project's lock and before reading the annotations, a new trigger
                    # queues a new job; until here (another job of the project trains) triggers coalesce into
                    # this one, so a burst never leaves more than one job waiting.
                    slots.release(project_id, job.id)
                    return _train(settings, project_id, event, options, job, reporter)
        finally:
            with contextlib.suppress(Exception):  # failed before the lock: the slot is free for the next trigger
                slots.release(project_id, job.id)


def _train(settings: Settings, project_id: int, event: str, options: dict, job,
           reporter: JobReporter) -> dict:
    """Holding the project's lock (or in process): clean up after a killed job, let Label Studio finish saving, and
    train the project (``training.train_project``); the run goes into the project's history either way."""
    from ..runtime import BackendContext
    from . import history
    from .training import train_project

    Registry.for_project(settings.model_dir, project_id).clean_leftovers()  # what a killed job of it left
    time.sleep(max(0.0, float(options["settle_s"])))  # let Label Studio finish saving
    context = BackendContext.from_settings(settings)
    job_id = job.id if job else None
    run_started = time.monotonic()
    try:
        result = train_project(context, project_id, event, progress=reporter.progress, job_id=job_id)
    except Exception as exc:  # kept in the project's run history (dashboard), then the job fails
        error = no_space_error(exc, settings.model_dir) or exc
        history.record_failure(settings.model_dir, project_id, error, event, job_id, time.monotonic() - run_started)
        if error is exc:
            raise
        raise error from exc
    history.record_run(settings.model_dir, project_id, result, job_id, time.monotonic() - run_started)
    reporter.update({"phase": JobPhase.DONE, "result_version": result.get("model_version")}, force=True)
    return result


# torch's checkpoint writer reports a full disk as "PytorchStreamWriter failed writing file ..." / "[enforce fail at
# inline_container.cc]" without the OS error: told apart by how little space is left.
_TORCH_WRITE_FAILURES = ("file write failed", "enforce fail at inline_container", "No space left on device")
_LOW_SPACE_BYTES = 256 * 1024 * 1024


def no_space_error(exc: BaseException, model_dir: str | os.PathLike) -> Optional[TrainingError]:
    """A TrainingError saying "no space left on device in MODEL_DIR" when ``exc`` is a full disk, else None."""
    chain: list[BaseException] = []
    seen: Optional[BaseException] = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    enospc = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain)
    try:
        free = shutil.disk_usage(model_dir).free
    except OSError:
        free = None
    torch_write = any(any(text in str(e) for text in _TORCH_WRITE_FAILURES) for e in chain)
    if not (enospc or (torch_write and free is not None and free < _LOW_SPACE_BYTES)):
        return None
    left = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
    return TrainingError(f"no space left on device in {model_dir}{left}: nothing was published and the registry is "
                         f"unchanged; free some space (old versions: KEEP_VERSIONS), then train again ({exc})")
