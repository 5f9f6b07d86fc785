"""The training data, from Label Studio: every annotated task's latest annotation (a submitted one without boxes is
a negative image), its image scaled to the training size, and the train / validation split by a hash of the task
id (stable across jobs: a task never changes sides). Bad regions are skipped and counted (labelstudio/regions.py).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..labelstudio.annotations import latest_annotation
from ..labelstudio.client import LabelStudioAPIError
from ..labelstudio.regions import BadRegion, is_box_region, region_box
from ..labelstudio.urls import cut, shorten
from ..settings import Settings
from ..yolov7 import graphs
from . import TrainingError

log = logging.getLogger(__name__)

VALIDATION_PERCENT = 20           # share of tasks (by hash of the task id) used for validation
DOWNLOAD_THREADS = 4
DEFAULT_GRAPH = graphs.DEFAULT_GRAPH  # what a trainer starts from without a start checkpoint (random init)


@dataclass
class Example:
    """One annotated task: its image scaled to the training size, boxes (xyxy pixels of that image), classes."""

    task_id: int
    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray


@dataclass
class TrainingData:
    """What a trainer gets."""

    train: list[Example]
    val: list[Example]
    names: list[str]
    start_checkpoint: Optional[str]   # None: random init of DEFAULT_GRAPH
    parent_version: Optional[str]
    out_path: Path
    settings: Settings
    extra: dict = field(default_factory=dict)


Trainer = Callable[[TrainingData, Callable[[dict], None]], dict]


def annotated_tasks(client, project_id: int) -> list[dict]:
    """Every task of the project that has at least one annotation, with its annotations.

    Label Studio's JSON export lists exactly those; when a server refuses it, the task list is read page by page
    instead (a task listed without its annotations is read on its own).
    """
    try:
        return [t for t in client.export_tasks(project_id) if isinstance(t, dict) and t.get("annotations")]
    except LabelStudioAPIError as exc:
        log.info("project %s: the export failed (%s); reading the task list page by page instead", project_id, exc)
    try:
        found = []
        for task in client.tasks(project_id, with_annotations=True):
            if task.get("annotations") is None and task.get("total_annotations"):
                task = client.get_task(task["id"])
            if task.get("annotations"):
                found.append(task)
        return found
    except LabelStudioAPIError as exc:
        raise TrainingError(str(exc)) from None


def annotation_boxes(annotation: dict, target, width: int, height: int) \
        -> tuple[np.ndarray, np.ndarray, list, list[BadRegion]]:
    """The annotation's rectangles for ``target`` in pixels of a ``width`` x ``height`` image (the rule:
    labelstudio/regions.py): (boxes xyxy, class ids by the config's label order, labels that match no config
    label, bad regions skipped)."""
    index = {label.lower(): i for i, label in enumerate(target.labels)}
    boxes, classes, unknown, bad = [], [], [], []
    for region in annotation.get("result") or []:
        if not is_box_region(region, target.from_name):
            continue
        box = region_box(region, (width, height))
        if isinstance(box, BadRegion):
            bad.append(box)
            continue
        cls = index.get(box.label.lower())
        if cls is None:
            unknown.append(box.label)
            continue
        boxes.append(box.pixels(width, height))
        classes.append(cls)
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64), unknown, bad)


def is_validation(project_id: int, task_id: int) -> bool:
    """Deterministic split: a task is in the validation set iff the hash of its id says so (stable over jobs)."""
    digest = hashlib.sha256(f"{project_id}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < VALIDATION_PERCENT


def split_examples(project_id: int, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    train = [e for e in examples if not is_validation(project_id, e.task_id)]
    val = [e for e in examples if is_validation(project_id, e.task_id)]
    if not train and val:  # everything hashed to validation (tiny sets): train on all, validate on none
        return val, []
    return train, val


def scale_to(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Downscale so the long side is at most ``size`` (training resizes there anyway); returns (image, factor)."""
    from ..yolov7.preprocess import resize_long_side

    return resize_long_side(image, size, allow_upscale=False)


def collect_examples(context, project_id: int, target, tasks: list[dict], size: int,
                     report: Callable[[dict], None]) -> tuple[list[Example], dict]:
    """Tasks -> examples (images downloaded through the shared cache); counts of what was used and skipped."""
    counts = {"annotated_tasks": len(tasks), "cancelled_only": 0, "image_failed": 0, "negatives": 0, "boxes": 0,
              "unknown_labels": 0, "bad_regions": 0}
    chosen = []
    for task in tasks:
        annotation = latest_annotation(task)
        if annotation is None:
            counts["cancelled_only"] += 1
            continue
        chosen.append((task, annotation))
    done = [0]
    lock = threading.Lock()

    def load(item):
        task, annotation = item
        url = (task.get("data") or {}).get(target.data_key)
        try:
            image = context.images.load(url, task.get("id"))
        except Exception as exc:  # one bad image must not fail the job
            log.warning("task %s: image not available, not trained on: %s", shorten(task.get("id"), 40),
                        cut(exc, 600))
            return None
        finally:
            with lock:
                done[0] += 1
                report({"phase": "downloading", "images": done[0], "total": len(chosen)})
        height, width = image.shape[:2]
        boxes, classes, unknown, bad = annotation_boxes(annotation, target, width, height)
        for region in bad:
            log.warning("task %s: %s; skipped", shorten(task.get("id"), 40), cut(region.message, 400))
        small, r = scale_to(image, size)
        return Example(int(task["id"]), np.ascontiguousarray(small), boxes * r, classes), unknown, bad

    examples = []
    with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="train-download") as pool:
        for item in pool.map(load, chosen):
            if item is None:
                counts["image_failed"] += 1
                continue
            example, unknown, bad = item
            counts["unknown_labels"] += len(unknown)
            counts["bad_regions"] += len(bad)
            counts["boxes"] += len(example.boxes)
            counts["negatives"] += int(len(example.boxes) == 0)
            examples.append(example)
    if counts["unknown_labels"]:
        log.warning("%d annotated box(es) carry labels that are not in the label config (%s); skipped",
                    counts["unknown_labels"], ", ".join(target.labels))
    return sorted(examples, key=lambda e: e.task_id), counts
