"""Predictions for Label Studio tasks, below the server, the worker and the backend class.

``Predictor(context)`` turns a project's label config and tasks into the items Label Studio stores: which controls
get results and which class becomes which label (``labelstudio.controls``: every served RectangleLabels gets its
boxes, every served Choices an image-level answer, from one forward pass), the model serving the project
(``model_holder``), each task's image (``labelstudio.images``), the detector's boxes, the regions and the task score
(``active_learning``), and an item without ``result`` for a task whose image could not be had (Label Studio asks for
it again). ``predict`` works in chunks and stops at PREDICT_DEADLINE_S, returning what it left undone;
``score`` also returns each image's embedding (pool scoring clusters them).

The backend class (``backend.YOLOv7Backend``) is a thin adapter over it for the classic contract; pool scoring and
the training job's sync call it directly.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .active_learning import task_score
from .labelstudio.client import LabelStudioAuthError
from .labelstudio.config import LabelConfigError, LabelMapping, parse_label_config, parse_label_map
from .labelstudio.controls import ConfigControls, ServedControl, ServedRectangles, read_controls
from .labelstudio.images import ImageFetchError, shown_url
from .labelstudio.results import failed_task_prediction, task_prediction
from .labelstudio.urls import cut
from .labelstudio.video_controls import is_video_config, read_video_control
from .model_holder import LoadedModel
from .runtime import BackendContext
from .video_predictor import VideoPredictor

log = logging.getLogger(__name__)

# Parallel image downloads per chunk (downloads wait on the network, not the CPU).
DOWNLOAD_THREADS = 8


class _NoImageField:
    """A task whose data has no field for the config's image: an empty prediction, not worth asking again."""


NO_IMAGE_FIELD = _NoImageField()


@dataclass(frozen=True)
class Serving:
    """What predictions for one project need: the config's served controls, the model, and each control with the
    model's classes mapped to its labels (``served``, config order: RectangleLabels, then Choices)."""

    controls: ConfigControls
    model: LoadedModel
    served: tuple[ServedControl, ...]

    @property
    def version(self) -> str:
        return self.model.version


@dataclass
class PredictionRun:
    """A ``predict``: one item per task (in task order), the version, and how many tasks PREDICT_DEADLINE_S left
    without a prediction (their items have no ``result``; pool scoring stores them later)."""

    version: str
    items: list[dict]
    unfinished: int = 0


@dataclass
class ScoredTask:
    """A task scored for the pool: its item as ``predict`` makes it, and the image embedding (None: no image)."""

    item: dict
    embedding: Optional[np.ndarray] = field(default=None, repr=False)


