"""What the dashboard shows, as plain JSON-ready dicts: per project the versions and training runs with their
metrics, the learning curve, the current job with its progress; the training queue; the last warnings.

The same dicts feed the HTML page (``dashboard.py``), ``GET /status`` and the ``details`` of ``GET /versions``,
so every number on the page is also available to scripts. Read from the registry (``meta.json`` of each
published version), the run history (``jobs/history.py``), the RQ job meta (through ``BackendContext.training``)
and this process's log. Nothing here imports torch or loads a model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Optional

from ..jobs.history import finite, read_runs
from .effort import effort_status
from ..labelstudio.config import LabelConfigError, parse_label_config
from ..labelstudio.controls import read_controls
from ..labelstudio.video_controls import is_video_config, read_video_control
from ..registry import ModelVersion, Registry, RegistryError
from ..settings import Settings
from ..model_holder import NoModelError
from ..jobs.states import JobPhase, RunOutcome

log = logging.getLogger(__name__)

WARNINGS_KEPT = 50
WARNING_CHARS = 500  # each kept message at most this long: /status and the dashboard stay small
# A validation mAP measured on fewer images than this is shown as "too few to say", not as a number: on a real
# detector and split (benchmarks/bench_val_size.py) a 2-image mAP@0.5 was exactly 1.000 for 55 % of the subsets
# and off by 0.25 typically; at 10 images its spread is still about 0.13 (SD), at 20 about 0.07. The same
# bound, in boxes, for one class's numbers (those images hold about one box each).
MIN_VAL_IMAGES = 10
MIN_CLASS_BOXES = 10


# --------------------------------------------------------------------------------------------------------------
# The last warnings of this process
# --------------------------------------------------------------------------------------------------------------

class RecentWarnings(logging.Handler):
    """Keeps the last WARNINGS_KEPT WARNING/ERROR log records of the process (failed images, refused keys, ...),
    each cut to WARNING_CHARS characters."""

    def __init__(self, capacity: int = WARNINGS_KEPT):
        super().__init__(logging.WARNING)
        self.records: deque[dict] = deque(maxlen=capacity)
        self._records_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            return
        if len(message) > WARNING_CHARS:
            message = f"{message[:WARNING_CHARS]}... ({len(message)} characters)"
        entry = {"time": record.created, "time_iso": _iso(record.created), "level": record.levelname,
                 "logger": record.name, "message": message}
        with self._records_lock:
            self.records.append(entry)

    def last(self, count: int = 20) -> list[dict]:
        with self._records_lock:
            return list(self.records)[-count:][::-1]


_recent_warnings: Optional[RecentWarnings] = None
_install_lock = threading.Lock()


def recent_warnings() -> RecentWarnings:
    """The process's one warnings handler, attached to the root logger on first use (and again if a logging
    set-up made later, e.g. a server's, replaced the root logger's handlers)."""
    global _recent_warnings
    with _install_lock:
        if _recent_warnings is None:
            _recent_warnings = RecentWarnings()
        root = logging.getLogger()
        if _recent_warnings not in root.handlers:
            root.addHandler(_recent_warnings)
        return _recent_warnings


# --------------------------------------------------------------------------------------------------------------
# Versions and runs
# --------------------------------------------------------------------------------------------------------------

def _number(value: Any) -> Any:
    """``value`` when it is a number, else None (meta.json and history lines may be written by hand)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metrics_summary(metrics: Optional[dict], val_images: Any = None) -> Optional[dict]:
    """The validation numbers of a run: mAP@0.5, mAP@0.5:0.95, precision and recall at the serving threshold,
    overall and per class (a class without validation boxes has None, not 0), with what they rest on:
    ``val_images`` (the images they were measured on: the metrics' own count, else ``val_images``), ``too_few``
    (fewer than MIN_VAL_IMAGES; per class: fewer than MIN_CLASS_BOXES boxes) and ``note``, the words the page
    shows ("too few to say (2 validation images)", "on 12 validation images")."""
    if not isinstance(metrics, dict):
        return None
    count = _number(metrics.get("images"))
    count = count if count is not None else _number(val_images)
    too_few = count is not None and count < MIN_VAL_IMAGES
    per_class = []
    for item in metrics.get("per_class") or []:
        if isinstance(item, dict):
            boxes = _number(item.get("instances"))
            few_boxes = bool(boxes) and boxes < MIN_CLASS_BOXES
            per_class.append({"name": str(item.get("name")), "instances": boxes,
                              "map50": _number(item.get("ap50")), "map": _number(item.get("ap")),
                              "precision": _number(item.get("precision")), "recall": _number(item.get("recall")),
                              "too_few": too_few or few_boxes,
                              "note": f"too few to say ({_plural(boxes, 'box', 'boxes')})" if few_boxes else None})
    numbers = {k: _number(metrics.get(k)) for k in ("map50", "map", "precision", "recall", "serve_conf", "images",
                                                     "instances")}
    return finite({**numbers, "per_class": per_class, "val_images": count, "too_few": too_few,
                   "note": _evidence_note(count, too_few)})


