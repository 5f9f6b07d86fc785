"""The model a server process predicts with: found cheaply, loaded once, swapped atomically.

Which checkpoint serves a project, first match wins:
  1. MODEL_VERSION (a pinned version name) from the project's registry or MODEL_DIR's;
  2. the newest version published for the project (MODEL_DIR/projects/<id>);
  3. the newest version published in MODEL_DIR itself;
  4. MODEL_PATH (e.g. a reference checkpoint to start from; versions trained from it supersede it);
  5. with none of these, an untrained yolov7-tiny sized for the label config's RectangleLabels (one class per
     label), version ``v0-untrained``: built on the first prediction into MODEL_DIR/untrained/<labels hash>, shared
     by every project with the same labels and never published (made-up project ids cannot fill the disk; the
     folder is bounded, ``untrained_checkpoint``). The training worker starts from the same file. Its predictions
     are empty until it has learned from the first annotations.
Without a label config either, predicting raises NoModelError, which says what to set.

The size a checkpoint serves at (``detector_settings.serving_size``): IMG_SIZE, else the size a training measured for
a checkpoint that records none (MODEL_DIR/serving-sizes.json, ``serving_size.py``), else the size it was trained at,
else 640 as a guess, said as such in the load log line (a WARNING) and on the dashboard (``serving_size``). A new
measurement is picked up like a new version: the file's stat is part of the stamp, and the model is loaded again at
the measured size.

Finding the source costs a few stats (re-checked at most every ``check_interval`` seconds); version names come
from the registry or from the checkpoint's sha256 (cached), so ``/setup`` never loads a model. The model itself
is loaded lazily on first use, under a lock, and kept per version: a request holds a ``LoadedModel`` reference and
always sees one whole model while a newer one is swapped in for the next request.

Importing this module imports no torch; the default loader imports the detector when it first loads a model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .registry import Registry, RegistryError, checkpoint_version
from .serving_size import measured_size, sizes_stamp
from .settings import Settings
from .yolov7.untrained import UNTRAINED_GRAPH, UNTRAINED_VERSION, build_untrained_checkpoint

log = logging.getLogger(__name__)


class NoModelError(RuntimeError):
    """No checkpoint is configured or published; the message says what to set."""


class ModelLoadError(NoModelError):
    """The checkpoint that should serve cannot be loaded (damaged, not a YOLOv7 checkpoint, ...); the message
    says which and why."""


@dataclass(frozen=True)
class ModelSource:
    path: Path      # the checkpoint file
    version: str    # the model_version predictions carry
    origin: str     # where it was found, for log lines
    measured_size: Optional[int] = None  # the size a training measured for it (IMG_SIZE unset); a change reloads


@dataclass(frozen=True)
class LoadedModel:
    source: ModelSource
    detector: Any              # has .detect(images, conf=None) -> list[Detections]
    names: tuple[str, ...]     # class names, index = class id

    @property
    def version(self) -> str:
        return self.source.version

    @property
    def img_size(self) -> Optional[int]:
        """The inference size the detector runs at (None for a loader whose detector does not say)."""
        return getattr(self.detector, "img_size", None)

    @property
    def img_size_reason(self) -> Optional[str]:
        """Why it runs at that size: "trained at 320", "IMG_SIZE=640", "measured on 47 annotated images of project
        3: mAP@0.5 0.747 at 320, 0.181 at 640", "a guess: the checkpoint records no training size; ..."."""
        return getattr(self.detector, "img_size_reason", None)

    @property
    def img_size_guess(self) -> bool:
        """Whether the size is the 640 guess for a checkpoint that records no training size."""
        return bool(getattr(self.detector, "img_size_guess", False))


# (checkpoint path, settings) -> (detector, class names)
Loader = Callable[[Path, Settings], tuple[Any, Sequence[str]]]


def load_detector(path: Path, settings: Settings) -> tuple[Any, Sequence[str]]:
    """The default loader: our YOLOv7 implementation configured by the settings (``detector_settings``)."""
    from .detector_settings import detector_from_settings

    detector = detector_from_settings(path, settings)
    return detector, detector.names


