"""The model a server process predicts with: found cheaply, loaded once, swapped atomically.

Which checkpoint serves a project, first match wins:
  1. MODEL_VERSION (a pinned version name) from the project's registry or MODEL_DIR's;
  2. the newest version published for the project (MODEL_DIR/projects/<id>);
  3. the newest version published in MODEL_DIR itself;
  4. MODEL_PATH (e.g. a reference checkpoint to start from; versions trained from it supersede it).
With none of these, predicting raises NoModelError, which says what to set.

Finding the source costs a few stats (re-checked at most every ``check_interval`` seconds); version names come
from the registry or from the checkpoint's sha256 (cached), so ``/setup`` never loads a model. The model itself
is loaded lazily on first use, under a lock, and kept per version: a request holds a ``LoadedModel`` reference and
always sees one whole model while a newer one is swapped in for the next request.

Importing this module imports no torch; the default loader imports the detector when it first loads a model.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..registry import Registry, RegistryError, checkpoint_version
from ..settings import Settings

log = logging.getLogger(__name__)


class NoModelError(RuntimeError):
    """No checkpoint is configured or published; the message says what to set."""


@dataclass(frozen=True)
class ModelSource:
    path: Path      # the checkpoint file
    version: str    # the model_version predictions carry
    origin: str     # where it was found, for log lines


@dataclass(frozen=True)
class LoadedModel:
    source: ModelSource
    detector: Any              # has .detect(images, conf=None) -> list[Detections]
    names: tuple[str, ...]     # class names, index = class id

    @property
    def version(self) -> str:
        return self.source.version


# (checkpoint path, settings) -> (detector, class names)
Loader = Callable[[Path, Settings], tuple[Any, Sequence[str]]]


def load_detector(path: Path, settings: Settings) -> tuple[Any, Sequence[str]]:
    """The default loader: our YOLOv7 implementation on the configured device."""
    from ..yolov7 import Detector, load_model
    from ..yolov7.device import configure_threads, select_device

    device = select_device(settings.device)
    if device.type == "cpu":
        configure_threads(settings.torch_threads)
    model = load_model(str(path), device=str(device))
    detector = Detector(model, img_size=settings.img_size, conf=settings.score_floor, iou=settings.iou_threshold,
                        max_det=settings.max_detections, half=settings.half,
                        batch_size=settings.predict_batch_size)
    return detector, tuple(model.names)


class ModelHolder:
    """Per process: resolves which checkpoint serves a project and keeps the loaded models. Thread-safe."""

    def __init__(self, settings: Settings, loader: Optional[Loader] = None, check_interval: float = 2.0,
                 keep_models: int = 2):
        self.settings = settings
        self.loader = loader or load_detector
        self.check_interval = check_interval
        self.keep_models = max(1, keep_models)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._sources: dict[Optional[int], tuple[float, tuple, Optional[ModelSource]]] = {}
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.loads = 0  # how many times a model was loaded (metrics, tests)

    # --- which checkpoint ---------------------------------------------------------------------------------
    def _registries(self, project_id: Optional[int]) -> list[Registry]:
        registries = []
        if project_id is not None:
            registries.append(Registry.for_project(self.settings.model_dir, project_id))
        registries.append(Registry(self.settings.model_dir))
        return registries

    def _stamp(self, project_id: Optional[int]) -> tuple:
        stamps: list[Any] = [r.stamp() for r in self._registries(project_id)]
        if self.settings.model_path:
            try:
                st = os.stat(self.settings.model_path)
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _resolve(self, project_id: Optional[int]) -> Optional[ModelSource]:
        registries = self._registries(project_id)
        pinned = self.settings.model_version
        if pinned:
            for registry in registries:
                try:
                    version = registry.get(pinned)
                except RegistryError:
                    continue
                return ModelSource(version.checkpoint, version.name, f"MODEL_VERSION={pinned} in {registry.root}")
            raise RegistryError(f"MODEL_VERSION={pinned!r} is not published in "
                                f"{' or '.join(str(r.root) for r in registries)}; unset it or publish that version")
        for registry in registries:
            latest = registry.latest()
            if latest is not None:
                return ModelSource(latest.checkpoint, latest.name, f"newest version in {registry.root}")
        if self.settings.model_path:
            path = Path(self.settings.model_path)
            if not path.is_file():
                raise NoModelError(f"MODEL_PATH={self.settings.model_path} does not exist or is not a file; "
                                   "point it at a YOLOv7 checkpoint (.pt)")
            return ModelSource(path, checkpoint_version(path), f"MODEL_PATH={path}")
        return None

    def source(self, project_id: Optional[int] = None) -> Optional[ModelSource]:
        """The checkpoint serving ``project_id`` now (None: nothing configured). Cheap: cached for
        ``check_interval`` seconds, and re-resolved only when the registries or MODEL_PATH changed."""
        now = time.monotonic()
        with self._lock:
            cached = self._sources.get(project_id)
        if cached and now - cached[0] < self.check_interval:
            return cached[2]
        stamp = self._stamp(project_id)
        if cached and cached[1] == stamp:
            source = cached[2]
        else:
            source = self._resolve(project_id)
            if cached and source != cached[2] and source is not None:
                log.info("model for project %s is now %s (%s)", project_id, source.version, source.origin)
        with self._lock:
            self._sources[project_id] = (now, stamp, source)
        return source

    def version(self, project_id: Optional[int] = None) -> Optional[str]:
        """The model_version predictions for ``project_id`` would carry, without loading anything."""
        source = self.source(project_id)
        return source.version if source else None

    # --- the model itself ---------------------------------------------------------------------------------
    def get(self, project_id: Optional[int] = None) -> LoadedModel:
        """The loaded model for ``project_id`` (loading it on first use or when a newer version appeared)."""
        source = self.source(project_id)
        if source is None:
            raise NoModelError(
                "no model to predict with: set MODEL_PATH to a YOLOv7 checkpoint (.pt), e.g. "
                "MODEL_PATH=/models/best.pt, or publish a trained version into MODEL_DIR="
                f"{self.settings.model_dir}")
        key = f"{source.version}@{source.path}"
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model
        with self._load_lock:  # one load at a time: models are big, and a second request waits for the first
            with self._lock:
                model = self._models.get(key)
            if model is not None:
                return model
            started = time.perf_counter()
            detector, names = self.loader(source.path, self.settings)
            model = LoadedModel(source, detector, tuple(names))
            self.loads += 1
            log.info("loaded model %s (%s; classes: %s) in %.2f s", source.version, source.origin,
                     ", ".join(model.names), time.perf_counter() - started)
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.keep_models:
                    old_key, _ = self._models.popitem(last=False)
                    log.info("released model %s", old_key.split("@")[0])
            return model

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return [m.version for m in self._models.values()]
