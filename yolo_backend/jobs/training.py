"""A training run for one project (the body of ``YOLOv7Backend.fit()``), top to bottom:

1. read every annotated task through the Label Studio API; a project that has published nothing yet waits for
   MIN_ANNOTATIONS_FIRST_TRAINING usable annotations (an annotated clip counts as one; the run ends at once,
   outcome "waiting"); then its images (``dataset``) and, for a config with a VideoRectangle, sampled frames of
   its annotated clips (``project_controls``, ``video_dataset``);
2. split train / validation by task id; find the size the model serving the project is compared at, measuring it
   when its checkpoint records none (``sizing``); fine-tune from it, bounded by TRAIN_TIME_BUDGET_S (``trainer``),
   publish when not worse on validation, or "not compared" when the split is too small to say, and prune
   (``publish``);
3. switch Label Studio to the new version (``sync``) and queue the scoring of every task with it (``pool``).

The RQ job that runs it is ``job.run_training_job``. Progress goes to the ``progress`` callback (the job's meta):
phases "reading annotations", "downloading", "measuring", "preparing", "training" (epoch of a steady estimate of
the total, ``TrainingProgress``), "evaluating", "publishing", "syncing label studio", "done".
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

from ..labelstudio.client import ProjectNotFound
from ..model_holder import untrained_checkpoint
from ..yolov7.untrained import UNTRAINED_VERSION
from ..registry import ModelVersion, Registry
from ..settings import Settings
from . import TrainingError
from .dataset import (DEFAULT_GRAPH, Example, Trainer, TrainingData, annotated_tasks, collect_examples, split_examples,
                      usable_annotations)
from .effort import annotation_effort
from .project_controls import read_project_controls, video_training
from .publish import current_model, prune_versions, publish_decision
from .sizing import SizeEvaluator, start_model_size
from .sync import sync_label_studio
from .trainer import fine_tune_trainer
from .states import JobPhase

log = logging.getLogger(__name__)

def train_project(context, project_id: Optional[int], event: str = "START_TRAINING",
                  progress: Optional[Callable[[dict], None]] = None, trainer: Optional[Trainer] = None,
                  job_id: Optional[str] = None, label_config: Optional[str] = None) -> dict:
    """Train the project (``context``: a ``runtime.BackendContext``) on its Label Studio annotations and publish;
    returns a summary dict. ``label_config``: used when Label Studio's project has none."""
    from ..labelstudio.config import parse_label_config

    report = progress or (lambda event: None)
    settings = context.settings
    if project_id is None:
        raise TrainingError("training needs a project id (Label Studio sends it with every training request)")
    client = context.client()
    if client is None:
        raise TrainingError("the worker cannot read annotations: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a "
                            "personal access token or legacy token) in the worker's environment")
    started = time.monotonic()

    report({"phase": JobPhase.READING_ANNOTATIONS})
    try:
        context.connection.require(project_id)  # the key reads and writes only where this backend is connected
        project = client.get_project(project_id)
    except ProjectNotFound as exc:  # a made-up, deleted or foreign project: nothing to retry
        log.warning("project %s: %s; training request dropped", project_id, exc)
        report({"phase": JobPhase.DONE, "message": f"project {project_id} does not exist in Label Studio"})
        return {"project": project_id, "event": event, "trained": False, "published": False,
                "reason": f"project {project_id} does not exist in Label Studio ({exc})"}
    label_config = project.get("label_config") or label_config
    read = read_project_controls(parse_label_config(label_config), settings.from_name, project_id)
    names = read.names
    tasks = annotated_tasks(client, project_id)
    effort = annotation_effort(client, settings.model_dir, project_id, read.image_tasks(tasks), read.box_names)
    waiting = first_training_wait(settings, project_id, usable_annotations(tasks), read.kind)
    if waiting is not None:
        log.info("project %s: %s", project_id, waiting["reason"])
        report({"phase": JobPhase.DONE, "message": waiting["reason"]})
        return {"project": project_id, "event": event, "labels": names, "annotated_tasks": len(tasks),
                "trained": False, "published": False, "effort": effort, **waiting}
    video = video_training(context, read.video) if read.video is not None else None
    examples, counts = collect_examples(context, project_id, read.target, tasks, settings.train_img_size, report,
                                        read.controls, video)
    log_counts(project_id, len(tasks), examples, counts)
    summary: dict[str, Any] = {"project": project_id, "event": event, "labels": names, **counts,
                               "examples": len(examples), "effort": effort}
    if not examples:
        report({"phase": JobPhase.DONE, "message": "nothing to train on"})
        return {**summary, "trained": False, "published": False,
                "reason": f"no annotated task with a usable annotation and {read.item}"}

    outcome, version = train_and_publish(settings, project_id, examples, names, trainer, report, job_id,
                                         meta={"annotations": len({e.task_id for e in examples}),  # a clip: one
                                               "negatives": counts["negatives"],
                                               "job": job_id, "event": event,
                                               **{k: counts[k] for k in ("video_tasks", "video_frames")
                                                  if k in counts}})
    summary.update(outcome)
    if version is None:
        return summary

    report({"phase": JobPhase.SYNCING, "model_version": version.name})
    try:
        summary["label_studio"] = sync_label_studio(context, client, project_id, label_config,
                                                    version.name)
    except Exception as exc:  # published anyway; the server syncs the project on its next /setup or /predict
        log.warning("project %s: could not switch Label Studio to %s yet: %s", project_id, version.name, exc)
        summary["label_studio"] = {"error": str(exc)}
    summary["pool_scoring"] = queue_pool_scoring(settings, project_id, version.name)
    summary["seconds"] = round(time.monotonic() - started, 1)
    report({"phase": JobPhase.DONE, "model_version": version.name, "metrics": outcome.get("metrics")})
    return summary


