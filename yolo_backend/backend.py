"""YOLOv7Backend: the Label Studio ML backend for the YOLOv7 fire/smoke detector, in the classic contract.

A thin adapter: predictions come from ``predictor.Predictor`` (label config -> target and labels, the model, images,
boxes, regions, task score), training from ``jobs.training``. The server (``server/``) is handed this class
(``create_app(YOLOv7Backend)``) and never imports it. The repository-root ``model_backend.py`` re-exports it for the
classic ``label-studio-ml init --script model_backend.py`` flow (see ``_base_classes``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from .model_holder import NoModelError
from .predictor import Predictor
from .registry import Registry, RegistryError
from .server.base import NO_MODEL_VERSION, Answer, LabelStudioMLBase

log = logging.getLogger(__name__)

_said: set = set()


def _base_classes() -> tuple:
    """Our base class; plus the classic one when the label-studio-ml 1.0.x runtime has loaded it.

    ``label-studio-ml init --script model_backend.py`` and the ``_wsgi.py`` it generates import
    ``label_studio_ml.model`` before this script, and its server refuses a class that is not a subclass of its own
    ``LabelStudioMLBase``. Our base comes first in the MRO, so our constructor and methods are the ones used. We
    only look in ``sys.modules`` (never import it ourselves: importing it changes the multiprocessing start
    method), and the classic class is not bound to a name here, so ``init`` finds exactly one backend class.
    """
    classic = getattr(sys.modules.get("label_studio_ml.model"), "LabelStudioMLBase", None)
    if isinstance(classic, type) and classic is not LabelStudioMLBase:
        return (LabelStudioMLBase, classic)
    return (LabelStudioMLBase,)


class YOLOv7Backend(*_base_classes()):  # type: ignore[misc]  # bases chosen at import time
    """Predicts RectangleLabels boxes with per-region scores and an active-learning task score."""

    def setup(self) -> None:
        self.predictor = Predictor(self.context)
        try:  # cheap: a registry name or the checkpoint's cached sha256; never loads the model
            self.model_version = self.predictor.version(self.project_id, self.label_config) or NO_MODEL_VERSION
        except (NoModelError, RegistryError) as exc:
            # Connecting and the other endpoints keep working; /predict answers with this message.
            if str(exc) not in _said:
                _said.add(str(exc))
                log.error("no usable model: %s", exc)
            self.model_version = NO_MODEL_VERSION

    def versions(self) -> list[str]:
        names = Registry.version_names(self.context.settings.model_dir, self.project_id)
        if self.model_version not in names and self.model_version != NO_MODEL_VERSION:
            names.append(self.model_version)
        return names

    def predict(self, tasks: list[dict], **kwargs: Any) -> list[dict]:
        return self.answer(tasks, **kwargs).items

    def answer(self, tasks: list[dict], **kwargs: Any) -> Answer:
        run = self.predictor.predict(self.project_id, self.label_config, tasks)
        self.model_version = run.version
        return Answer(run.items, run.version, run.unfinished)

    def fit(self, tasks: Any = (), workdir: Optional[str] = None, **kwargs: Any) -> dict:
        """Train on every annotation of the project (read from Label Studio, not from ``tasks`` or ``data``),
        publish a new version when it is not worse, and switch Label Studio to it. Runs in the RQ worker (see
        yolo_backend/jobs/training.py); returns the run's summary (metrics, version, paths). Called the classic
        ways (``fit((), event=..., data=..., job_id=...)``, ``fit(tasks, workdir)``) or as ``fit(event, data)``."""
        from .jobs.training import train_project

        event, _ = self.training_event(tasks, workdir, kwargs.get("event"), kwargs.get("data"))
        return train_project(self.context, self.project_id, event, progress=kwargs.get("progress"),
                             trainer=kwargs.get("trainer"), job_id=kwargs.get("job_id"), label_config=self.label_config)
