"""Training data: YOLO-format datasets (with or without data.yaml) and in-memory (image, boxes) lists.

A ``Sample`` is one image with its boxes in that image's pixels. ``load_data(path)`` reads a dataset through
yolo_format.py (the layouts and the one rule for label lines it shares with conversion): ``train`` (and any
other split) trains, ``val`` / ``valid`` validate, ``test`` is kept aside. A label line that is a problem is
logged (file and line) and skipped; a missing or empty label file makes the image a negative (trained on as
background).

``TrainingSet`` (a torch Dataset) caches every image resized to the training size in RAM and applies the
augmentations of an ``AugmentConfig``; ``EvalSet`` holds the validation images resized the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import augment
from .image_files import ImageTooLargeError, image_size, list_images
from .preprocess import read_image, resize_long_side
from .yolo_format import DatasetError, ImageEntry, find_dataset, label_file_for, read_label_file

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


@dataclass
class Sample:
    """One image and its boxes. ``image`` is an HxWx3 uint8 RGB array or a path (read when needed).

    boxes: (n, 4) float32 xyxy in the image's pixels; classes: (n,) int64. n = 0 is a negative image.
    """

    image: Union[np.ndarray, str]
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    name: str = ""

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.classes):
            raise DatasetError(f"sample {self.name or '?'}: {len(self.boxes)} boxes but {len(self.classes)} classes")
        if isinstance(self.image, Path):
            self.image = str(self.image)
        if not self.name:
            self.name = Path(self.image).name if isinstance(self.image, str) else ""

    def load_image(self) -> np.ndarray:
        return read_image(self.image) if isinstance(self.image, str) else self.image


@dataclass
class DataSpec:
    """A dataset: class names and the train / validation samples (val may be empty)."""

    names: List[str]
    train: List[Sample]
    val: List[Sample]
    source: str = "<memory>"
    test: List[Sample] = field(default_factory=list)   # a data.yaml's test split: read, not trained on


def samples_from_arrays(items: Iterable[Tuple[np.ndarray, Sequence, Sequence]]) -> List[Sample]:
    """In-memory list of (RGB image, boxes xyxy pixels, classes) -> samples."""
    return [Sample(image, np.asarray(boxes, np.float32), np.asarray(classes, np.int64), name=f"image{i}")
            for i, (image, boxes, classes) in enumerate(items)]


# --------------------------------------------------------------------------------------------------------------
# YOLO-format folders (read by yolo_format.py, the reader conversion uses too)
# --------------------------------------------------------------------------------------------------------------

VAL_SPLITS = ("val", "valid")


def _image_size(path: Path) -> Tuple[int, int]:
    """(width, height) as ``read_image`` will see it (EXIF orientation applied), from the header where PIL can
    tell; else decode."""
    try:
        return image_size(path)
    except ImageTooLargeError:
        raise
    except Exception:  # noqa: BLE001 - fall back to a full decode
        image = read_image(path)
        return image.shape[1], image.shape[0]


def _sample(entry: ImageEntry) -> Optional[Sample]:
    """The entry's image (path kept; pixels read later) and its boxes in pixels; no label file: a negative.
    None (with a log line) for an image above MAX_IMAGE_PIXELS: it is left out, like a bad label line."""
    try:
        width, height = _image_size(entry.image)
    except ImageTooLargeError as exc:
        log.warning("%s; image left out of the dataset", exc)
        return None
    boxes = read_label_file(entry.label_file) if entry.label_file is not None else []
    xyxy = [[(b.cx - b.w / 2) * width, (b.cy - b.h / 2) * height, (b.cx + b.w / 2) * width,
             (b.cy + b.h / 2) * height] for b in boxes]
    return Sample(str(entry.image), np.asarray(xyxy, np.float32), np.asarray([b.class_id for b in boxes], np.int64),
                  name=entry.image.name)


def samples_from_folder(images_root: Path) -> List[Sample]:
    """Every image under ``images_root`` with its labels."""
    samples = (_sample(ImageEntry(image, label_file_for(image))) for image in list_images(images_root))
    return [sample for sample in samples if sample is not None]


def load_data(path: PathLike) -> DataSpec:
    """Read a YOLO-format dataset from a data.yaml or a folder (layouts: yolo_format.find_dataset).

    Splits named ``val`` / ``valid`` validate, ``test`` is kept aside (``DataSpec.test``), every other split
    trains. Without class names in the dataset, classes are named ``class0``, ``class1``, ... up to the largest id.
    """
    layout = find_dataset(Path(path))
    if layout.from_yaml and layout.names is None:
        raise DatasetError(f"{layout.source}: a data.yaml needs 'names' (and 'train', optionally 'val')")
    splits: dict[str, List[Sample]] = {"train": [], "val": [], "test": []}
    for entry in layout.entries:
        split = "val" if entry.split in VAL_SPLITS else "test" if entry.split == "test" else "train"
        sample = _sample(entry)
        if sample is not None:
            splits[split].append(sample)
    names = layout.names if layout.names is not None else _numbered_names(splits["train"] + splits["val"])
    return DataSpec(names, splits["train"], splits["val"], layout.source, splits["test"])


def _numbered_names(samples: Sequence[Sample]) -> List[str]:
    top = max((int(s.classes.max()) for s in samples if len(s.classes)), default=0)
    return [f"class{i}" for i in range(top + 1)]


def check_classes(samples: Sequence[Sample], nc: int, where: str) -> None:
    for sample in samples:
        if len(sample.classes) and (sample.classes.min() < 0 or sample.classes.max() >= nc):
            raise DatasetError(f"{where}: {sample.name} has class id {int(sample.classes.max())} but the dataset "
                               f"has {nc} names; fix the label file or the names list")


# --------------------------------------------------------------------------------------------------------------
# Training set with augmentation
# --------------------------------------------------------------------------------------------------------------

@dataclass
class AugmentConfig:
    """Augmentation switches and strengths (defaults: the reference's yolov7-tiny scratch recipe)."""

    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float = 0.05

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=0, mosaic=0, mixup=0)


