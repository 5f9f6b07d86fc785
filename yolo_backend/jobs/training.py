"""The training job: what the RQ worker runs, and the body of ``YOLOv7Backend.fit()``.

``run_training_job(project_id, event, payload, options)`` (the RQ job function, importable by path for a plain
``rq worker``) frees the project's waiting slot, takes the project's lock, and calls the backend's ``fit()``,
which calls ``train_project``:

1. read every annotated task of the project through the Label Studio API; per task the latest annotation that
   was not cancelled (a submitted annotation without boxes is a negative image);
2. download the images (shared image cache), scaled to the training size;
3. split train / validation by a hash of the task id (stable across jobs: a task never changes sides);
4. fine-tune from the current version (the project's newest published version, else MODEL_DIR's, else
   MODEL_PATH, else an untrained yolov7-tiny sized for the config's labels), bounded by TRAIN_TIME_BUDGET_S;
5. publish a new version in the project's registry when it is not worse on validation than the current model
   (or FORCE_PUBLISH), keep the last KEEP_VERSIONS;
6. store a prediction carrying the new version in Label Studio (all unlabelled tasks with REPREDICT_UNLABELED),
   then switch the project's model_version to it (Label Studio refuses a version no stored prediction carries).

Progress (phase, epoch, loss, metrics) goes to the RQ job's meta; the log to ``MODEL_DIR/jobs/<job id>.log``.
The trainer is a seam: ``trainer(data: TrainingData, callback) -> dict`` (default: the fine-tuning engine), so
tests can plug in a fast fake one by ``"module:function"`` path.

Nothing here imports torch at module level: CUDA is initialised only inside the job (after the worker's fork).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import logging
import os
import shutil
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..labelstudio.annotations import latest_annotation
from ..labelstudio.client import LabelStudioAPIError, ProjectNotFound
from ..labelstudio.regions import BadRegion, is_box_region, region_box
from ..logs import LOG_FORMAT
from ..registry import ModelVersion, Registry
from ..settings import Settings

log = logging.getLogger(__name__)

VALIDATION_PERCENT = 20           # share of tasks (by hash of the task id) used for validation
MIN_VALIDATION_IMAGES = 4         # fewer: the comparison with the current model is noise, publish
DOWNLOAD_THREADS = 4
DEFAULT_GRAPH = "yolov7-tiny"


class TrainingError(RuntimeError):
    """A training job cannot run; the message says what to fix."""


# --------------------------------------------------------------------------------------------------------------
# Data from Label Studio
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Example:
    """One annotated task: its image scaled to the training size, boxes (xyxy pixels of that image), classes."""

    task_id: int
    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray


@dataclass
class TrainingData:
    """What a trainer gets."""

    train: list[Example]
    val: list[Example]
    names: list[str]
    start_checkpoint: Optional[str]   # None: random init of DEFAULT_GRAPH
    parent_version: Optional[str]
    out_path: Path
    settings: Settings
    extra: dict = field(default_factory=dict)


Trainer = Callable[[TrainingData, Callable[[dict], None]], dict]


def annotated_tasks(client, project_id: int) -> list[dict]:
    """Every task of the project that has at least one annotation, with its annotations.

    Label Studio's JSON export lists exactly those; when a server refuses it, the task list is read page by page
    instead (a task listed without its annotations is read on its own).
    """
    try:
        return [t for t in client.export_tasks(project_id) if isinstance(t, dict) and t.get("annotations")]
    except LabelStudioAPIError as exc:
        log.info("project %s: the export failed (%s); reading the task list page by page instead", project_id, exc)
    try:
        found = []
        for task in client.tasks(project_id, with_annotations=True):
            if task.get("annotations") is None and task.get("total_annotations"):
                task = client.get_task(task["id"])
            if task.get("annotations"):
                found.append(task)
        return found
    except LabelStudioAPIError as exc:
        raise TrainingError(str(exc)) from None


def annotation_boxes(annotation: dict, target, width: int, height: int) \
        -> tuple[np.ndarray, np.ndarray, list, list[BadRegion]]:
    """The annotation's rectangles for ``target`` in pixels of a ``width`` x ``height`` image (the rule:
    labelstudio/regions.py): (boxes xyxy, class ids by the config's label order, labels that match no config
    label, bad regions skipped)."""
    index = {label.lower(): i for i, label in enumerate(target.labels)}
    boxes, classes, unknown, bad = [], [], [], []
    for region in annotation.get("result") or []:
        if not is_box_region(region, target.from_name):
            continue
        box = region_box(region, (width, height))
        if isinstance(box, BadRegion):
            bad.append(box)
            continue
        cls = index.get(box.label.lower())
        if cls is None:
            unknown.append(box.label)
            continue
        boxes.append(box.pixels(width, height))
        classes.append(cls)
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64), unknown, bad)


def is_validation(project_id: int, task_id: int) -> bool:
    """Deterministic split: a task is in the validation set iff the hash of its id says so (stable over jobs)."""
    digest = hashlib.sha256(f"{project_id}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < VALIDATION_PERCENT


def split_examples(project_id: int, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    train = [e for e in examples if not is_validation(project_id, e.task_id)]
    val = [e for e in examples if is_validation(project_id, e.task_id)]
    if not train and val:  # everything hashed to validation (tiny sets): train on all, validate on none
        return val, []
    return train, val


def scale_to(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Downscale so the long side is at most ``size`` (training resizes there anyway); returns (image, factor)."""
    from ..yolov7.preprocess import resize_long_side

    return resize_long_side(image, size, allow_upscale=False)