def validate_checkpoint(path: Path) -> None:
    """Read the checkpoint and build its model, as loading it to serve would (CheckpointError when it cannot)."""
    from .yolov7.checkpoint import load_checkpoint, model_from_checkpoint

    model_from_checkpoint(load_checkpoint(path), device="cpu", fuse=False)


def model_path_source(settings: Settings) -> ModelSource:
    assert settings.model_path is not None  # callers check that MODEL_PATH is set
    path = Path(settings.model_path)
    if not path.is_file():
        raise NoModelError(f"MODEL_PATH={settings.model_path} does not exist or is not a file; "
                           "point it at a YOLOv7 checkpoint (.pt)")
    return ModelSource(path, checkpoint_version(path), f"MODEL_PATH={path}")


def resolve_source(settings: Settings, project_id: Optional[int], use_pin: bool = True) -> Optional[ModelSource]:
    """Which checkpoint serves ``project_id`` (the rule in this module's docstring); None: nothing configured.

    The one home of that rule: the server predicts with it, the training job fine-tunes from it (``use_pin``
    False: MODEL_VERSION pins what is served, training goes on from the newest), ``serve`` describes it. An
    untrained placeholder (``v0-untrained``) never wins over a real MODEL_PATH: it only stood in while none was
    set; versions trained from it do.
    """
    source = _resolve_source(settings, project_id, use_pin)
    if source is None or settings.img_size is not None:
        return source
    measured = measured_size(settings.model_dir, source.path)
    return replace(source, measured_size=measured.size) if measured is not None else source


def _resolve_source(settings: Settings, project_id: Optional[int], use_pin: bool) -> Optional[ModelSource]:
    registries = Registry.lookup_order(settings.model_dir, project_id)
    pinned = settings.model_version if use_pin else None
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
        if latest is None:
            continue
        if settings.model_path and latest.meta().get("untrained"):
            configured = model_path_source(settings)
            return ModelSource(configured.path, configured.version, f"{configured.origin} (instead of the "
                               f"untrained placeholder {latest.name} in {registry.root})")
        return ModelSource(latest.checkpoint, latest.name, f"newest version in {registry.root}")
    if settings.model_path:
        return model_path_source(settings)
    return None


# Untrained placeholders on disk (MODEL_DIR/untrained/<labels hash>/model.pt), shared by every project with the same
# labels and never published: at most this many label sets and bytes, least recently used evicted (a placeholder
# is rebuilt, identical, when it is needed again).
MAX_UNTRAINED_SETS = 16
MAX_UNTRAINED_BYTES = 256 * 1024 * 1024
_untrained_lock = threading.Lock()


def untrained_checkpoint(model_dir: str | os.PathLike, labels: Sequence[str]) -> tuple[Path, bool]:
    """(the untrained checkpoint for ``labels``, whether it was built now). Seeded, so the same labels always give
    the same weights: any process builds the same file, and a training run starts from what was served."""
    import hashlib

    names = [str(label) for label in labels]
    key = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    folder = Path(model_dir) / UNTRAINED_DIR
    path = folder / key / "model.pt"
    with _untrained_lock:
        if path.is_file():
            os.utime(path)  # recently used: evicted last
            return path, False
        path.parent.mkdir(parents=True, exist_ok=True)
        build_untrained_checkpoint(path, names)  # written atomically (temp file, rename)
        _evict_untrained(folder, keep=path)
        return path, True


def _evict_untrained(folder: Path, keep: Path) -> None:
    entries = []
    for candidate in folder.glob("*/model.pt"):
        try:
            stat = candidate.stat()
        except OSError:
            continue
        entries.append((stat.st_mtime, stat.st_size, candidate))
    entries.sort(reverse=True)  # newest first
    total = 0
    for rank, (_, size, candidate) in enumerate(entries):
        total += size
        if candidate != keep and (rank >= MAX_UNTRAINED_SETS or total > MAX_UNTRAINED_BYTES):
            with contextlib.suppress(OSError):
                candidate.unlink()
                candidate.parent.rmdir()
            log.info("untrained placeholder %s evicted (more than %d label sets or %d MiB)", candidate.parent.name,
                     MAX_UNTRAINED_SETS, MAX_UNTRAINED_BYTES >> 20)


