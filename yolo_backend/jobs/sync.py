"""Label Studio in step with a new version: store one prediction carrying it, then switch the project's
model_version to it (Label Studio refuses a version that no stored prediction carries) and, with
UNCERTAINTY_SAMPLING, its sampling. Pool scoring (``pool``) then stores one for every task."""

from __future__ import annotations

import logging

from ..labelstudio.client import LabelStudioAPIError
from . import TrainingError

log = logging.getLogger(__name__)

def tasks_to_predict(client, project_id: int) -> list[dict]:
    """The project's first unlabelled task; any task when none is unlabelled."""
    try:
        tasks = client.tasks(project_id, with_annotations=False)
    except LabelStudioAPIError as exc:
        raise TrainingError(str(exc)) from None
    unlabelled = [t for t in tasks if not t.get("is_labeled") and not t.get("total_annotations")]
    return unlabelled[:1] or tasks[:1]


def sync_label_studio(backend_class, context, client, project_id: int, label_config: str, version: str) -> dict:
    """Store one prediction of ``version`` in Label Studio, then set the project's model_version to it (and its
    sampling with UNCERTAINTY_SAMPLING)."""
    settings = context.settings
    if settings.model_version and settings.model_version != version:
        return {"skipped": f"MODEL_VERSION={settings.model_version} is pinned: the servers keep serving it"}
    tasks = tasks_to_predict(client, project_id)
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
    if settings.uncertainty_sampling:
        client.ensure_uncertainty_sampling(project_id)
    log.info("project %s: stored %d prediction(s) of %s and set the project's model_version to it", project_id,
             stored, version)
    return {"predictions_stored": stored, "model_version": version}