def collect_examples(context, project_id: int, target, tasks: list[dict], size: int,
                     report: Callable[[dict], None]) -> tuple[list[Example], dict]:
    """Tasks -> examples (images downloaded through the shared cache); counts of what was used and skipped."""
    counts = {"annotated_tasks": len(tasks), "cancelled_only": 0, "image_failed": 0, "negatives": 0, "boxes": 0,
              "unknown_labels": 0, "bad_regions": 0}
    chosen = []
    for task in tasks:
        annotation = latest_annotation(task)
        if annotation is None:
            counts["cancelled_only"] += 1
            continue
        chosen.append((task, annotation))
    done = [0]
    lock = threading.Lock()

    def load(item):
        task, annotation = item
        url = (task.get("data") or {}).get(target.data_key)
        try:
            image = context.images.load(url, task.get("id"))
        except Exception as exc:  # one bad image must not fail the job
            log.warning("task %s: image not available, not trained on: %s", task.get("id"), exc)
            return None
        finally:
            with lock:
                done[0] += 1
                report({"phase": "downloading", "images": done[0], "total": len(chosen)})
        height, width = image.shape[:2]
        boxes, classes, unknown, bad = annotation_boxes(annotation, target, width, height)
        for region in bad:
            log.warning("task %s: %s; skipped", task.get("id"), region.message)
        small, r = scale_to(image, size)
        return Example(int(task["id"]), np.ascontiguousarray(small), boxes * r, classes), unknown, bad

    examples = []
    with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="train-download") as pool:
        for item in pool.map(load, chosen):
            if item is None:
                counts["image_failed"] += 1
                continue
            example, unknown, bad = item
            counts["unknown_labels"] += len(unknown)
            counts["bad_regions"] += len(bad)
            counts["boxes"] += len(example.boxes)
            counts["negatives"] += int(len(example.boxes) == 0)
            examples.append(example)
    if counts["unknown_labels"]:
        log.warning("%d annotated box(es) carry labels that are not in the label config (%s); skipped",
                    counts["unknown_labels"], ", ".join(target.labels))
    return sorted(examples, key=lambda e: e.task_id), counts


# --------------------------------------------------------------------------------------------------------------
# The model to start from, publishing
# --------------------------------------------------------------------------------------------------------------

def current_model(settings: Settings, project_id: int) -> tuple[Optional[str], Optional[str]]:
    """(checkpoint path, version name) of the model the project is served with now, MODEL_VERSION aside (the
    server's rule, ``model_holder.resolve_source``); (None, None) when there is none."""
    from ..model_holder import NoModelError, resolve_source

    try:
        source = resolve_source(settings, project_id, use_pin=False)
    except NoModelError as exc:
        raise TrainingError(f"{exc}, or unset it to train from an untrained yolov7-tiny") from None
    return (str(source.path), source.version) if source else (None, None)