def log_counts(project_id: int, tasks: int, examples: list[Example], counts: dict) -> None:
    """One line: what the run read and used (the clips' counts when the project has a VideoRectangle)."""
    clips = ""
    if "video_tasks" in counts:
        clips = (f"; {counts['video_tasks']} annotated clip(s) gave {counts['video_frames']} frame(s), "
                 f"{counts['video_failed']} clip(s) failed")
    log.info("project %s: %d annotated task(s), %d usable example(s) (%d negative, %d boxes); %d with only "
             "cancelled annotations, %d with a class chosen but no box drawn, %d image(s) failed%s", project_id,
             tasks, len(examples), counts["negatives"], counts["boxes"], counts["cancelled_only"],
             counts["class_chosen_without_box"], counts["image_failed"], clips)


def first_training_wait(settings: Settings, project_id: int, annotations: int, kind: str = "images") \
        -> Optional[dict]:
    """The summary fields of a run that waits for more annotations (a project that has published no version yet
    and has fewer than MIN_ANNOTATIONS_FIRST_TRAINING usable annotations), else None. An annotated clip is one
    annotation, as an image is: one task an annotator finished. ``kind``: what the project's tasks are ("images",
    "clips", "images and clips")."""
    need = settings.min_annotations_first_training
    if annotations >= need or Registry.for_project(settings.model_dir, project_id).versions():
        return None
    more = need - annotations
    return {"waiting": True, "annotations": annotations, "annotations_needed": need,
            "reason": f"waiting for {more} more annotation{'s' if more != 1 else ''}: the first training needs {need} "
                      f"annotated {kind} (MIN_ANNOTATIONS_FIRST_TRAINING), the project has {annotations}"}