class Predictor:
    """Predictions for the projects of one process (``BackendContext``: the model holder, the image fetcher)."""

    def __init__(self, context: BackendContext):
        self.context = context
        self.settings = context.settings
        self.videos = VideoPredictor(context)

    # --- what serves ------------------------------------------------------------------------------------------
    def labels(self, label_config: Optional[str]) -> tuple[str, ...]:
        """The served RectangleLabels' labels of a label config ((): none usable). With nothing configured they size
        the untrained model a project starts from."""
        try:
            parsed = parse_label_config(label_config)
            if is_video_config(parsed):
                return read_video_control(parsed, self.settings.from_name).labels
            return read_controls(parsed, self.settings.from_name).labels
        except LabelConfigError:
            return ()

    def version(self, project_id: Optional[int], label_config: Optional[str]) -> Optional[str]:
        """The version predictions for the project would carry, without loading a model (None: no model)."""
        return self.context.models.version(project_id, self.labels(label_config))

    def serving(self, project_id: Optional[int], label_config: Optional[str]) -> Serving:
        """Controls, model and mappings for the project (LabelConfigError, NoModelError say what is wrong)."""
        controls = read_controls(parse_label_config(label_config), self.settings.from_name)
        model = self.context.models.get(project_id, controls.labels)
        served = controls.bind(model.names, parse_label_map(self.settings.label_map))
        _log_skipped_classes(model.names, [s.mapping for s in served if isinstance(s, ServedRectangles)],
                             model.version)
        return Serving(controls, model, served)

    # --- predicting -------------------------------------------------------------------------------------------
    def predict(self, project_id: Optional[int], label_config: Optional[str], tasks: list[dict]) -> PredictionRun:
        """Items for ``tasks`` by PREDICT_DEADLINE_S (counted from now, model loading included): Label Studio sends
        every selected task in one request and stores nothing if the answer takes longer than its 100 s, so the
        work goes in chunks (bounded memory too) and the tasks not reached get an item without ``result``."""
        started = time.monotonic()
        deadline = started + self.settings.predict_deadline_s
        parsed = parse_label_config(label_config)
        if is_video_config(parsed):  # a video project: one video at a time, the deadline checked inside each
            run = self.videos.predict(project_id, parsed, tasks, deadline)
            return PredictionRun(run.version, [v.item for v in run.items], run.unfinished)
        serving = self.serving(project_id, label_config)
        items: list[dict] = []
        for start in range(0, len(tasks), self.chunk_size):
            if start and time.monotonic() > deadline:
                left = len(tasks) - start
                log.warning("predicted %d of %d tasks within PREDICT_DEADLINE_S=%g s; the other %d get no prediction "
                            "now (Label Studio asks for them again when predictions are retrieved)", start,
                            len(tasks), self.settings.predict_deadline_s, left)
                return PredictionRun(serving.version, items + [failed_task_prediction(serving.version)] * left, left)
            items += [s.item for s in self._chunk(tasks[start:start + self.chunk_size], start, serving)]
        return PredictionRun(serving.version, items)

    def score(self, project_id: Optional[int], label_config: Optional[str],
              tasks: list[dict]) -> tuple[str, list[ScoredTask]]:
        """Pool scoring: (the serving version, each task's item and image embedding from the same forward pass; a
        video's is the mean over its sampled frames)."""
        parsed = parse_label_config(label_config)
        if is_video_config(parsed):
            run = self.videos.predict(project_id, parsed, tasks, deadline=None, embed=True)
            return run.version, [ScoredTask(v.item, v.embedding) for v in run.items]
        serving = self.serving(project_id, label_config)
        scored: list[ScoredTask] = []
        for start in range(0, len(tasks), self.chunk_size):
            scored += self._chunk(tasks[start:start + self.chunk_size], start, serving, embed=True)
        return serving.version, scored

    @property
    def chunk_size(self) -> int:
        """Tasks worked on at once: a few batches of images in memory at a time (streamed)."""
        return max(1, self.settings.predict_batch_size) * 2

    def _chunk(self, tasks: list[dict], offset: int, serving: Serving, embed: bool = False) -> list[ScoredTask]:
        images = self._load_images(tasks, serving.controls.data_key)
        ok = [i for i, image in enumerate(images) if isinstance(image, np.ndarray)]
        # ``embed`` only when asked: a loader's detector need not know it (it then cannot score a pool).
        extra = {"embed": True} if embed else {}
        found = serving.model.detector.detect([images[i] for i in ok], conf=self._floor(serving), **extra) \
            if ok else []
        by_task = dict(zip(ok, found))
        return [self._scored(task, offset + i, images[i], by_task.get(i), serving) for i, task in enumerate(tasks)]

    def _scored(self, task: dict, position: int, image, detections, serving: Serving) -> ScoredTask:
        settings, version = self.settings, serving.version
        if image is NO_IMAGE_FIELD:  # nothing to ask again for: an empty prediction
            return ScoredTask(task_prediction([], None, version))
        if detections is None:  # the image could not be had: Label Studio asks again later
            return ScoredTask(failed_task_prediction(version))
        key = task.get("id", position)
        regions = [region for n, served in enumerate(serving.served)  # first control: the ids it always had
                   for region in served.results(detections, settings.model_score_threshold, version,
                                                key if n == 0 else f"{key}:{served.control.name}")]
        score = task_score(detections, settings.task_score, settings.model_score_threshold, settings.score_floor)
        return ScoredTask(task_prediction(regions, score, version), detections.embedding)

    def _floor(self, serving: Serving) -> float:
        """The detector's score floor: SCORE_FLOOR, or lower where a control's model_score_threshold is."""
        thresholds = [s.control.threshold for s in serving.served if s.control.threshold is not None]
        return min([self.settings.score_floor, *thresholds])

    # --- images -----------------------------------------------------------------------------------------------
    def _load_images(self, tasks: list[dict], data_key: str) -> list:
        """Each task's image as RGB; None when it could not be had, NO_IMAGE_FIELD when the task has none (each
        with a log line naming the task and the reason)."""
        if len(tasks) <= 1:
            return [self._load_image(task, data_key) for task in tasks]
        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_THREADS, len(tasks)),
                                thread_name_prefix="image-download") as pool:
            return list(pool.map(lambda task: self._load_image(task, data_key), tasks))

    def _load_image(self, task: dict, data_key: str):
        task_id = task.get("id")
        shown = shown_url(str(task_id), 40)  # a task's id and data are whatever its importer wrote
        url = task["data"].get(data_key)
        if url is None:
            fields = cut(", ".join(sorted(map(str, task["data"]))) or "none")
            log.warning("task %s: no %r field in its data (fields: %s); predicting nothing for it", shown, data_key,
                        fields)
            return NO_IMAGE_FIELD
        try:
            return self.context.images.load(url, task_id)
        except (ImageFetchError, LabelStudioAuthError) as exc:
            # No URL or key, or a refused key: a setting, not this image, so said loudly once (the classic runtime
            # shows only ERROR lines). ImageFetchError keeps the auth error as its context.
            if any(isinstance(e, LabelStudioAuthError) for e in (exc, exc.__context__)):
                _log_once("label-studio-auth", logging.ERROR, "images stored in Label Studio cannot be downloaded, "
                          "so their tasks get no prediction: %s", cut(exc, 600))
            log.warning("task %s: image not available, no prediction (Label Studio asks again later): %s", shown,
                        cut(exc, 600))
        except Exception:  # an unexpected failure for one image must not fail the batch
            log.exception("task %s: image %s failed unexpectedly; no prediction (Label Studio asks again later)",
                          shown, shown_url(str(url)))
        return None


_logged: set = set()


def _log_once(key, level: int, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, message, *args)


def _log_skipped_classes(names, mappings: list[LabelMapping], version: str) -> None:
    """Log once which classes no served RectangleLabels shows, and which labels no class becomes."""
    skipped = tuple(name for i, name in enumerate(names) if all(m.label_of(i) is None for m in mappings))
    unlearned = tuple(label for m in mappings for label in m.unlearned_labels)
    if skipped:
        _log_once(("skipped", version, skipped, tuple(m.labels for m in mappings)), logging.INFO,
                  "classes %s of model %s match no label of the config and are not predicted (add the labels or "
                  "map them with LABEL_MAP)", ", ".join(skipped), version)
    if unlearned:
        _log_once(("unlearned", version, unlearned), logging.WARNING,
                  "labels %s of the config are not classes of model %s, so it never predicts them; the next "
                  "training learns them from the annotations (if they are other names for the model's classes, set "
                  "LABEL_MAP)", ", ".join(unlearned), version)