def fitness(metrics: Optional[dict]) -> float:
    """The engine's model-selection number (yolov7.metrics.fitness: 0.1 mAP@.5 + 0.9 mAP@.5:.95)."""
    from ..yolov7.metrics import fitness as engine_fitness

    return engine_fitness(metrics)


def publish_decision(settings: Settings, metrics: Optional[dict], baseline: Optional[dict],
                     val_images: int) -> tuple[bool, str]:
    if settings.force_publish:
        return True, "FORCE_PUBLISH is on"
    if val_images < MIN_VALIDATION_IMAGES:
        return True, f"only {val_images} validation image(s): too few to compare (need {MIN_VALIDATION_IMAGES})"
    if baseline is None:
        return True, "no current model with these labels to compare with"
    new, old = fitness(metrics), fitness(baseline)
    if new >= old:
        return True, f"validation fitness {new:.4f} >= current {old:.4f}"
    return False, f"validation fitness {new:.4f} < current {old:.4f} (set FORCE_PUBLISH=true to publish anyway)"


def prune_versions(registry: Registry, keep: int, protect: set[str]) -> list[str]:
    """Delete the oldest versions beyond ``keep`` (never the newest or a protected one). Returns their names."""
    if keep <= 0:
        return []
    versions = registry.versions()
    latest = registry.latest()
    removed = []
    for version in versions[:-keep] if len(versions) > keep else []:
        if version.name in protect or (latest is not None and version.name == latest.name):
            continue
        trash = version.path.with_name(f".trash-{version.name}")
        try:
            os.rename(version.path, trash)  # gone for readers at once, then deleted
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(version.name)
        except OSError as exc:
            log.warning("could not remove old version %s: %s", version.path, exc)
    return removed


# --------------------------------------------------------------------------------------------------------------
# The default trainer: the fine-tuning engine
# --------------------------------------------------------------------------------------------------------------

def fine_tune_trainer(data: TrainingData, callback: Callable[[dict], None]) -> dict:
    """Fine-tune with ``yolo_backend.yolov7.train`` and evaluate the current model on the same validation set."""
    from ..yolov7.checkpoint import load_checkpoint, model_from_checkpoint
    from ..yolov7.dataset import Sample
    from ..yolov7.train import TrainConfig, evaluate, fine_tune

    settings = data.settings

    def samples(examples):
        return [Sample(e.image, e.boxes, e.classes, name=f"task-{e.task_id}") for e in examples]

    train, val = samples(data.train), samples(data.val)
    # Few images: step the optimiser every batch (accumulating to 64 images would leave a handful of steps).
    batch = max(1, min(settings.train_batch_size, len(train)))
    nominal = batch if len(train) <= 64 else max(batch, 64)
    config = TrainConfig(
        weights=data.start_checkpoint, graph=DEFAULT_GRAPH, out=str(data.out_path),
        parent_version=data.parent_version, epochs=max(1, settings.train_epochs), img_size=settings.train_img_size,
        batch_size=batch, nominal_batch=nominal,
        device=settings.device, threads=settings.torch_threads, time_budget=settings.train_time_budget_s,
        progress="log", names=list(data.names), train_samples=train, val_samples=val or None,
        serve_conf=settings.model_score_threshold, seed=int(data.extra.get("seed", 0)))
    result = fine_tune(config, callback)
    baseline = None
    if val and data.start_checkpoint:
        callback({"phase": "evaluating", "message": "evaluating the current model on the validation set"})
        try:
            current = model_from_checkpoint(load_checkpoint(data.start_checkpoint), device="cpu", fuse=True)
            if [n.lower() for n in current.names] == [n.lower() for n in data.names]:
                baseline = evaluate(current, val, list(data.names), img_size=settings.train_img_size,
                                    serve_conf=settings.model_score_threshold)
            else:
                log.info("the current model's classes (%s) differ from the label config's (%s): not compared",
                         ", ".join(current.names), ", ".join(data.names))
        except Exception as exc:  # the comparison is advisory; training succeeded
            log.warning("could not evaluate the current model %s: %s", data.start_checkpoint, exc)
    return {"path": str(result.path), "metrics": result.metrics, "baseline_metrics": baseline,
            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "stopped_by_budget": result.stopped_by_budget, "seconds": round(result.seconds, 1)}


