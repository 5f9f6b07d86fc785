"""YOLO labels or a checkpoint's detections -> Label Studio tasks to import.

A task looks like (predictions, the default):

    {"data": {"image": "/data/local-files/?d=fire/images/valid/a.jpg"},
     "predictions": [{"model_version": "yolo-labels", "score": 1.0, "result": [<region>, ...]}]}

or, with ``as_annotations``, ``"annotations": [{"result": [...]}]`` (regions without ``score``). Regions are built
by the Label Studio layer's percent-box builder (``labelstudio.results.detections_to_regions``), the same code the
ML backend answers /predict with, so imported boxes and served predictions look alike.

An image without a label file is imported without boxes (it is not labelled); an empty label file gives an
empty prediction/annotation (a labelled negative).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..labelstudio.config import LabelConfigError, LabelMapping, RectangleTarget, map_classes_to_labels
from ..labelstudio.results import detections_to_regions, task_prediction
from ..settings import Settings
from ..yolov7.detections import Detections
from .problems import ConversionError, ProblemLog
from .targets import ImageRefs
from .yolo_files import DatasetLayout, YoloBox, image_size, read_label_file

log = logging.getLogger("yolo_backend.convert")

LABELS_MODEL_VERSION = "yolo-labels"


def boxes_to_detections(boxes: Sequence[YoloBox], width: int, height: int, names: Sequence[str],
                        scores: Optional[Sequence[float]] = None) -> Detections:
    """Normalised YOLO boxes as ``Detections`` in pixels (float64, so nothing is lost on the way to percent)."""
    n = len(boxes)
    xyxy = np.array([[(b.cx - b.w / 2) * width, (b.cy - b.h / 2) * height,
                      (b.cx + b.w / 2) * width, (b.cy + b.h / 2) * height] for b in boxes],
                    np.float64).reshape(n, 4)
    score = np.ones(n) if scores is None else np.asarray(scores, np.float64)
    return Detections(boxes=xyxy, scores=score, labels=np.array([b.class_id for b in boxes], np.int64),
                      objectness=score.copy(), class_probs=np.zeros((n, len(names))), width=width, height=height,
                      names=tuple(names))


def regions_as_annotation(regions: list[dict]) -> list[dict]:
    """Annotation results carry no per-region score."""
    return [{k: v for k, v in region.items() if k != "score"} for region in regions]


def make_task(target: RectangleTarget, image_ref: str, regions: Optional[list[dict]], as_annotations: bool,
              model_version: str, score: Optional[float]) -> dict:
    task: dict = {"data": {target.data_key: image_ref}}
    if regions is None:
        return task
    if as_annotations:
        task["annotations"] = [{"result": regions_as_annotation(regions)}]
    else:
        task["predictions"] = [task_prediction(regions, score, model_version)]
    return task


@dataclass
class DatasetTasks:
    tasks: list[dict]
    images: list[Path]           # the image of each task, same order
    labels: list[str]            # config label of each class id


def dataset_to_tasks(layout: DatasetLayout, target: RectangleTarget, class_labels: Sequence[str], refs: ImageRefs,
                     problems: ProblemLog, as_annotations: bool = False,
                     model_version: str = LABELS_MODEL_VERSION, score: float = 1.0,
                     progress: bool = False) -> DatasetTasks:
    """One task per image of ``layout``; class id ``i`` becomes label ``class_labels[i]``."""
    mapping = LabelMapping(tuple(class_labels))
    tasks, images = [], []
    for entry in _progress(layout.entries, progress, "reading labels"):
        try:
            width, height = image_size(entry.image)
        except ConversionError as exc:
            problems.report("unreadable image", entry.image, str(exc).split(": ", 1)[-1])
            continue
        ref = refs.ref(entry.image)
        if entry.label_file is None:
            problems.count("images without a label file")
            regions = None
        else:
            boxes = read_label_file(entry.label_file, len(class_labels), problems)
            problems.count("boxes", len(boxes))
            if not boxes:
                problems.count("empty label files")
            detections = boxes_to_detections(boxes, width, height, class_labels)
            regions = detections_to_regions(detections, target, mapping, model_version, task_key=ref)
        tasks.append(make_task(target, ref, regions, as_annotations, model_version, score))
        images.append(entry.image)
    problems.count("tasks", len(tasks))
    return DatasetTasks(tasks, images, list(class_labels))


def _progress(items: Sequence, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", leave=False)


# --- detections ---------------------------------------------------------------------------------------------------

def _default(name: str):
    return Settings.__dataclass_fields__[name].default


@dataclass
class DetectOptions:
    """How to run the checkpoint: the backend's settings (their defaults here, ``from_settings`` for the configured
    ones), so imported predictions match served ones; each field may be changed."""

    img_size: Optional[int] = _default("img_size")
    threshold: float = _default("model_score_threshold")   # boxes shown
    score_floor: float = _default("score_floor")            # detections feeding the task score
    iou: float = _default("iou_threshold")
    max_det: int = _default("max_detections")
    task_score: str = _default("task_score")
    batch_size: int = _default("predict_batch_size")
    device: str = _default("device")
    torch_threads: int = _default("torch_threads")
    half: bool = _default("half")
    backend: str = _default("inference_backend")
    cache_dir: str = _default("onnx_cache_dir")

    @classmethod
    def from_settings(cls, settings: Settings) -> "DetectOptions":
        return cls(img_size=settings.img_size, threshold=settings.model_score_threshold,
                   score_floor=settings.score_floor, iou=settings.iou_threshold, max_det=settings.max_detections,
                   task_score=settings.task_score, batch_size=settings.predict_batch_size, device=settings.device,
                   torch_threads=settings.torch_threads, half=settings.half, backend=settings.inference_backend,
                   cache_dir=settings.onnx_cache_dir)

    def settings(self) -> Settings:
        """These options as the settings they stand for."""
        return replace(Settings(), img_size=self.img_size, model_score_threshold=self.threshold,
                       score_floor=self.score_floor, iou_threshold=self.iou, max_detections=self.max_det,
                       task_score=self.task_score, predict_batch_size=self.batch_size, device=self.device,
                       torch_threads=self.torch_threads, half=self.half, inference_backend=self.backend,
                       onnx_cache_dir=self.cache_dir)


def load_checkpoint_detector(weights: Path, options: DetectOptions):
    """(Detector, class names, model_version) for a checkpoint; torch is imported here, not at module import."""
    from ..detector_settings import detector_from_settings
    from ..registry import checkpoint_version
    from ..yolov7 import CheckpointError

    if not Path(weights).is_file():
        raise ConversionError(f"{weights}: no such checkpoint file")
    try:
        detector = detector_from_settings(weights, options.settings(), conf=min(options.score_floor, options.threshold))
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    return detector, detector.names, checkpoint_version(weights)


def _chunks(items: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def detections_to_tasks(detector, names: Sequence[str], model_version: str, images: Sequence[Path],
                        target: RectangleTarget, refs: ImageRefs, problems: ProblemLog, options: DetectOptions,
                        label_map: Optional[dict] = None, as_annotations: bool = False,
                        progress: bool = True) -> DatasetTasks:
    """Run ``detector`` over ``images`` in batches and make one task per image with its prediction.

    Boxes at or above ``options.threshold`` are shown (with their scores); the task score comes from every
    detection above ``options.score_floor`` (``yolo_backend.active_learning.task_score``), as the server does.
    An unreadable image is reported and left out.
    """
    from ..active_learning import task_score
    from ..yolov7.preprocess import ImageReadError, read_image

    labels = list(target.labels) or list(names)
    try:
        mapping = map_classes_to_labels(names, labels, label_map)
    except LabelConfigError as exc:
        raise ConversionError(str(exc)) from None
    for i in mapping.skipped_classes:
        log.warning("class %r of the checkpoint has no label in the config; its boxes are left out", names[i])
    tasks, done = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), desc="detecting", unit="img")
    try:
        for chunk in _chunks(list(images), max(1, options.batch_size)):
            pixels, paths = [], []
            for path in chunk:
                try:
                    pixels.append(read_image(path))
                    paths.append(path)
                except ImageReadError as exc:
                    problems.report("unreadable image", path, str(exc).split(": ", 1)[-1])
            found_all = (detector.detect(pixels, conf=min(options.score_floor, options.threshold))
                         if pixels else [])
            for path, found in zip(paths, found_all):
                ref = refs.ref(path)
                shown = found.above(options.threshold)
                regions = detections_to_regions(shown, target, mapping, model_version, task_key=ref)
                score = task_score(found, options.task_score, options.threshold, options.score_floor)
                problems.count("boxes", len(regions))
                tasks.append(make_task(target, ref, regions, as_annotations, model_version, score))
                done.append(path)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    problems.count("tasks", len(tasks))
    return DatasetTasks(tasks, done, labels)


def iter_image_files(folder: Path) -> list[Path]:
    """Images of a folder (any depth), sorted; a single image file is accepted too."""
    from .yolo_files import is_image, list_images

    folder = Path(folder)
    if folder.is_file():
        if not is_image(folder):
            raise ConversionError(f"{folder}: not an image file")
        return [folder]
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such folder of images")
    images = list_images(folder)
    if not images:
        raise ConversionError(f"{folder}: no images found")
    return images
