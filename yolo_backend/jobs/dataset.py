"""The training data, from Label Studio: every annotated task's latest annotation (a submitted one without boxes is
a negative image; one with a class chosen in a served Choices control but no box drawn is left out: the class is
there, its box unknown), its image scaled to the training size, and the train / validation split by a hash of the task
id (stable across jobs: a task never changes sides). Bad regions are skipped and counted (labelstudio/regions.py).
Video tasks, when ``collect_examples`` is given a ``video_dataset.VideoTraining``, give a few sampled frames each,
every one with its clip's task id, so a clip is on one side of the split.

Evaluating a model at a size larger than the training size (a start model that serves at 640) needs the images
larger than they are kept: ``example_eval_set`` reads each one again from the image cache (``Example.reload``),
one batch at a time, so memory stays that of the training-size copies.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import numpy as np

from ..labelstudio.annotations import latest_annotation
from ..labelstudio.client import LabelStudioAPIError
from ..labelstudio.controls import ConfigControls
from ..labelstudio.regions import BadRegion, is_box_region, region_box
from ..labelstudio.urls import cut, shorten
from ..settings import Settings
from ..yolov7 import graphs
from . import TrainingError
from .examples import Example, class_boxes, scale_to
from .states import JobPhase

if TYPE_CHECKING:
    from .video_dataset import VideoTraining

log = logging.getLogger(__name__)

VALIDATION_PERCENT = 20           # share of tasks (by hash of the task id) used for validation
DOWNLOAD_THREADS = 4
DEFAULT_GRAPH = graphs.DEFAULT_GRAPH  # what a trainer starts from without a start checkpoint (random init)


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
    start_img_size: Optional[int] = None  # the size to evaluate the start model at (its serving size, jobs/sizing.py)


@dataclass
class TrainerOutcome:
    """What a trainer returns: the trained checkpoint and how it was made."""

    path: str                                 # the checkpoint written (normally ``TrainingData.out_path``)
    metrics: Optional[dict] = None            # the new model's validation metrics (None without validation data)
    baseline_metrics: Optional[dict] = None   # the start model's on the same images (None: not compared)
    fitness_se: Optional[float] = None        # paired standard error of the fitness difference
    epochs_run: Optional[int] = None
    best_epoch: Optional[int] = None
    stopped_by_budget: Optional[bool] = None
    seconds: Optional[float] = None


Trainer = Callable[[TrainingData, Callable[[dict], None]], TrainerOutcome]


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


def annotation_boxes(annotation: dict, target, width: int, height: int, from_names: Optional[Sequence[str]] = None) \
        -> tuple[np.ndarray, np.ndarray, list, list[BadRegion]]:
    """The annotation's rectangles for ``target`` (or the controls ``from_names``) in pixels of a ``width`` x
    ``height`` image (the rule: labelstudio/regions.py): (boxes xyxy, class ids by the config's label order, labels
    that match no config label, bad regions skipped)."""
    found, bad = [], []
    for region in annotation.get("result") or []:
        if not is_box_region(region, from_names or target.from_name):
            continue
        box = region_box(region, (width, height))
        if isinstance(box, BadRegion):
            bad.append(box)
        else:
            found.append(box)
    boxes, classes, unknown = class_boxes(found, target.labels, width, height)
    return boxes, classes, unknown, bad


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


def chosen_class_without_box(annotation: dict, box_names: Sequence[str],
                              class_choices: Mapping[str, Sequence[str]]) -> bool:
    """Whether the annotation chose a class in a Choices control (``class_choices``: control -> the choices that
    name a box label) and drew no box in the ``box_names`` controls: not a negative, and no box to learn."""
    result = [r for r in annotation.get("result") or [] if isinstance(r, dict)]
    if any(is_box_region(region, box_names) for region in result):
        return False
    for region in result:
        names = class_choices.get(str(region.get("from_name")), ())
        value = region.get("value")
        picked = value.get("choices") if isinstance(value, dict) and str(region.get("type", "")).lower() == "choices" \
            else None
        if names and isinstance(picked, list) and any(str(p) in names for p in picked):
            return True
    return False


def collect_examples(context, project_id: int, target, tasks: list[dict], size: int,
                     report: Callable[[dict], None], controls: Optional[ConfigControls] = None,
                     video: Optional["VideoTraining"] = None) -> tuple[list[Example], dict]:
    """Tasks -> examples (images downloaded through the shared cache); counts of what was used and skipped.
    ``controls``: the config's served controls (boxes of every served RectangleLabels; Choices answers).
    ``video``: the project's VideoRectangle and how to get a task's clip; its video tasks give sampled frames
    (``video_dataset``), with class ids by ``target``'s labels (the VideoRectangle's when ``target`` is None: a
    project of clips only)."""
    counts = {"annotated_tasks": len(tasks), "cancelled_only": 0, "image_failed": 0, "negatives": 0, "boxes": 0,
              "unknown_labels": 0, "bad_regions": 0, "class_chosen_without_box": 0}
    box_names = controls.box_names if controls is not None else (target.from_name,) if target is not None else ()
    class_choices = controls.class_choices() if controls is not None else {}
    if video is not None:
        from .video_dataset import collect_video_examples, is_video_task
    chosen, clips = [], []
    for task in tasks:
        annotation = latest_annotation(task)
        if annotation is None:
            counts["cancelled_only"] += 1
        elif video is not None and (target is None or is_video_task(task, annotation, video.control,
                                                                     target.data_key)):
            clips.append((task, annotation))
        elif chosen_class_without_box(annotation, box_names, class_choices):
            counts["class_chosen_without_box"] += 1
        else:
            chosen.append((task, annotation))
    examples = _image_examples(context, target, chosen, size, report, box_names, counts) if chosen else []
    if video is not None:
        names = target.labels if target is not None else video.control.labels
        found, video_counts = collect_video_examples(video, clips, names, size, report)
        examples += found
        for key, value in video_counts.items():
            counts[key] = counts.get(key, 0) + value
    if counts["unknown_labels"]:
        labels = target.labels if target is not None else video.control.labels  # type: ignore[union-attr]
        log.warning("%d annotated box(es) carry labels that are not in the label config (%s); skipped",
                    counts["unknown_labels"], ", ".join(labels))
    return sorted(examples, key=lambda e: e.task_id), counts


def _image_examples(context, target, chosen: list[tuple[dict, dict]], size: int, report: Callable[[dict], None],
                    box_names: Sequence[str], counts: dict) -> list[Example]:
    """The image tasks' examples (downloaded in threads); adds to ``counts``."""
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
                report({"phase": JobPhase.DOWNLOADING, "images": done[0], "total": len(chosen)})
        height, width = image.shape[:2]
        boxes, classes, unknown, bad = annotation_boxes(annotation, target, width, height, box_names)
        for region in bad:
            log.warning("task %s: %s; skipped", shorten(task.get("id"), 40), cut(region.message, 400))
        small, r = scale_to(image, size)
        reload = functools.partial(context.images.load, url, task.get("id"))  # from the image cache, when needed
        return Example(int(task["id"]), np.ascontiguousarray(small), boxes * r, classes, reload, r), unknown, bad

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
    return examples