def import_by_path(spec: str, what: str, default_attr: str) -> Any:
    """``"package.module:name"`` -> that object (the seams a job is configured with); TrainingError otherwise."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr or default_attr)
    except (ImportError, AttributeError) as exc:
        raise TrainingError(f"{what} {spec!r} cannot be imported: {exc}") from None


def load_trainer(spec: Optional[str]) -> Trainer:
    """``"package.module:function"`` -> that function; None -> the fine-tuning engine."""
    return import_by_path(spec, "trainer", "train") if spec else fine_tune_trainer


# --------------------------------------------------------------------------------------------------------------
# fit(): the whole training run for one project
# --------------------------------------------------------------------------------------------------------------

def train_project(backend, event: str = "START_TRAINING", progress: Optional[Callable[[dict], None]] = None,
                  trainer: Optional[Trainer] = None, job_id: Optional[str] = None) -> dict:
    """Train ``backend.project_id`` on its Label Studio annotations and publish; returns a summary dict."""
    from ..labelstudio.config import find_rectangle_target, parse_label_config

    report = progress or (lambda event: None)
    context, settings = backend.context, backend.context.settings
    project_id = backend.project_id
    if project_id is None:
        raise TrainingError("training needs a project id (Label Studio sends it with every training request)")
    client = context.client()
    if client is None:
        raise TrainingError("the worker cannot read annotations: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a "
                            "personal access token or legacy token) in the worker's environment")
    started = time.monotonic()

    report({"phase": "reading annotations"})
    try:
        project = client.get_project(project_id)
    except ProjectNotFound as exc:  # a made-up or deleted project: nothing to retry
        log.warning("project %s: %s; training request dropped", project_id, exc)
        report({"phase": "done", "message": f"project {project_id} does not exist in Label Studio"})
        return {"project": project_id, "event": event, "trained": False, "published": False,
                "reason": f"project {project_id} does not exist in Label Studio ({exc})"}
    label_config = project.get("label_config") or backend.label_config
    target = find_rectangle_target(parse_label_config(label_config), settings.from_name)
    names = list(target.labels)
    tasks = annotated_tasks(client, project_id)
    examples, counts = collect_examples(context, project_id, target, tasks, settings.train_img_size, report)
    log.info("project %s: %d annotated task(s), %d usable (%d negative, %d boxes); %d with only cancelled "
             "annotations, %d image(s) failed", project_id, len(tasks), len(examples), counts["negatives"],
             counts["boxes"], counts["cancelled_only"], counts["image_failed"])
    summary: dict[str, Any] = {"project": project_id, "event": event, "labels": names, **counts,
                               "examples": len(examples)}
    if not examples:
        report({"phase": "done", "message": "nothing to train on"})
        return {**summary, "trained": False, "published": False,
                "reason": "no annotated task with a usable annotation and image"}

    outcome, version = train_and_publish(settings, project_id, examples, names, trainer, report, job_id,
                                         meta={"annotations": len(examples), "negatives": counts["negatives"],
                                               "job": job_id, "event": event})
    summary.update(outcome)
    if version is None:
        return summary

    report({"phase": "syncing label studio", "model_version": version.name})
    try:
        summary["label_studio"] = sync_label_studio(type(backend), context, client, project_id, label_config,
                                                    version.name)
    except Exception as exc:  # published anyway; the server syncs the project on its next /setup or /predict
        log.warning("project %s: could not switch Label Studio to %s yet: %s", project_id, version.name, exc)
        summary["label_studio"] = {"error": str(exc)}
    summary["seconds"] = round(time.monotonic() - started, 1)
    report({"phase": "done", "model_version": version.name, "metrics": outcome.get("metrics")})
    return summary


def train_and_publish(settings: Settings, project_id: int, examples: list[Example], names: list[str],
                      trainer: Optional[Trainer] = None, report: Optional[Callable[[dict], None]] = None,
                      job_id: Optional[str] = None, meta: Optional[dict] = None,
                      extra: Optional[dict] = None) -> tuple[dict, Optional[ModelVersion]]:
    """One training round on ``examples``, the part of ``fit()`` after the data is read: split train/validation,
    fine-tune from the current version, publish when the rule says so, prune old versions.

    Returns (summary fields, the published version or None when not published). ``meta`` goes into the published
    version's meta.json; ``extra`` to the trainer (``TrainingData.extra``). The simulator calls this too, so its
    rounds train exactly as the worker does."""
    report = report or (lambda event: None)
    train, val = split_examples(project_id, examples)
    start_checkpoint, parent = current_model(settings, project_id)
    log.info("training project %s on %d image(s), validating on %d, from %s", project_id, len(train), len(val),
             parent or f"an untrained {DEFAULT_GRAPH}")
    registry = Registry.for_project(settings.model_dir, project_id)
    work = registry.root / ".work" / (job_id or f"run-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = TrainingData(train, val, names, start_checkpoint, parent, work / "model.pt", settings,
                            dict(extra or {}))
        report({"phase": "training", "train_images": len(train), "val_images": len(val)})
        outcome = (trainer or fine_tune_trainer)(data, lambda e: report(_training_progress(e)))
        metrics, baseline = outcome.get("metrics"), outcome.get("baseline_metrics")
        publish, why = publish_decision(settings, metrics, baseline, len(val))
        summary: dict[str, Any] = dict(
            trained=True, train_images=len(train), val_images=len(val), parent=parent, metrics=metrics,
            baseline_metrics=baseline, decision=why,
            **{k: outcome[k] for k in ("epochs_run", "best_epoch", "stopped_by_budget") if k in outcome})
        if not publish:
            log.info("project %s: new model not published: %s", project_id, why)
            summary.update(published=False, model_version=parent)
            report({"phase": "done", "message": f"not published: {why}"})
            return summary, None
        report({"phase": "publishing"})
        path = Path(outcome.get("path") or data.out_path)
        if not path.is_file():
            raise TrainingError(f"the trainer reported {path}, which does not exist")
        version = registry.publish(path, {
            "project": project_id, "parent": parent, "metrics": metrics, "baseline_metrics": baseline,
            "decision": why, **(meta or {}), "train_images": len(train), "val_images": len(val),
            "labels": names, "train_seconds": outcome.get("seconds"), "img_size": settings.train_img_size})
        log.info("project %s: published %s (%s)", project_id, version.name, why)
        removed = prune_versions(registry, settings.keep_versions, {settings.model_version or ""})
        if removed:
            log.info("removed old version(s) %s (KEEP_VERSIONS=%d)", ", ".join(removed), settings.keep_versions)
        summary.update(published=True, model_version=version.name, checkpoint=str(version.checkpoint),
                       removed_versions=removed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary, version


def _training_progress(event: dict) -> dict:
    """The fine-tuning engine's callback events -> the job's progress fields."""
    phase = event.get("phase")
    keep = ("epoch", "epochs", "iteration", "iterations", "loss", "box", "obj", "cls", "lr", "elapsed", "metrics",
            "message", "seconds")
    progress = {k: event[k] for k in keep if k in event and event[k] is not None}
    if "epoch" in progress:
        progress["epoch"] = int(progress["epoch"]) + 1  # 1-based for people
    mapped = {"setup": "training", "train": "training", "epoch": "training", "eval": "evaluating",
              "done": "trained"}.get(phase, phase or "training")
    return {"phase": mapped, **progress}


# --------------------------------------------------------------------------------------------------------------
# Label Studio in sync with the new version
# --------------------------------------------------------------------------------------------------------------

def tasks_to_predict(client, project_id: int, everything: bool) -> list[dict]:
    """Unlabelled tasks of the project (all of them, or the first one); any task when none is unlabelled."""
    try:
        tasks = client.tasks(project_id, with_annotations=False)
    except LabelStudioAPIError as exc:
        raise TrainingError(str(exc)) from None
    unlabelled = [t for t in tasks if not t.get("is_labeled") and not t.get("total_annotations")]
    return (unlabelled if everything else unlabelled[:1]) or tasks[:1]


def sync_label_studio(backend_class, context, client, project_id: int, label_config: str, version: str) -> dict:
    """Store predictions of ``version`` in Label Studio (one task, or every unlabelled task with
    REPREDICT_UNLABELED), then set the project's model_version to it."""
    settings = context.settings
    if settings.model_version and settings.model_version != version:
        return {"skipped": f"MODEL_VERSION={settings.model_version} is pinned: the servers keep serving it"}
    tasks = tasks_to_predict(client, project_id, settings.repredict_unlabeled)
    if not tasks:
        return {"skipped": "the project has no tasks"}
    from ..model_holder import ModelHolder

    # A fresh holder: the job's one may still have the previous version cached for a couple of seconds.
    context.models = ModelHolder(settings, loader=context.models.loader)
    backend = backend_class(project_id=project_id, label_config=label_config, context=context)
    stored = 0
    batch = max(1, settings.predict_batch_size) * 4
    for start in range(0, len(tasks), batch):
        chunk = tasks[start:start + batch]
        predictions = backend.predict(chunk)
        for task, prediction in zip(chunk, predictions):
            if prediction.get("model_version") != version:
                raise TrainingError(f"predicted with {prediction.get('model_version')} instead of {version}; is "
                                    "MODEL_DIR the same for the worker and the servers?")
            try:
                client.create_prediction(task["id"], prediction.get("result", []), prediction.get("score"), version)
            except LabelStudioAPIError as exc:
                raise TrainingError(str(exc)) from None
            stored += 1
    client.set_project_model_version(project_id, version)
    log.info("project %s: stored %d prediction(s) of %s and set the project's model_version to it", project_id,
             stored, version)
    return {"predictions_stored": stored, "model_version": version}