def queue_pool_scoring(settings: Settings, project_id: int, version: str) -> dict:
    """After a publish, in an RQ job: queue the project's pool scoring on the same queue (POOL_SCORING)."""
    if not settings.pool_scoring:
        return {"skipped": "POOL_SCORING is off"}
    if settings.model_version and settings.model_version != version:
        return {"skipped": f"MODEL_VERSION={settings.model_version} is pinned"}
    from rq import get_current_job

    from .pool import enqueue_pool_run

    job = get_current_job()
    if job is None:
        log.info("project %s: not in a worker job, pool scoring not queued (run `python -m yolo_backend score-pool "
                 "--project %s`)", project_id, project_id)
        return {"skipped": "not in a worker job"}
    try:
        return enqueue_pool_run(job.connection, job.origin, project_id, f"published {version}",
                                max_waiting=settings.max_queued_projects)
    except Exception as exc:  # published anyway: the next publish or `score-pool` scores the pool
        log.warning("project %s: could not queue pool scoring: %s", project_id, exc)
        return {"error": str(exc)}


def train_and_publish(settings: Settings, project_id: int, examples: list[Example], names: list[str],
                      trainer: Optional[Trainer] = None, report: Optional[Callable[[dict], None]] = None,
                      job_id: Optional[str] = None, meta: Optional[dict] = None,
                      extra: Optional[dict] = None, size_evaluator: Optional[SizeEvaluator] = None) \
        -> tuple[dict, Optional[ModelVersion]]:
    """One training round on ``examples``, the part of ``fit()`` after the data is read: split train/validation,
    find the size the current version is compared at (measured on ``examples`` when its checkpoint records none;
    ``size_evaluator`` replaces the engine there), fine-tune from it, publish when the rule says so, prune old
    versions.

    Returns (summary fields, the published version or None when not published). ``meta`` goes into the published
    version's meta.json; ``extra`` to the trainer (``TrainingData.extra``). The simulator calls this too, so its
    rounds train exactly as the worker does."""
    report = report or (lambda event: None)
    train, val = split_examples(project_id, examples)
    start_checkpoint, parent = current_model(settings, project_id)
    if start_checkpoint is None:  # what served the project: the shared untrained model for its labels
        start_checkpoint, parent = str(untrained_checkpoint(settings.model_dir, names)[0]), UNTRAINED_VERSION
    log.info("training project %s on %d image(s), validating on %d, from %s", project_id, len(train), len(val),
             parent or f"an untrained {DEFAULT_GRAPH}")
    start_size = start_model_size(settings, start_checkpoint, parent, examples, names, project_id, job_id, report,
                                  size_evaluator)
    if settings.img_size is not None and settings.img_size != settings.train_img_size:
        log.info("the new model is compared at TRAIN_IMG_SIZE=%d but will serve at IMG_SIZE=%d",
                 settings.train_img_size, settings.img_size)
    registry = Registry.for_project(settings.model_dir, project_id)
    work = registry.work_folder(job_id or f"run-{os.getpid()}")
    try:
        data = TrainingData(train, val, names, start_checkpoint, parent, work / "model.pt", settings,
                            dict(extra or {}), start_size.size)
        report({"phase": JobPhase.PREPARING, "train_images": len(train), "val_images": len(val),
                "message": f"preparing {len(train)} training and {len(val)} validation images"})
        outcome = (trainer or fine_tune_trainer)(data, TrainingProgress(settings.train_epochs, report))
        metrics, baseline = outcome.metrics, outcome.baseline_metrics
        decision = publish_decision(settings, metrics, baseline, len(val), outcome.fitness_se)
        why = decision.why
        summary: dict[str, Any] = dict(
            trained=True, train_images=len(train), val_images=len(val), parent=parent, metrics=metrics,
            baseline_metrics=baseline, fitness_se=outcome.fitness_se, decision=why, compared=decision.compared,
            start_img_size=start_size.meta(),
            **{k: getattr(outcome, k) for k in ("epochs_run", "best_epoch", "stopped_by_budget")
               if getattr(outcome, k) is not None})
        if not decision.publish:
            log.info("project %s: new model not published: %s", project_id, why)
            summary.update(published=False, model_version=parent)
            report({"phase": JobPhase.DONE, "message": f"not published: {why}"})
            return summary, None
        report({"phase": JobPhase.PUBLISHING})
        path = Path(outcome.path or data.out_path)
        if not path.is_file():
            raise TrainingError(f"the trainer reported {path}, which does not exist")
        version = registry.publish(path, {
            "project": project_id, "parent": parent, "metrics": metrics, "baseline_metrics": baseline,
            "decision": why, "compared": decision.compared, "parent_img_size": start_size.meta(), **(meta or {}),
            "train_images": len(train), "val_images": len(val), "labels": names,
            "train_seconds": outcome.seconds, "img_size": settings.train_img_size})
        log.info("project %s: published %s (%s)", project_id, version.name, why)
        removed = prune_versions(registry, settings.keep_versions, {settings.model_version or ""})
        if removed:
            log.info("removed old version(s) %s (KEEP_VERSIONS=%d)", ", ".join(removed), settings.keep_versions)
        summary.update(published=True, model_version=version.name, checkpoint=str(version.checkpoint),
                       removed_versions=removed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary, version


class TrainingProgress:
    """The fine-tuning engine's callback events -> the job's progress fields, sent to ``report``.

    The engine re-plans its epochs to the time budget after each one (from the mean of the last 3 epoch times),
    so its total moves (14, 17, 14, 13). People get a steady estimate: before any epoch has been timed, the plan
    (TRAIN_EPOCHS) as an upper bound ("at most 30"); then the lower median of the plans of the last PLANS_KEPT
    epochs ("about 14"), never below the epoch running. Phases: the engine's "setup" is "preparing" (with its
    own message, so no "reading data" stays behind), train/epoch events are "training", "eval" is "evaluating".
    """

    PLANS_KEPT = 5
    PHASES: dict[Optional[str], JobPhase] = {  # the engine's words -> the job's
        "setup": JobPhase.PREPARING, "train": JobPhase.TRAINING, "epoch": JobPhase.TRAINING,
        "eval": JobPhase.EVALUATING, "done": JobPhase.TRAINED}

    def __init__(self, max_epochs: int, report: Callable[[dict], None]):
        self.max_epochs, self.report = max(1, int(max_epochs)), report
        self.plans: deque[tuple[int, int]] = deque(maxlen=self.PLANS_KEPT)  # (epoch, its planned total)

    def __call__(self, event: dict) -> None:
        self.report(self.fields(event))

    def fields(self, event: dict) -> dict:
        phase = event.get("phase")
        keep = ("epoch", "epochs", "iteration", "iterations", "loss", "box", "obj", "cls", "lr", "elapsed",
                "metrics", "message", "seconds")
        progress = {k: event[k] for k in keep if k in event and event[k] is not None}
        if isinstance(event.get("epoch"), int):
            progress["epoch"] = event["epoch"] + 1  # 1-based for people
            if isinstance(event.get("epochs"), int):
                progress["epochs"], progress["epochs_note"] = self.estimate(event["epoch"], event["epochs"])
        if phase == "setup":
            progress["message"] = "preparing the training data and the model"
        return {"phase": self.PHASES.get(phase, phase or JobPhase.TRAINING), **progress}

    def estimate(self, epoch: int, planned: int) -> tuple[int, Optional[str]]:
        """(total to show, "about" / "at most" / None) at 0-based ``epoch`` whose plan is ``planned``."""
        if epoch >= 1 and (not self.plans or self.plans[-1][0] != epoch):
            self.plans.append((epoch, planned))  # the plan made when this epoch started (timed epochs behind it)
        if not self.plans:  # the time budget may end the run before the epochs it plans
            return planned, "at most"
        ordered = sorted(total for _, total in self.plans)
        total = max(ordered[(len(ordered) - 1) // 2], epoch + 1)
        return total, None if total == self.max_epochs else "about"
