"""Every training run of a project, published or not: ``MODEL_DIR/projects/<id>/history.jsonl``.

The registry only keeps published versions (and prunes old ones), so a run whose model was rejected, or that
had nothing to train on, or that failed, would leave no trace outside its log file. The training job appends one
JSON line per run here; the dashboard and the Prometheus metrics read it (learning curve, "rejected and why",
training jobs by outcome).

One line per run, appended by the job that holds the project's lock (so one writer per project at a time):

    {"time": 1795461834.2, "job": "train-1-…", "event": "START_TRAINING", "outcome": "published",
     "reason": "validation fitness 0.41 >= current 0.38", "version": "v3-…", "parent": "v2-…",
     "annotated_tasks": 40, "images": 38, "negatives": 5, "boxes": 71, "image_failed": 2,
     "train_images": 30, "val_images": 8, "metrics": {...}, "baseline_metrics": {...},
     "epochs_run": 10, "train_seconds": 81.0, "job_seconds": 95.3}

``effort`` is what the model saved the annotators, per version, over every annotation the run read (a list of
``labelstudio.effort.EffortSummary`` as dicts; the newest run's is what the dashboard shows).
``outcome`` is one of OUTCOMES: "waiting" is a request before the project's first training that found fewer
annotations than MIN_ANNOTATIONS_FIRST_TRAINING (``annotations``, ``annotations_needed``); a published run with
``compared`` false was published without a comparison with the model it replaced (too few validation images).
Writing never raises: a run must not fail because its history could not be
written (a warning is logged instead). The file is trimmed to the last MAX_RUNS runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write
from ..registry import Registry
from .states import RunOutcome

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
OUTCOMES = tuple(outcome.value for outcome in RunOutcome)
MAX_RUNS = 1000

# Summary fields (of ``train_project``) copied into a run's record as they are.
_SUMMARY_FIELDS = ("event", "parent", "annotated_tasks", "negatives", "boxes", "image_failed", "cancelled_only",
                   "unknown_labels", "train_images", "val_images", "metrics", "baseline_metrics", "epochs_run",
                   "best_epoch", "stopped_by_budget", "train_seconds", "labels", "compared", "start_img_size",
                   "annotations", "annotations_needed", "effort")


def history_path(model_dir: str | os.PathLike, project_id: int) -> Path:
    return Registry.for_project(model_dir, project_id).root / HISTORY_FILE


def outcome_of(summary: dict) -> tuple[RunOutcome, Optional[str]]:
    """(outcome, reason) of a finished run's summary."""
    if summary.get("waiting"):
        return RunOutcome.WAITING, summary.get("reason")
    if not summary.get("trained"):
        return RunOutcome.SKIPPED, summary.get("reason")
    if summary.get("published"):
        return RunOutcome.PUBLISHED, summary.get("decision")
    return RunOutcome.REJECTED, summary.get("decision")


def record_run(model_dir: str | os.PathLike, project_id: int, summary: dict, job_id: Optional[str] = None,
               job_seconds: Optional[float] = None) -> Optional[dict]:
    """Append the record of a run that returned ``summary``. Returns the record (None when it was not written)."""
    outcome, reason = outcome_of(summary)
    record: dict[str, Any] = {"time": time.time(), "job": job_id, "outcome": outcome.value, "reason": reason,
                              "version": summary.get("model_version") if outcome is RunOutcome.PUBLISHED else None,
                              "images": summary.get("examples")}
    record.update({k: summary[k] for k in _SUMMARY_FIELDS if k in summary})
    record["job_seconds"] = None if job_seconds is None else round(job_seconds, 1)
    return _append(model_dir, project_id, record)


def record_failure(model_dir: str | os.PathLike, project_id: int, error: BaseException, event: Optional[str] = None,
                   job_id: Optional[str] = None, job_seconds: Optional[float] = None) -> Optional[dict]:
    """Append the record of a run that raised ``error``."""
    record = {"time": time.time(), "job": job_id, "event": event, "outcome": RunOutcome.FAILED.value,
              "reason": f"{type(error).__name__}: {error}", "version": None,
              "job_seconds": None if job_seconds is None else round(job_seconds, 1)}
    return _append(model_dir, project_id, record)


def read_runs(model_dir: str | os.PathLike, project_id: int, limit: int = MAX_RUNS) -> list[dict]:
    """The project's runs, oldest first (at most the last ``limit``); unreadable lines are skipped."""
    try:
        lines = history_path(model_dir, project_id).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    runs = []
    for line in lines[-limit:]:
        try:
            run = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash mid-write
        if isinstance(run, dict) and run.get("outcome") in OUTCOMES:
            runs.append(run)
    return runs


def served_versions(model_dir: str | os.PathLike, project_id: int) -> set[str]:
    """Every version name this backend has served the project, as far as it knows: the published versions on disk
    (the project's and the shared ones) and, from the run history, each published version and each model a run
    started from (a MODEL_PATH checkpoint, the untrained start, pruned versions). Predictions carrying one of these
    are the backend's own; it never deletes any other."""
    names = {v.name for registry in (Registry.for_project(model_dir, project_id), Registry(model_dir))
             for v in registry.versions()}
    for run in read_runs(model_dir, project_id):
        names.update(str(run[key]) for key in ("version", "parent") if run.get(key))
    return names


def _append(model_dir: str | os.PathLike, project_id: int, record: dict) -> Optional[dict]:
    path = history_path(model_dir, project_id)
    record = finite(record)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, allow_nan=False, default=str) + "\n").encode("utf-8")
        with open(path, "ab+") as f:  # appends go to the end whatever the read position
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut short by a crash: start ours on a line of its own
                    line = b"\n" + line
            f.write(line)
        _trim(path)
    except (OSError, TypeError, ValueError) as exc:
        log.warning("project %s: could not record the training run in %s: %s", project_id, path, exc)
        return None
    return record


def _trim(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) > MAX_RUNS:
        with atomic_write(path, "w") as f:
            f.writelines(lines[-MAX_RUNS:])


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, recursively (JSON has no NaN: a browser's JSON.parse
    refuses it; the metrics of a class without validation boxes are NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
