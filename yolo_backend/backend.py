"""YOLOv7Backend: the Label Studio ML backend for the YOLOv7 fire/smoke detector.

Thin glue over the layers below it: the label config says where boxes go, the model holder gives the loaded
detector, the image fetcher gets the task images, the detector finds boxes, active learning scores tasks, and
``labelstudio.results`` writes the JSON Label Studio stores; ``fit()`` hands training to ``jobs.training``.

The top layer of the package: the server (``server/``) is handed this class (``create_app(YOLOv7Backend)``) and
the training job names it by path, so neither imports it. The repository-root ``model_backend.py`` re-exports it
for the classic ``label-studio-ml init --script model_backend.py`` flow (see ``_base_classes``).
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .active_learning import task_score
from .labelstudio.config import (
    LabelConfigError,
    LabelMapping,
    RectangleTarget,
    find_rectangle_target,
    map_classes_to_labels,
    parse_label_map,
)
from .labelstudio.images import ImageFetchError, shown_url
from .labelstudio.urls import cut
from .labelstudio.client import LabelStudioAuthError
from .labelstudio.results import detections_to_regions, failed_task_prediction, task_prediction
from .registry import Registry, RegistryError
from .server.base import NO_MODEL_VERSION, LabelStudioMLBase
from .model_holder import LoadedModel, NoModelError

log = logging.getLogger(__name__)

# Parallel image downloads per request (downloads wait on the network, not the CPU).
DOWNLOAD_THREADS = 8

# A task whose data has no field for the config's image (not worth asking again, unlike a failed download).
NO_IMAGE_FIELD = object()

_logged: set = set()


def _log_once(key, level: int, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, message, *args)


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


@dataclass(frozen=True)
class _Serving:
    target: RectangleTarget   # the label config's RectangleLabels control
    model: LoadedModel        # detector, class names, version
    mapping: LabelMapping     # model classes -> labels


class YOLOv7Backend(*_base_classes()):
    """Predicts RectangleLabels boxes with per-region scores and an active-learning task score."""

    def setup(self) -> None:
        # Cheap: a registry name or the checkpoint's cached sha256; never loads the model.
        try:
            self.model_version = self.context.models.version(self.project_id, self._labels()) or NO_MODEL_VERSION
        except (NoModelError, RegistryError) as exc:
            # Connecting and the other endpoints keep working; /predict answers with this message.
            _log_once(f"setup:{exc}", logging.ERROR, "no usable model: %s", exc)
            self.model_version = NO_MODEL_VERSION

    def versions(self) -> list[str]:
        settings = self.context.settings
        names: list[str] = []
        registries = [Registry(settings.model_dir)]
        if self.project_id is not None:
            registries.insert(0, Registry.for_project(settings.model_dir, self.project_id))
        else:
            # Label Studio's GET /api/ml/{id}/versions calls GET /versions without saying which project: list
            # every project's versions too, so the ones training published show up there.
            registries[:0] = Registry.all_projects(settings.model_dir)
        for registry in registries:
            names += [v.name for v in registry.versions() if v.name not in names]
        if self.model_version and self.model_version not in names and self.model_version != NO_MODEL_VERSION:
            names.append(self.model_version)
        return names

    deadline_leftovers = 0  # tasks the last predict() left without a prediction at PREDICT_DEADLINE_S

    def predict(self, tasks: list[dict], **kwargs: Any) -> list[dict]:
        started = time.monotonic()  # the deadline counts from the request, model loading included
        settings = self.context.settings
        serving = self._serving()
        self.model_version = serving.model.version

        # Label Studio sends every selected task in one request and stores nothing if the answer takes longer than
        # its 100 s: work in chunks (bounded memory too) and answer what is done by PREDICT_DEADLINE_S; the rest get
        # an item without "result", which Label Studio skips and asks for again.
        deadline = started + settings.predict_deadline_s
        predictions: list[dict] = []
        for start in range(0, len(tasks), self._chunk_size()):
            if start and time.monotonic() > deadline:
                left = len(tasks) - start
                log.warning("predicted %d of %d tasks within PREDICT_DEADLINE_S=%g s; the other %d get no prediction "
                            "now (Label Studio asks for them again when predictions are retrieved)", start,
                            len(tasks), settings.predict_deadline_s, left)
                predictions += [failed_task_prediction(serving.model.version)] * left
                self.deadline_leftovers = left
                break
            predictions += [p for p, _ in self._predict_chunk(tasks[start:start + self._chunk_size()], start,
                                                              serving)]
        return predictions

    def score_tasks(self, tasks: list[dict]) -> tuple[str, list[tuple[dict, Optional[np.ndarray]]]]:
        """Pool scoring (``jobs.pool``): (the serving version, per task its prediction as ``predict`` makes it and
        the image embedding from the same forward pass, None when the image could not be had)."""
        serving = self._serving()
        chunk = self._chunk_size()
        scored: list[tuple[dict, Optional[np.ndarray]]] = []
        for start in range(0, len(tasks), chunk):
            scored += self._predict_chunk(tasks[start:start + chunk], start, serving, embed=True)
        return serving.model.version, scored

    def _serving(self) -> "_Serving":
        """What a prediction needs: the label config's target, the project's model, its classes -> labels."""
        settings = self.context.settings
        target = find_rectangle_target(self.parsed_label_config, settings.from_name)
        model = self.context.models.get(self.project_id, target.labels)
        mapping = map_classes_to_labels(model.names, target.labels, parse_label_map(settings.label_map))
        self._log_skipped_classes(model.names, mapping, model.version)
        return _Serving(target, model, mapping)

    def _chunk_size(self) -> int:
        """Tasks worked on at once: a few batches of images in memory at a time (streamed)."""
        return max(1, self.context.settings.predict_batch_size) * 2

    def _predict_chunk(self, tasks: list[dict], offset: int, serving: "_Serving",
                       embed: bool = False) -> list[tuple[dict, Optional[np.ndarray]]]:
        settings = self.context.settings
        target, model, mapping = serving.target, serving.model, serving.mapping
        images = self._load_images(tasks, target.data_key)
        ok = [i for i, image in enumerate(images) if isinstance(image, np.ndarray)]
        # ``embed`` only when asked: a loader's detector need not know it (it then cannot score a pool).
        extra = {"embed": True} if embed else {}
        detections = model.detector.detect([images[i] for i in ok], conf=settings.score_floor, **extra) if ok else []
        by_task = dict(zip(ok, detections))
        predictions: list[tuple[dict, Optional[np.ndarray]]] = []
        for i, task in enumerate(tasks):
            found = by_task.get(i)
            if images[i] is NO_IMAGE_FIELD:  # nothing to ask again for: an empty prediction
                predictions.append((task_prediction([], None, model.version), None))
                continue
            if found is None:  # the image could not be had: Label Studio asks again later
                predictions.append((failed_task_prediction(model.version), None))
                continue
            shown = found.above(settings.model_score_threshold)
            regions = detections_to_regions(shown, target, mapping, model.version, task.get("id", offset + i))
            score = task_score(found, settings.task_score, settings.model_score_threshold, settings.score_floor)
            predictions.append((task_prediction(regions, score, model.version), found.embedding))
        return predictions

    def fit(self, tasks: Any = (), workdir: Optional[str] = None, **kwargs: Any) -> dict:
        """Train on every annotation of the project (read from Label Studio, not from ``tasks`` or ``data``),
        publish a new version when it is not worse, and switch Label Studio to it. Runs in the RQ worker (see
        yolo_backend/jobs/training.py); returns the run's summary (metrics, version, paths). Called the classic
        ways (``fit((), event=..., data=..., job_id=...)``, ``fit(tasks, workdir)``) or as ``fit(event, data)``."""
        from .jobs.training import train_project

        event, _ = self.training_event(tasks, workdir, kwargs.get("event"), kwargs.get("data"))
        return train_project(self, event, progress=kwargs.get("progress"), trainer=kwargs.get("trainer"),
                             job_id=kwargs.get("job_id"))

    # --- helpers --------------------------------------------------------------------------------------------
    def _labels(self) -> tuple:
        """The RectangleLabels labels of this project's label config ((): none usable). With nothing configured
        they size the untrained model the backend starts from."""
        try:
            return tuple(find_rectangle_target(self.parsed_label_config, self.context.settings.from_name).labels)
        except LabelConfigError:
            return ()

    def _load_images(self, tasks: list[dict], data_key: str) -> list:
        """Each task's image as RGB; None when it could not be had, NO_IMAGE_FIELD when the task has none (each
        with a log line naming the task and the reason)."""

        def load(task: dict):
            task_id = task.get("id")
            shown = shown_url(str(task_id), 40)  # a task's id and data are whatever its importer wrote
            url = task["data"].get(data_key)
            if url is None:
                fields = cut(", ".join(sorted(map(str, task["data"]))) or "none")
                log.warning("task %s: no %r field in its data (fields: %s); predicting nothing for it",
                            shown, data_key, fields)
                return NO_IMAGE_FIELD
            try:
                return self.context.images.load(url, task_id)
            except (ImageFetchError, LabelStudioAuthError) as exc:
                # No URL or key, or a refused key: a setting, not this image, so said loudly once (the classic
                # runtime shows only ERROR lines). ImageFetchError keeps the auth error as its context.
                if any(isinstance(e, LabelStudioAuthError) for e in (exc, exc.__context__)):
                    _log_once("label-studio-auth", logging.ERROR, "images stored in Label Studio cannot be "
                              "downloaded, so their tasks get no prediction: %s", cut(exc, 600))
                log.warning("task %s: image not available, no prediction (Label Studio asks again later): %s",
                            shown, cut(exc, 600))
            except Exception:  # an unexpected failure for one image must not fail the batch
                log.exception("task %s: image %s failed unexpectedly; no prediction (Label Studio asks again "
                              "later)", shown, shown_url(str(url)))
            return None

        if len(tasks) <= 1:
            return [load(task) for task in tasks]
        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_THREADS, len(tasks)),
                                thread_name_prefix="image-download") as pool:
            return list(pool.map(load, tasks))

    @staticmethod
    def _log_skipped_classes(names, mapping: LabelMapping, version: str) -> None:
        skipped = tuple(names[i] for i in mapping.skipped_classes)
        if skipped:
            _log_once(("skipped", version, skipped, mapping.labels), logging.INFO,
                      "classes %s of model %s match no label of the config and are not predicted (add the labels "
                      "or map them with LABEL_MAP)", ", ".join(skipped), version)
        if mapping.unlearned_labels:
            _log_once(("unlearned", version, mapping.unlearned_labels), logging.WARNING,
                      "labels %s of the config are not classes of model %s, so it never predicts them; the next "
                      "training learns them from the annotations (if they are other names for the model's "
                      "classes, set LABEL_MAP)", ", ".join(mapping.unlearned_labels), version)