def usable_annotations(tasks: list[dict]) -> int:
    """How many of ``tasks`` have a latest annotation that was not cancelled (what a training would use, images
    permitting)."""
    return sum(1 for task in tasks if latest_annotation(task) is not None)


class ExampleImages:
    """Examples as an evaluation set reads them (``yolov7.dataset.ResizedImages``' interface: ``len`` and
    ``get(i) -> (image, labels [class, x1, y1, x2, y2])``) at long side ``size``. An image kept smaller than that
    is read again at full size (``Example.reload``) and dropped after use; ``class_map`` renumbers the classes
    (label index -> the model's class index)."""

    def __init__(self, examples: list[Example], size: int, class_map: Optional[list[int]] = None):
        self.examples, self.size, self.class_map = list(examples), size, class_map
        self.reloaded = 0   # how many came from the image cache (tests, log)

    def __len__(self) -> int:
        return len(self.examples)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        from ..yolov7.preprocess import resize_long_side

        example = self.examples[index]
        image, boxes = example.image, example.boxes
        if max(image.shape[:2]) < self.size and example.reload is not None and example.scale < 1:
            try:
                image, boxes = example.reload(), example.boxes / example.scale
                self.reloaded += 1
            except Exception as exc:  # gone from the cache and the source: the kept copy, upscaled, will do
                log.info("task %s: image not available again (%s); evaluating its smaller copy", example.task_id,
                         cut(exc, 200))
        resized, r = resize_long_side(image, self.size)
        classes = example.classes if self.class_map is None else np.asarray(
            [self.class_map[c] for c in example.classes], np.int64)
        labels = np.zeros((len(boxes), 5), np.float32)
        labels[:, 0] = classes
        labels[:, 1:] = boxes * r
        return resized, labels


def example_eval_set(examples: list[Example], size: int, class_map: Optional[list[int]] = None):
    """A ``yolov7.dataset.EvalSet`` over ``examples`` at ``size`` that keeps nothing (``ExampleImages``)."""
    from ..yolov7.dataset import EvalSet

    eval_set = EvalSet([], size, cache=False)
    # its one source of images (EvalSet.__iter__), duck-typed: EvalSet calls only len() and get()
    eval_set.images = ExampleImages(examples, size, class_map)  # type: ignore[assignment]
    return eval_set


def class_map(model_names: list[str], label_names: list[str]) -> Optional[list[int]]:
    """Label index -> the model's class index, matched case-insensitively; None when the two name sets differ
    (the model cannot be scored on these labels)."""
    index = {str(name).lower(): i for i, name in enumerate(model_names)}
    if len(index) != len(model_names) or sorted(index) != sorted(str(n).lower() for n in label_names):
        return None
    return [index[str(name).lower()] for name in label_names]