UNTRAINED_DIR = "untrained"


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
        self._sizes: dict[str, Any] = {}  # source key -> ServingSize, for the dashboard (``serving_size``)
        self.loads = 0  # how many times a model was loaded (metrics, tests)
        self._said: set = set()  # log lines already written once

    # --- which checkpoint ---------------------------------------------------------------------------------
    def _registries(self, project_id: Optional[int]) -> list[Registry]:
        return Registry.lookup_order(self.settings.model_dir, project_id)

    def _stamp(self, project_id: Optional[int]) -> tuple:
        stamps: list[Any] = [r.stamp() for r in self._registries(project_id)]
        stamps.append(sizes_stamp(self.settings.model_dir))  # a measured size: loaded again at that size
        if self.settings.model_path:
            try:
                st = os.stat(self.settings.model_path)
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _resolve(self, project_id: Optional[int]) -> Optional[ModelSource]:
        return resolve_source(self.settings, project_id)

    def _resolve_model_path(self) -> ModelSource:
        return model_path_source(self.settings)

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

    def refresh(self, project_id: Optional[int] = None) -> None:
        """Resolve ``project_id``'s checkpoint afresh on the next call (a version was just published here)."""
        with self._lock:
            self._sources.pop(project_id, None)

    def version(self, project_id: Optional[int] = None, labels: Sequence[str] = ()) -> Optional[str]:
        """The model_version predictions for ``project_id`` would carry, without loading anything. ``labels``
        (the label config's RectangleLabels) make the untrained fallback count when nothing is configured."""
        source = self.source(project_id)
        if source is None and labels:
            self._say_untrained(project_id, labels, "will build")
            return UNTRAINED_VERSION
        return source.version if source else None

    # --- the untrained fallback ---------------------------------------------------------------------------
    def _untrained_source(self, project_id: Optional[int], labels: Sequence[str]) -> ModelSource:
        """The shared untrained model for ``labels`` (``untrained_checkpoint``); called under the load lock."""
        names = [str(label) for label in labels]
        path, built = untrained_checkpoint(self.settings.model_dir, names)
        if built:
            self._say_untrained(project_id, names, "built")
        return ModelSource(path, UNTRAINED_VERSION, f"untrained {UNTRAINED_GRAPH} for labels {', '.join(names)}")

    def _say_untrained(self, project_id: Optional[int], labels: Sequence[str], what: str) -> None:
        key = ("untrained", project_id, tuple(labels), what)
        if key in self._said:
            return
        self._said.add(key)
        log.warning("project %s: no MODEL_PATH and no published version, so the model is an UNTRAINED %s for "
                    "labels %s (%s, version %s): its predictions stay empty until it has learned from the first "
                    "annotations; set MODEL_PATH to serve a trained checkpoint", project_id, UNTRAINED_GRAPH,
                    ", ".join(labels), what, UNTRAINED_VERSION)

    # --- the model itself ---------------------------------------------------------------------------------
    def get(self, project_id: Optional[int] = None, labels: Sequence[str] = ()) -> LoadedModel:
        """The loaded model for ``project_id`` (loading it on first use or when a newer version appeared).
        With nothing configured, ``labels`` (the label config's RectangleLabels) give the untrained fallback."""
        source = self.source(project_id)
        if source is None and labels:
            with self._load_lock:  # the file may have been evicted since it was loaded: made again then
                source = self._untrained_source(project_id, labels)
        if source is None:
            raise NoModelError(
                "no model to predict with: set MODEL_PATH to a YOLOv7 checkpoint (.pt), e.g. "
                "MODEL_PATH=/models/best.pt, or publish a trained version into MODEL_DIR="
                f"{self.settings.model_dir} (with a label config that has RectangleLabels, an untrained model is "
                "built for it instead)")
        key = f"{source.version}@{source.path}@{source.measured_size}"
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
            try:
                detector, names = self.loader(source.path, self.settings)
            except Exception as exc:  # e.g. a published file damaged on disk: 503 with the reason, no traceback
                raise ModelLoadError(f"model {source.version} ({source.origin}) cannot be loaded: {exc}") from exc
            model = LoadedModel(source, detector, tuple(names))
            self.loads += 1
            size = f"img_size {model.img_size} ({model.img_size_reason})" if model.img_size else "img_size unknown"
            log.log(logging.WARNING if model.img_size_guess else logging.INFO,
                    "loaded model %s (%s; classes: %s; %s) in %.2f s", source.version, source.origin,
                    ", ".join(model.names), size, time.perf_counter() - started)
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.keep_models:
                    old_key, _ = self._models.popitem(last=False)
                    log.info("released model %s", old_key.split("@")[0])
            return model

    # --- the start-up check --------------------------------------------------------------------------------
    def serving_sources(self) -> list[ModelSource]:
        """Every checkpoint that would serve some project now: the pinned version, or the newest version of
        MODEL_DIR and of each project, and MODEL_PATH. RegistryError / NoModelError when a configured one is
        missing."""
        registries = [Registry(self.settings.model_dir), *Registry.all_projects(self.settings.model_dir)]
        pinned = self.settings.model_version
        if pinned:
            found = []
            for registry in registries:
                try:
                    version = registry.get(pinned)
                except RegistryError:
                    continue
                found.append(ModelSource(version.checkpoint, version.name,
                                         f"MODEL_VERSION={pinned} in {registry.root}"))
            if not found:
                raise RegistryError(f"MODEL_VERSION={pinned!r} is not published in {self.settings.model_dir}; unset "
                                    "it or publish that version")
            return found
        sources = []
        for registry in registries:
            latest = registry.latest()
            if latest is not None:
                sources.append(ModelSource(latest.checkpoint, latest.name, f"newest version in {registry.root}"))
        if self.settings.model_path:
            sources.append(self._resolve_model_path())
        return sources

    def check(self, validate: Callable[[Path], None] = validate_checkpoint) -> list[ModelSource]:
        """Load-check every checkpoint that would serve (see ``serving_sources``), before the server starts, so
        a damaged file is reported at once instead of at the first prediction. ModelLoadError names the first
        that fails."""
        sources = self.serving_sources()
        for source in sources:
            try:
                validate(source.path)
            except Exception as exc:
                raise ModelLoadError(f"model {source.version} ({source.origin}) cannot be loaded: {exc}") from exc
        return sources

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return [m.version for m in self._models.values()]

    def serving_size(self, project_id: Optional[int] = None, labels: Sequence[str] = ()):
        """The size the model serving ``project_id`` runs at and why (a ``detector_settings.ServingSize``), for the
        dashboard, without loading a model: the loaded model's own when it is loaded, else the rule applied to its
        checkpoint (read once per file and measurement). None when nothing serves or the file cannot be read."""
        from .detector_settings import ServingSize, serving_size

        source = self.source(project_id)
        if source is None:
            return ServingSize(640, "untrained: 640") if labels else None
        key = f"{source.version}@{source.path}@{source.measured_size}"
        with self._lock:
            model = self._models.get(key)
            known = self._sizes.get(key)
        if model is not None and model.img_size:
            return ServingSize(model.img_size, model.img_size_reason or "", model.img_size_guess)
        if known is None:
            try:
                known = serving_size(source.path, self.settings)
            except Exception as exc:  # a damaged file: the load says why when it is served
                log.debug("serving size of %s unknown: %s", source.path, exc)
                return None
            with self._lock:
                if len(self._sizes) > 64:  # one per version served since; old versions are gone
                    self._sizes.clear()
                self._sizes[key] = known
        return known
