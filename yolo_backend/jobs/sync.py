"""Label Studio in step with a new version: store one prediction carrying it, then switch the project's
model_version to it (Label Studio refuses a version that no stored prediction carries) and, with
UNCERTAINTY_SAMPLING, its sampling. Pool scoring (``pool``) then stores one for every task."""

from __future__ import annotations

import logging
from typing import Optional

from ..labelstudio.client import LabelStudioAPIError
from ..labelstudio.version_sync import switch_version
from . import TrainingError

log = logging.getLogger(__name__)

def task_to_predict(client, project_id: int) -> dict | None:
    """The project's first unlabelled task; any task when none is unlabelled; None when it has none."""
    try:
        tasks = client.tasks(project_id, with_annotations=False)
    except LabelStudioAPIError as exc:
        raise TrainingError(str(exc)) from None
    unlabelled = [t for t in tasks if not t.get("is_labeled") and not t.get("total_annotations")]
    return (unlabelled or tasks or [None])[0]


def sync_label_studio(context, client, project_id: int, label_config: Optional[str], version: str) -> dict:
    """Store one prediction of ``version`` in Label Studio, then set the project's model_version to it (and its
    sampling with UNCERTAINTY_SAMPLING) through ``switch_version``."""
    from ..predictor import Predictor

    settings = context.settings
    if settings.model_version and settings.model_version != version:
        return {"skipped": f"MODEL_VERSION={settings.model_version} is pinned: the servers keep serving it"}
    task = task_to_predict(client, project_id)
    if task is None:
        return {"skipped": "the project has no tasks"}
    context.models.refresh(project_id)  # the job's holder may still have the previous version cached
    run = Predictor(context).predict(project_id, label_config, [task])
    if run.version != version:
        raise TrainingError(f"predicted with {run.version} instead of {version}; is MODEL_DIR the same for the "
                            "worker and the servers?")
    prediction = run.items[0]
    try:
        client.create_prediction(task["id"], prediction.get("result", []), prediction.get("score"), version)
    except LabelStudioAPIError as exc:
        raise TrainingError(str(exc)) from None
    switched = switch_version(client, context.connection, project_id, version, settings.uncertainty_sampling)
    log.info("project %s: stored a prediction of %s; the project's model_version: %s", project_id, version,
             switched.value)
    return {"predictions_stored": 1, "model_version": version, "switch": switched.value}