def _plural(count: Any, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _evidence_note(count: Any, too_few: bool) -> Optional[str]:
    if count is None:
        return None  # a hand-written meta.json: nothing to say about it
    images = _plural(count, "validation image", "validation images")
    return f"too few to say ({images}; needs {MIN_VAL_IMAGES})" if too_few else f"on {images}"


def _images(count: Any, negatives: Any) -> dict:
    count, negatives = _number(count), _number(negatives)
    positives = count - negatives if isinstance(count, int) and isinstance(negatives, int) else None
    return {"images": count, "positives": positives, "negatives": negatives}


def _iso(epoch: Optional[float]) -> Optional[str]:
    if not isinstance(epoch, (int, float)):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def version_entry(version: ModelVersion, project_id: Optional[int]) -> dict:
    """One published version from its meta.json."""
    meta = version.meta()
    untrained = bool(meta.get("untrained"))
    return {"name": version.name, "project": project_id, "status": "published", "in_registry": True,
            "reason": meta.get("note") if untrained else meta.get("decision"), "parent": meta.get("parent"),
            "created": _number(meta.get("created")), "created_iso": _iso(meta.get("created")), "job": meta.get("job"),
            **_images(meta.get("annotations"), meta.get("negatives")),
            "train_images": _number(meta.get("train_images")), "val_images": _number(meta.get("val_images")),
            "train_seconds": _number(meta.get("train_seconds")), "untrained": untrained,
            "metrics": metrics_summary(meta.get("metrics"), meta.get("val_images")),
            "baseline_metrics": metrics_summary(meta.get("baseline_metrics"), meta.get("val_images")),
            **comparison(meta.get("compared"), meta.get("parent_img_size"))}


def comparison(compared: Any, parent_size: Any) -> dict:
    """Whether a run's model was compared with the model it replaced (False: published "not compared", too few
    validation images or nothing to compare with; None: not known, a run from before this was recorded) and the
    size that model was compared at, with why ("measured on 47 annotated images ...")."""
    size = parent_size if isinstance(parent_size, dict) else {}
    return {"compared": compared if isinstance(compared, bool) else None, "not_compared": compared is False,
            "parent_img_size": _number(size.get("size")), "parent_img_size_reason": size.get("reason"),
            "parent_img_size_measured_now": bool(size.get("measured_now"))}


def run_entry(run: dict, project_id: int) -> dict:
    """One run from the history (a rejected, failed or skipped run, or a published version since pruned)."""
    return {"name": run.get("version"), "project": project_id, "status": run.get("outcome"), "in_registry": False,
            "reason": run.get("reason"), "parent": run.get("parent"), "created": _number(run.get("time")),
            "created_iso": _iso(run.get("time")), "job": run.get("job"),
            **_images(run.get("images"), run.get("negatives")),
            "train_images": _number(run.get("train_images")), "val_images": _number(run.get("val_images")),
            "train_seconds": _number(run.get("train_seconds")) or _number(run.get("job_seconds")),
            "untrained": False,
            "metrics": metrics_summary(run.get("metrics"), run.get("val_images")),
            "baseline_metrics": metrics_summary(run.get("baseline_metrics"), run.get("val_images")),
            **comparison(run.get("compared"), run.get("start_img_size"))}


def registries(settings: Settings, project_id: Optional[int]) -> list[tuple[Optional[int], Registry]]:
    """(project id, registry) pairs to list for ``project_id``; every project's and MODEL_DIR's for None."""
    if project_id is not None:
        return [(project_id, Registry.for_project(settings.model_dir, project_id)),
                (None, Registry(settings.model_dir))]
    found: list[tuple[Optional[int], Registry]] = [(int(r.root.name), r)
                                                   for r in Registry.all_projects(settings.model_dir)]
    return found + [(None, Registry(settings.model_dir))]


def project_entries(settings: Settings, project_id: int) -> list[dict]:
    """The project's versions and runs, newest first: every published version still in the registry, and every
    run of the history that is not one of them (rejected, failed, nothing to train on, or pruned since). Requests
    that waited for more annotations are no runs (``waiting_for_annotations`` says the newest)."""
    published = {v.name: version_entry(v, project_id)
                 for v in Registry.for_project(settings.model_dir, project_id).versions()}
    entries = list(published.values())
    for run in read_runs(settings.model_dir, project_id):
        if run.get("outcome") == RunOutcome.WAITING:
            continue
        if run.get("outcome") == "published" and run.get("version") in published:
            entry = published[run["version"]]
            entry["job_seconds"] = run.get("job_seconds")
            continue
        entry = run_entry(run, project_id)
        if run.get("outcome") == "published":
            entry["reason"] = f"{run.get('reason')}; since removed (KEEP_VERSIONS={settings.keep_versions})"
        entries.append(entry)
    return sorted(entries, key=lambda e: e.get("created") or 0, reverse=True)


def waiting_for_annotations(settings: Settings, project_id: int, versions: list[dict]) -> Optional[dict]:
    """While the project's newest run waited for MIN_ANNOTATIONS_FIRST_TRAINING annotations (and nothing is
    published for it): {annotations, needed, more, text}; else None."""
    if any(entry.get("in_registry") for entry in versions):
        return None
    runs = read_runs(settings.model_dir, project_id, limit=1)
    if not runs or runs[-1].get("outcome") != RunOutcome.WAITING:
        return None
    have, need = _number(runs[-1].get("annotations")), _number(runs[-1].get("annotations_needed"))
    if have is None or need is None or have >= need:
        return None
    more = need - have
    return {"annotations": have, "needed": need, "more": more, "time_iso": _iso(runs[-1].get("time")),
            "text": f"waiting for {_plural(more, 'more annotation', 'more annotations')} before the first training "
                    f"({have} of {need}, MIN_ANNOTATIONS_FIRST_TRAINING)"}


def serving_size(context, project_id: Optional[int], labels: tuple) -> Optional[dict]:
    """The size the serving model runs at and why ({size, reason, guess}), None when unknown."""
    try:
        found = context.models.serving_size(project_id, labels)
    except (NoModelError, RegistryError, OSError):
        return None
    if found is None:
        return None
    return {"size": found.size, "reason": found.reason, "guess": found.guess,
            "text": f"{found.size} ({found.reason})"}


def learning_curve(entries: list[dict]) -> list[dict]:
    """Validation mAP against the number of annotated images each trained run used, oldest first; each point
    says how many validation images it rests on and whether that is too few (the chart leaves those out)."""
    points = []
    for entry in sorted(entries, key=lambda e: e.get("created") or 0):
        metrics = entry.get("metrics") or {}
        if not all(isinstance(v, (int, float)) for v in (entry.get("images"), metrics.get("map50"))):
            continue  # not trained, or a meta.json written by hand
        mean = metrics.get("map") if isinstance(metrics.get("map"), (int, float)) else None
        points.append({"images": entry["images"], "map50": metrics["map50"], "map": mean,
                       "status": entry["status"], "name": entry.get("name"), "created_iso": entry["created_iso"],
                       "val_images": metrics.get("val_images"), "too_few": bool(metrics.get("too_few"))})
    return points


def version_details(settings: Settings, project_id: Optional[int], names: list[str]) -> list[dict]:
    """Per-version metrics for ``GET /versions``: one entry per name, in the same order (a checkpoint served
    from MODEL_PATH has no metrics)."""
    by_name: dict[str, dict] = {}
    for pid, registry in registries(settings, project_id):
        for version in registry.versions():
            by_name.setdefault(version.name, version_entry(version, pid))
    return [by_name.get(name, {"name": name, "status": "checkpoint", "in_registry": False, "metrics": None})
            for name in names]


# --------------------------------------------------------------------------------------------------------------
# The current job
# --------------------------------------------------------------------------------------------------------------

def job_progress(job: Optional[dict], time_budget: Optional[float] = None) -> Optional[dict]:
    """A job's state for people: phase, epoch of total, loss, a fraction done (0..1, None when unknown), ETA.

    Training is the part that takes time, so the fraction is epochs (and iterations inside the current epoch)
    done of those planned; while images download it is images of total. The ETA extrapolates the time the
    training phase has taken so far. ``time_budget`` (TRAIN_TIME_BUDGET_S) bounds both: training stops there
    even when epochs are left (the engine re-plans its epochs to the budget only after the first one).
    """
    if not job:
        return None
    given = job.get("progress")
    progress: dict = given if isinstance(given, dict) else {}
    phase, status = job.get("phase"), job.get("status")
    fraction: Optional[float] = None
    epoch: Any = progress.get("epoch")  # a number when known_epochs
    epochs: Any = progress.get("epochs")
    known_epochs = isinstance(epoch, (int, float)) and isinstance(epochs, (int, float)) and epochs > 0
    if phase == JobPhase.TRAINING and known_epochs:
        iteration, iterations = progress.get("iteration"), progress.get("iterations")
        within = (iteration + 1) / iterations if isinstance(iteration, int) and iterations else 0.0
        fraction = (max(0, epoch - 1) + min(1.0, within)) / epochs
    elif phase == JobPhase.EVALUATING and known_epochs:  # validation after epoch `epoch` (1-based) of training
        fraction = epoch / epochs
    elif phase == JobPhase.DOWNLOADING and progress.get("total"):
        fraction = progress.get("images", 0) / progress["total"]
    elif phase in (JobPhase.EVALUATING, JobPhase.TRAINED, JobPhase.PUBLISHING, JobPhase.SYNCING):
        fraction = 1.0  # the training itself is over
    if status == "finished" or phase == JobPhase.DONE:
        fraction = 1.0
    eta = None
    elapsed = progress.get("elapsed")
    if phase == JobPhase.TRAINING and fraction is not None and fraction < 1 and isinstance(elapsed, (int, float)):
        if time_budget:
            fraction = max(fraction, min(1.0, elapsed / time_budget))
        if fraction > 0:
            eta = elapsed * (1 - fraction) / fraction
            if time_budget:
                eta = min(eta, max(0.0, time_budget - elapsed))
    given = job.get("result")
    result: dict = given if isinstance(given, dict) else {}
    message = progress.get("message")
    if status == "finished" and result:  # say what the run ended with
        message = (f"published {result.get('model_version')}" if result.get("published") else
                   result.get("reason") if result.get("waiting") else
                   f"not published: {result.get('decision') or result.get('reason') or 'see the log'}")
    note = progress.get("epochs_note")
    epochs_text = f"{epoch} of {f'{note} ' if note else ''}{epochs}" if known_epochs and epoch else None
    return finite({"job": job.get("job"), "status": status, "phase": phase, "epoch": epoch, "epochs": epochs,
                   "epochs_note": note, "epochs_text": epochs_text,
                   "loss": progress.get("loss"), "images": progress.get("images"), "total": progress.get("total"),
                   "message": message, "fraction": None if fraction is None else min(1.0, fraction),
                   "eta_seconds": None if eta is None else round(eta, 1),
                   "started_at": job.get("started_at"), "ended_at": job.get("ended_at"),
                   "enqueued_at": job.get("enqueued_at"), "error": job.get("error"),
                   "coalesced_requests": job.get("coalesced_requests"),
                   "result_version": result.get("model_version") if result.get("published") else None})


def job_warnings(job: Optional[dict]) -> list[str]:
    """WARNING and ERROR lines of the job's log tail (the worker's warnings live there, not in this process)."""
    lines = (job or {}).get("log_tail") or []
    return [line for line in lines if isinstance(line, str) and ("[WARNING]" in line or "[ERROR]" in line)]


def current_job(context, project_id: int) -> tuple[Optional[dict], dict]:
    """(the project's running or last job with its progress, the raw /is_training answer)."""
    if context.training is None:
        return None, {"is_training": False, "job": None}
    training = context.training.status(project_id)
    job_id = training.get("job")
    job = context.training.job_status(job_id) if job_id else None
    return job, training


# --------------------------------------------------------------------------------------------------------------
# Everything for one project, and for the page
# --------------------------------------------------------------------------------------------------------------

def project_labels(context, project_id: Optional[int]) -> tuple:
    """The served RectangleLabels' (or a video project's VideoRectangle's) labels of the project's last label config
    seen by this process (() when none)."""
    config = context.label_configs.get(project_id)
    if not config:
        return ()
    try:
        parsed = parse_label_config(config)
        if is_video_config(parsed):
            return read_video_control(parsed, context.settings.from_name).labels
        return read_controls(parsed, context.settings.from_name).labels
    except LabelConfigError:
        return ()


def serving_version(context, project_id: Optional[int]) -> tuple[Optional[str], Optional[str]]:
    """(the version the project's predictions carry now, or None; why None)."""
    labels = project_labels(context, project_id)
    try:
        version = context.models.version(project_id, labels)
    except (NoModelError, RegistryError) as exc:
        return None, str(exc)
    return version, None if version else "no model yet: nothing is published and MODEL_PATH is not set"


def known_projects(context) -> list[int]:
    """Projects with a registry folder (a version or a run history) or seen in a /setup of this process."""
    folder = context.settings.model_dir
    ids = {int(r.root.name) for r in Registry.all_projects(folder)}
    ids.update(pid for pid in context.label_configs if isinstance(pid, int))
    return sorted(ids)


def pool_progress(context, project_id: int, serving: Optional[str] = None) -> Optional[dict]:
    """The project's pool scoring (every task scored by a version): state, version, done of total, failed,
    fraction, rate (tasks/s) and ETA of the newest run that started; ``queued`` ({job, version, reason,
    enqueued_iso}) while the next run waits in the queue; ``state_text``, the state as the page words it. None
    when it never ran here and none waits, or there is no queue.

    A waiting run scores the version that serves when it starts (a second publish joins the waiting job, whose
    reason still names the first), so ``queued.version`` is ``serving``, the version serving now, when given."""
    hooks = context.training
    status = hooks.pool_status(project_id) if hooks is not None and hasattr(hooks, "pool_status") else {}
    if not status:
        return None
    total, done = status.get("total", 0), status.get("done", 0)
    keep = ("state", "version", "chunks", "chunks_done", "rate", "eta_s", "reason", "error")
    queued = status.get("queued")
    if queued:
        queued = {**queued, "version": serving or queued.get("version"),
                  "enqueued_iso": _iso(queued.get("enqueued_at"))}
    return {**{k: status.get(k) for k in keep}, **{k: status.get(k, 0) for k in ("total", "done", "failed", "left")},
            "fraction": round(done / total, 4) if total else (1.0 if status.get("state") == "done" else 0.0),
            "started_iso": _iso(status.get("started_at")), "updated_iso": _iso(status.get("updated_at")),
            "queued": queued, "state_text": pool_state_text(status.get("state"), status.get("version"), queued)}


def pool_state_text(state: Optional[str], version: Optional[str], queued: Optional[dict]) -> str:
    """"queued for v3 (previous run v2: done)" while v3's run waits behind the finished v2 run; else the state
    (what the page shows, also when its script updates the card)."""
    if not queued:
        return state or "–"
    text = f"queued for {queued['version']}" if queued.get("version") else \
        f"queued ({queued.get('reason') or 'requested'})"
    return f"{text} (previous run {version}: {state})" if state and version else text


def project_status(context, project_id: int) -> dict:
    entries = project_entries(context.settings, project_id)
    serving, why = serving_version(context, project_id)
    for entry in entries:
        entry["serving"] = entry.get("name") is not None and entry.get("name") == serving
    job, training = current_job(context, project_id)
    # Changes when a version or run is added or the serving version changes: the page then reloads.
    stamp = f"{len(entries)}:{entries[0].get('created') if entries else 0}:{serving}"
    size = serving_size(context, project_id, project_labels(context, project_id)) if serving else None
    waiting = waiting_for_annotations(context.settings, project_id, entries)
    if waiting:  # the page reloads when it changes (one more annotation)
        stamp += f":{waiting['annotations']}"
    return {"project": project_id, "serving_version": serving, "serving_note": why, "stamp": stamp,
            "serving_img_size": size, "waiting_for_annotations": waiting,
            "min_annotations_first_training": context.settings.min_annotations_first_training,
            "versions": entries,
            "learning_curve": learning_curve(entries),
            "job": job_progress(job, context.settings.train_time_budget_s),
            "pool": pool_progress(context, project_id, serving),
            "effort": effort_status(context.settings, project_id),
            "job_warnings": job_warnings(job), "is_training": bool(training.get("is_training")),
            "waiting_job": training.get("waiting_job"), "pending_requests": training.get("pending_requests", 0),
            "redis": training.get("redis", "up" if context.training is not None else None)}


def queue_status(context) -> Optional[dict]:
    """The training queue: Redis reachable, workers, jobs queued / running / finished / failed, requests
    coalesced by this process, requests saved while Redis was down."""
    if context.training is None:
        return None
    metrics = context.training.metrics()
    keep = ("redis", "workers", "queued", "started", "finished", "failed", "pending_requests", "requests",
            "enqueued", "coalesced", "ignored", "queue")
    return {k: metrics.get(k) for k in keep if k in metrics}


def status(context, project_id: Optional[int] = None) -> dict:
    """``GET /status``: the whole dashboard as JSON (one project, or every known project)."""
    projects = [project_id] if project_id is not None else known_projects(context)
    return {"generated_at": time.time(), "generated_at_iso": _iso(time.time()),
            "serve_threshold": context.settings.model_score_threshold,
            "projects": [project_status(context, pid) for pid in projects],
            "queue": queue_status(context), "warnings": recent_warnings().last()}