def _scaled_labels(sample: Sample, r: float) -> np.ndarray:
    labels = np.zeros((len(sample.boxes), 5), np.float32)
    labels[:, 0] = sample.classes
    labels[:, 1:] = sample.boxes * r
    return labels


class ResizedImages:
    """Images resized to long side ``size`` (area interpolation when shrinking), cached in RAM on demand
    (``cache=True``), with their labels ``[class, x1, y1, x2, y2]`` in the resized pixels."""

    def __init__(self, samples: Sequence[Sample], size: int, cache: bool = True):
        self.samples = list(samples)
        self.size = size
        self.cache = cache
        self._images: List[Optional[np.ndarray]] = [None] * len(self.samples)
        self._labels: List[Optional[np.ndarray]] = [None] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def fill(self) -> "ResizedImages":
        """Decode everything now (before DataLoader workers fork, so they share the cache)."""
        if self.cache:
            for i in range(len(self)):
                self.get(i)
        return self

    def get(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        image, labels = self._images[index], self._labels[index]
        if image is not None and labels is not None:  # cached together
            return image, labels
        sample = self.samples[index]
        original = sample.load_image()
        image, r = resize_long_side(original, self.size)
        labels = _scaled_labels(sample, r)
        if self.cache:
            self._images[index], self._labels[index] = image, labels
        return image, labels


def labels_to_targets(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """(n, 5) [class, x1, y1, x2, y2] pixels -> (n, 6) [0, class, cx, cy, w, h] normalised."""
    out = np.zeros((len(labels), 6), np.float32)
    if len(labels):
        out[:, 1] = labels[:, 0]
        out[:, 2] = (labels[:, 1] + labels[:, 3]) / 2 / width
        out[:, 3] = (labels[:, 2] + labels[:, 4]) / 2 / height
        out[:, 4] = (labels[:, 3] - labels[:, 1]) / width
        out[:, 5] = (labels[:, 4] - labels[:, 2]) / height
    return out


class TrainingSet(torch.utils.data.Dataset):
    """Square ``size`` x ``size`` training images with augmentation; item = (uint8 CHW tensor, (n, 6) targets).

    Randomness comes from a generator seeded with (seed, epoch, index): the same seed gives the same batches
    whatever the number of workers. Call ``set_epoch`` before each epoch.
    """

    def __init__(self, samples: Sequence[Sample], size: int, augment_config: Optional[AugmentConfig] = None,
                 seed: int = 0, cache: bool = True):
        if not samples:
            raise DatasetError("the training set is empty")
        self.images = ResizedImages(samples, size, cache).fill()
        self.size = size
        self.aug = augment_config if augment_config is not None else AugmentConfig()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _mosaic(self, index: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        others = rng.integers(0, len(self), 3).tolist()
        loaded = [self.images.get(i) for i in [index] + others]
        canvas, labels = augment.mosaic([im for im, _ in loaded], [lb for _, lb in loaded], self.size, rng)
        return augment.random_affine(canvas, labels, rng, (self.size, self.size), self.aug.degrees,
                                     self.aug.translate, self.aug.scale, self.aug.shear)

    def item(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Augmented (image HxWx3 RGB uint8, labels (n, 5) [class, x1, y1, x2, y2] pixels)."""
        rng = np.random.default_rng((self.seed, self.epoch, index))
        aug = self.aug
        if aug.mosaic > 0 and rng.random() < aug.mosaic:
            image, labels = self._mosaic(index, rng)
            if aug.mixup > 0 and rng.random() < aug.mixup:
                other, other_labels = self._mosaic(int(rng.integers(0, len(self))), rng)
                image, labels = augment.mixup(image, labels, other, other_labels, rng)
        else:
            image, labels = self.images.get(index)
            image, labels = augment.letterbox_square(image, labels, self.size)
            if aug.translate or aug.scale or aug.degrees or aug.shear:
                image, labels = augment.random_affine(image, labels, rng, (self.size, self.size), aug.degrees,
                                                      aug.translate, aug.scale, aug.shear)
        image = augment.augment_hsv(image, rng, aug.hsv_h, aug.hsv_s, aug.hsv_v)
        if aug.flipud > 0 and rng.random() < aug.flipud:
            image, labels = augment.flip_vertical(image, labels)
        if aug.fliplr > 0 and rng.random() < aug.fliplr:
            image, labels = augment.flip_horizontal(image, labels)
        return image, labels

    def __getitem__(self, index: int):
        image, labels = self.item(index)
        targets = labels_to_targets(labels, image.shape[1], image.shape[0])
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return tensor, torch.from_numpy(targets)


def collate(batch):
    """Stack images; concatenate targets with column 0 set to the image's index in the batch."""
    images, targets = zip(*batch)
    for i, t in enumerate(targets):
        t[:, 0] = i
    return torch.stack(images, 0), torch.cat(targets, 0)


class EvalSet:
    """Validation images resized to long side ``size`` (like the reference test loader), with their boxes
    scaled the same way; IoU is unchanged by a uniform scale, so metrics equal those in original pixels."""

    def __init__(self, samples: Sequence[Sample], size: int, cache: bool = True):
        self.images = ResizedImages(samples, size, cache).fill()

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        for i in range(len(self.images)):
            image, labels = self.images.get(i)
            yield image, labels[:, 1:5], labels[:, 0].astype(np.int64)