# --------------------------------------------------------------------------------------------------------------
# The RQ job
# --------------------------------------------------------------------------------------------------------------

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
        self.update({"log_file": str(self.log_path), "pid": os.getpid(), "phase": "started"}, force=True)
        if self.job is not None:
            self._flusher.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if exc is not None:
            log.error("training job failed: %s: %s", type(exc).__name__, exc)
            self.update({"phase": "failed", "error": f"{type(exc).__name__}: {exc}"}, force=True)
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
        # "<host>:<pid>": on the same machine a dead work horse is known at once (jobs.keys.holder_alive).
        self.connection.set(self.keys.alive(self.job_id), f"{socket.gethostname()}:{os.getpid()}", ex=self.ttl)
        if self.lock_key:
            from .keys import text

            if text(self.connection.get(self.lock_key)) == self.job_id:
                self.connection.expire(self.lock_key, self.ttl)

    def _run(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl / 4)):
            with contextlib.suppress(Exception):
                self.beat()


@contextlib.contextmanager
def _project_lock(connection, keys, heartbeat: _Heartbeat, project_id: int, job_id: str, ttl: int, reporter):
    """At most one training job per project at a time: wait for the lock. A holder known dead (its work horse is
    gone, or its heartbeat expired) has its lock released at once, so the next job does not wait out the TTL."""
    from .keys import DELETE_IF_EQUAL, holder_alive, text

    key = keys.lock(project_id)
    said = False
    while not connection.set(key, job_id, nx=True, ex=max(2, int(ttl))):
        holder = text(connection.get(key))
        if holder and not holder_alive(connection, keys, holder):
            if connection.eval(DELETE_IF_EQUAL, 1, key, holder):
                log.info("job %s of project %s held the training lock but its process is gone: lock released",
                         holder, project_id)
            continue
        if not said:
            log.info("job %s of project %s is training; waiting for it to finish", holder, project_id)
            reporter.progress({"phase": "waiting", "message": f"waiting for job {holder} of this project"})
            said = True
        time.sleep(1.0)
    heartbeat.lock_key = key
    try:
        yield
    finally:
        heartbeat.lock_key = None
        with contextlib.suppress(Exception):
            connection.eval(DELETE_IF_EQUAL, 1, key, job_id)


