"""What the model saved the annotators, worked out by each training run over the annotations it read
(``labelstudio/effort.py`` has the rule); the run's history line keeps it (``effort``) for the dashboard."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Optional

from ..labelstudio.client import LabelStudioAPIError
from ..labelstudio.effort import needs_predictions, version_effort, with_predictions

log = logging.getLogger(__name__)


def annotation_effort(client, project_id: int, tasks: list[dict], from_name: Optional[str]) -> Optional[list[dict]]:
    """Per version, as the run history keeps it; None when it could not be worked out (the run goes on: it is a
    report, not the training). Reads the project's predictions in full when the export listed them by id."""
    try:
        if needs_predictions(tasks):
            tasks = with_predictions(tasks, client.prediction_records(project_id))
        return [asdict(summary) for summary in version_effort(tasks, from_name)]
    except LabelStudioAPIError as exc:
        log.warning("project %s: could not read the predictions to work out the annotation effort: %s",
                    project_id, exc)
    except Exception as exc:  # odd task JSON must not fail a training
        log.warning("project %s: could not work out the annotation effort: %s", project_id, exc)
    return None
