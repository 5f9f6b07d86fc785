"""What the model saved the annotators, worked out by each training run over the annotations it read
(``labelstudio/effort.py`` has the rule); the run's history line keeps the numbers per version (``effort``) for the
dashboard.

Each task's own record is kept too, in ``MODEL_DIR/projects/<id>/effort-tasks.json`` (one per annotation the run
read; rewritten whole by each run, which holds the project's lock): pool scoring deletes a task's older predictions
once a new version serves, so a later run could no longer tell which prediction an annotation started from, and
uses what an earlier run measured instead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write
from ..labelstudio.client import LabelStudioAPIError
from ..labelstudio.effort import (BoxControls, TaskEffort, needs_predictions, remembered_or_new, summarise,
                                  task_efforts, with_predictions)
from ..registry import Registry

log = logging.getLogger(__name__)

TASKS_FILE = "effort-tasks.json"


def tasks_path(model_dir: str | os.PathLike, project_id: int) -> Path:
    return Registry.for_project(model_dir, project_id).root / TASKS_FILE


def read_task_efforts(path: Path) -> dict[Any, TaskEffort]:
    """The records of the last run, by annotation id ({} when there are none or the file is unreadable)."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found = (TaskEffort.from_record(item) for item in items if isinstance(item, dict)) \
        if isinstance(items, list) else ()
    return {e.annotation_id: e for e in found if e is not None and e.annotation_id is not None}


def annotation_effort(client, model_dir: str | os.PathLike, project_id: int, tasks: list[dict],
                      from_name: BoxControls) -> Optional[list[dict]]:
    """Per version, as the run history keeps it; None when it could not be worked out (the run goes on: it is a
    report, not the training). Reads the project's predictions in full when the export listed them by id."""
    path = tasks_path(model_dir, project_id)
    try:
        if needs_predictions(tasks):
            tasks = with_predictions(tasks, client.prediction_records(project_id))
        efforts = remembered_or_new(task_efforts(tasks, from_name), read_task_efforts(path))
        with atomic_write(path, "w") as f:
            json.dump([e.record() for e in efforts], f, default=str)
        return [asdict(summary) for summary in summarise(efforts)]
    except LabelStudioAPIError as exc:
        log.warning("project %s: could not read the predictions to work out the annotation effort: %s",
                    project_id, exc)
    except Exception as exc:  # odd task JSON or a full disk must not fail a training
        log.warning("project %s: could not work out the annotation effort: %s", project_id, exc)
    return None