# The backend whose fit() a job runs, named by path: the job layer imports no backend (nor the server it builds on).
DEFAULT_BACKEND = "yolo_backend.backend:YOLOv7Backend"


def run_training_job(project_id: int, event: str = "START_TRAINING", payload: Optional[dict] = None,
                     options: Optional[dict] = None) -> dict:
    """The RQ job (``yolo_backend.jobs.training.run_training_job``): train one project and publish."""
    from rq import get_current_job

    from ..runtime import BackendContext
    from . import history
    from .keys import DELETE_IF_EQUAL, LOCK_TTL_S, SETTLE_S, Keys

    options = {"settle_s": SETTLE_S, "lock_ttl": LOCK_TTL_S, "trainer": None, "backend": DEFAULT_BACKEND,
               **(options or {})}
    job = get_current_job()
    settings = Settings.from_env()
    project_id = int(project_id)
    with JobReporter(job, settings) as reporter:
        log.info("training job %s for project %s (%s) in process %d", job.id if job else "-", project_id, event,
                 os.getpid())
        trainer = load_trainer(options.get("trainer"))
        lock = contextlib.nullcontext()
        heartbeat = contextlib.nullcontext()
        if job is not None:
            keys = Keys(job.origin)
            heartbeat = _Heartbeat(job.connection, keys, job.id, options["lock_ttl"])
        with heartbeat:
            if job is not None:
                lock = _project_lock(job.connection, keys, heartbeat, project_id, job.id, options["lock_ttl"],
                                     reporter)
            with lock:
                if job is not None:
                    # Only now, holding the project's lock and before reading the annotations, a new trigger
                    # queues a new job; until here (another job of the project trains) triggers coalesce into
                    # this one, so a burst never leaves more than one job waiting.
                    job.connection.eval(DELETE_IF_EQUAL, 1, keys.waiting(project_id), job.id)
                _clean_leftovers(settings, project_id)
                time.sleep(max(0.0, float(options["settle_s"])))  # let Label Studio finish saving
                backend_class = import_by_path(options["backend"], "backend class", "YOLOv7Backend")
                backend = backend_class(project_id=project_id, context=BackendContext.from_settings(settings))
                run_started = time.monotonic()
                try:
                    result = backend.fit(event, payload or {}, progress=reporter.progress, trainer=trainer,
                                         job_id=job.id if job else None)
                except Exception as exc:  # kept in the project's run history (dashboard), then the job fails
                    error = no_space_error(exc, settings.model_dir) or exc
                    history.record_failure(settings.model_dir, project_id, error, event, job.id if job else None,
                                           time.monotonic() - run_started)
                    if error is exc:
                        raise
                    raise error from exc
                history.record_run(settings.model_dir, project_id, result, job.id if job else None,
                                   time.monotonic() - run_started)
        reporter.update({"phase": "done", "result_version": result.get("model_version")}, force=True)
        return result


# torch's checkpoint writer reports a full disk as "PytorchStreamWriter failed writing file ..." / "[enforce fail at
# inline_container.cc]" without the OS error: told apart by how little space is left.
_TORCH_WRITE_FAILURES = ("file write failed", "enforce fail at inline_container", "No space left on device")
_LOW_SPACE_BYTES = 256 * 1024 * 1024


def no_space_error(exc: BaseException, model_dir: str | os.PathLike) -> Optional[TrainingError]:
    """A TrainingError saying "no space left on device in MODEL_DIR" when ``exc`` is a full disk, else None."""
    chain, seen = [], exc
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


def _clean_leftovers(settings: Settings, project_id: int) -> None:
    """Remove what a killed job of this project left (its work folder, a half-copied publish). Never served:
    the registry only lists whole version folders."""
    root = Registry.for_project(settings.model_dir, project_id).root
    for pattern in (".work", ".publish-*", ".trash-*"):
        for path in root.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
