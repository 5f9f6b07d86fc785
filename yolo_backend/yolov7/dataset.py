"""Training data: YOLO-format folders (with or without data.yaml) and in-memory (image, boxes) lists.

A ``Sample`` is one image with its boxes in that image's pixels. ``load_data(path)`` reads a dataset:

* a ``data.yaml`` (``names``, ``train``, ``val``; paths relative to its ``path`` key or to its folder),
* a folder holding a data.yaml, or ``images/{train,val|valid}`` beside ``labels/{...}``, or
  ``{train,valid}/images`` (Roboflow layout), or just ``images/`` + ``labels/`` (train only).

Label files are ``labels/<same relative path>.txt`` beside ``images/``: one ``class cx cy w h`` line per box,
normalised; an empty or missing label file makes the image a negative (trained on as background).

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
import yaml

from . import augment
from .preprocess import IMAGE_SUFFIXES, image_size, read_image, resize_long_side

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


class DatasetError(ValueError):
    """A dataset cannot be read; the message names the file or folder and what to fix."""


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


def samples_from_arrays(items: Iterable[Tuple[np.ndarray, Sequence, Sequence]]) -> List[Sample]:
    """In-memory list of (RGB image, boxes xyxy pixels, classes) -> samples."""
    return [Sample(image, boxes, classes, name=f"image{i}") for i, (image, boxes, classes) in enumerate(items)]


# --------------------------------------------------------------------------------------------------------------
# YOLO-format folders
# --------------------------------------------------------------------------------------------------------------

def list_images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def label_path_for(image: Path, images_root: Path) -> Path:
    """``.../images/<rel>.jpg`` -> ``.../labels/<rel>.txt`` (the reference convention)."""
    parts = list(images_root.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    else:
        return image.with_suffix(".txt")  # labels next to the images
    return Path(*parts) / image.relative_to(images_root).with_suffix(".txt")


def read_label_file(path: Path, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """YOLO txt -> (boxes xyxy pixels, classes). Missing/empty file: no boxes. Bad lines are skipped and logged."""
    if not path.is_file():
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    boxes, classes = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            log.warning("%s:%d: not numbers, line skipped", path, number)
            continue
        if len(values) == 5:
            cls, cx, cy, w, h = values
        elif len(values) > 5 and len(values) % 2 == 1:  # a polygon: its bounding box
            cls, xs, ys = values[0], values[1::2], values[2::2]
            cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
            w, h = max(xs) - min(xs), max(ys) - min(ys)
        else:
            log.warning("%s:%d: expected 'class cx cy w h', line skipped", path, number)
            continue
        if cls < 0 or cls != int(cls) or w <= 0 or h <= 0:
            log.warning("%s:%d: bad class or empty box, line skipped", path, number)
            continue
        x1, y1 = max(cx - w / 2, 0.0), max(cy - h / 2, 0.0)
        x2, y2 = min(cx + w / 2, 1.0), min(cy + h / 2, 1.0)
        boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
        classes.append(int(cls))
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)


def _image_size(path: Path) -> Tuple[int, int]:
    """(width, height) as ``read_image`` will see it (EXIF orientation applied), from the header where PIL can
    tell; else decode."""
    try:
        return image_size(path)
    except Exception:  # noqa: BLE001 - fall back to a full decode
        image = read_image(path)
        return image.shape[1], image.shape[0]


def samples_from_folder(images_root: Path) -> List[Sample]:
    """Every image under ``images_root`` with its labels (paths kept; pixels read later)."""
    samples = []
    for image_path in list_images(images_root):
        width, height = _image_size(image_path)
        boxes, classes = read_label_file(label_path_for(image_path, images_root), width, height)
        samples.append(Sample(str(image_path), boxes, classes, name=image_path.name))
    return samples


def _names_from_yaml(value, path: Path) -> List[str]:
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value, key=int)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise DatasetError(f"{path}: 'names' must be a list or a mapping of class id to name")


def _resolve_split(entry, base: Path, yaml_dir: Path, path: Path, key: str) -> List[Path]:
    if entry is None:
        return []
    entries = entry if isinstance(entry, (list, tuple)) else [entry]
    out = []
    for item in entries:
        candidates = [Path(item)] if Path(item).is_absolute() else [base / item, yaml_dir / item]
        found = next((c.resolve() for c in candidates if c.exists()), None)
        if found is None:
            tried = ", ".join(str(c) for c in candidates)
            raise DatasetError(f"{path}: {key} folder {item!r} not found (tried {tried})")
        if found.is_file() and found.suffix == ".txt":  # a list of image paths
            raise DatasetError(f"{path}: {key} as a .txt list of images is not supported; point to a folder")
        out.append(found)
    return out


def _from_yaml(path: Path) -> DataSpec:
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict) or "names" not in config:
        raise DatasetError(f"{path}: a data.yaml needs 'names' (and 'train', optionally 'val')")
    names = _names_from_yaml(config["names"], path)
    if "nc" in config and int(config["nc"]) != len(names):
        raise DatasetError(f"{path}: nc is {config['nc']} but {len(names)} names are listed")
    base = Path(config["path"]) if config.get("path") else path.parent
    if not base.is_absolute():
        base = path.parent / base
    train_dirs = _resolve_split(config.get("train"), base, path.parent, path, "train")
    val_dirs = _resolve_split(config.get("val"), base, path.parent, path, "val")
    if not train_dirs and not val_dirs:
        raise DatasetError(f"{path}: neither 'train' nor 'val' is set")
    train = [s for d in train_dirs for s in samples_from_folder(d)]
    val = [s for d in val_dirs for s in samples_from_folder(d)]
    return DataSpec(names, train, val, str(path))


def _names_from_folder(root: Path, samples: Sequence[Sample]) -> List[str]:
    for candidate in (root / "classes.txt", root / "labels" / "classes.txt"):
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
    top = max((int(c.max()) for s in samples if len(s.classes) for c in [s.classes]), default=0)
    return [f"class{i}" for i in range(top + 1)]


def load_data(path: PathLike) -> DataSpec:
    """Read a YOLO-format dataset from a data.yaml or a folder (see the module doc for the layouts)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such data.yaml or dataset folder")
    if path.is_file():
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise DatasetError(f"{path}: expected a data.yaml or a dataset folder")
        return _from_yaml(path)
    for name in ("data.yaml", "data.yml", "dataset.yaml"):
        if (path / name).is_file():
            return _from_yaml(path / name)
    layouts = [
        (path / "images" / "train", [path / "images" / "val", path / "images" / "valid"]),
        (path / "train" / "images", [path / "valid" / "images", path / "val" / "images"]),
        (path / "images", []),
    ]
    for train_dir, val_dirs in layouts:
        if train_dir.is_dir():
            train = samples_from_folder(train_dir)
            val_dir = next((d for d in val_dirs if d.is_dir()), None)
            val = samples_from_folder(val_dir) if val_dir else []
            if not train and not val:
                raise DatasetError(f"{train_dir}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
            return DataSpec(_names_from_folder(path, train + val), train, val, str(path))
    if list_images(path):  # a bare folder of images (e.g. a split's images/ folder): labels beside in ../labels
        samples = samples_from_folder(path)
        return DataSpec(_names_from_folder(path.parent, samples), samples, [], str(path))
    raise DatasetError(f"{path}: no data.yaml, images/ folder or images found; expected a YOLO dataset "
                       "(images/ and labels/ side by side, or a data.yaml with names/train/val)")


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
        image = self._images[index]
        if image is not None:
            return image, self._labels[index]
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
