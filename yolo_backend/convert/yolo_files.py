"""YOLO datasets on disk: find the images and their label files, read labels strictly, write a dataset.

Layouts read (the usual ones):

* a ``data.yaml`` (or a folder holding one) with ``names`` (list, or mapping id -> name) and ``train`` / ``val``
  / ``test`` entries: a folder of images, a list of folders, or a ``.txt`` list of image paths; relative entries
  are resolved against ``path`` (itself relative to the yaml's folder) or the yaml's folder;
* a folder with ``images/`` (any depth, e.g. ``images/train``, ``images/valid``) and ``labels/`` mirroring it;
* a folder with ``<split>/images`` and ``<split>/labels`` (Roboflow's export);
* a flat folder of images with the ``.txt`` label files beside them (a folder named ``images`` also finds
  ``../labels``).

Class names come from the yaml, else a ``classes.txt`` (root, ``labels/`` or beside the images), else the caller.
Label files: one ``class cx cy w h`` line per box, normalised to the image size. A missing label file means the
image was never labelled (no boxes to import); an empty one means a labelled image without objects (a negative).

No torch here: image sizes come from the file header (PIL), not a decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import yaml

from .problems import ConversionError, ProblemLog

# Kept equal to the detector's list (yolo_backend.yolov7.preprocess.IMAGE_SUFFIXES) without importing cv2 here.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
SPLIT_KEYS = ("train", "val", "test")

# Box edges may pass the image border by this much (float noise in exported labels) before it is a problem.
EDGE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class YoloBox:
    """One box, normalised to the image: centre, size."""

    class_id: int
    cx: float
    cy: float
    w: float
    h: float

    def line(self) -> str:
        return f"{self.class_id} {self.cx:.10f} {self.cy:.10f} {self.w:.10f} {self.h:.10f}"


@dataclass(frozen=True)
class ImageEntry:
    """An image of a dataset, its label file (None: not labelled) and the split it came from."""

    image: Path
    label_file: Optional[Path]
    split: str = ""


@dataclass
class DatasetLayout:
    root: Path                              # what relative image paths are relative to by default
    entries: list[ImageEntry]
    names: Optional[list[str]] = None       # class names when the dataset says (yaml, classes.txt)
    source: str = ""                        # for messages: the yaml or folder read
    notes: list[str] = field(default_factory=list)


# --- images -------------------------------------------------------------------------------------------------

def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path, recursive: bool = True) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if is_image(p))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the file header; no pixel decode.

    Raises ConversionError naming the file when it is not a readable image.
    """
    from ..yolov7.preprocess import ImageReadError, image_size as header_size

    try:
        return header_size(path)
    except ImageReadError as exc:
        raise ConversionError(str(exc)) from None


# --- label files ----------------------------------------------------------------------------------------------

def label_file_for(image: Path) -> Optional[Path]:
    """The image's label file: ``labels/`` mirroring the last ``images/`` folder of its path, else beside it.
    None when neither exists (an unlabelled image)."""
    parts = list(image.parts)
    candidates = []
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            candidates.append(Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt"))
            break
    candidates.append(image.with_suffix(".txt"))
    return next((c for c in candidates if c.is_file()), None)


def _in_unit(value: float) -> bool:
    return 0.0 <= value <= 1.0


def read_label_file(path: Path, nc: Optional[int], problems: ProblemLog) -> list[YoloBox]:
    """The boxes of a YOLO label file. Malformed lines are reported (file and line) and skipped.

    A polygon line (YOLO segmentation format) counts as its bounding box. A line is malformed when it does not
    have 5 fields (or an odd number of at least 7), a field is not a number, the class id is not a whole
    number in [0, nc), a coordinate is outside [0, 1] or the box has no area. A box whose edges pass the image
    border (by more than EDGE_TOLERANCE) is clipped to the image and reported.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: cannot read the label file ({exc})") from None
    boxes = []
    for number, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields:
            continue
        polygon = len(fields) >= 7 and len(fields) % 2 == 1  # segmentation format: class x1 y1 x2 y2 x3 y3 ...
        if len(fields) != 5 and not polygon:
            problems.report("wrong field count", path, f"expected 5 fields 'class cx cy w h' (or a polygon "
                            f"'class x1 y1 x2 y2 x3 y3 ...'), found {len(fields)} ({raw.strip()[:60]!r})", number)
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.report("non-numeric", path, f"not numbers: {raw.strip()[:60]!r}", number)
            continue
        if polygon:  # its bounding box, as the training reader does
            xs, ys = values[1::2], values[2::2]
            values = [values[0], (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs),
                      max(ys) - min(ys)]
            problems.count("polygons read as their bounding box")
        cls, cx, cy, w, h = values
        if not all(math.isfinite(v) for v in values):
            problems.report("non-numeric", path, f"not finite numbers: {raw.strip()[:60]!r}", number)
            continue
        if cls != int(cls) or cls < 0 or (nc is not None and cls >= nc):
            known = f"0..{nc - 1}" if nc else "none"
            problems.report("unknown class id", path, f"class id {fields[0]} is not a known class "
                            f"(known ids: {known})", number)
            continue
        if not all(_in_unit(v) for v in (cx, cy, w, h)):
            problems.report("out-of-range value", path, "coordinates must be normalised to [0, 1]: "
                            f"{raw.strip()[:60]!r}", number)
            continue
        if w <= 0 or h <= 0:
            problems.report("empty box", path, f"box has no area (w={fields[3]}, h={fields[4]})", number)
            continue
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        if min(x1, y1) < -EDGE_TOLERANCE or max(x2, y2) > 1 + EDGE_TOLERANCE:
            problems.report("clipped box", path, f"box passes the image border ({raw.strip()[:60]!r})", number,
                            skipped="clipped to the image")
            x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0)
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        boxes.append(YoloBox(int(cls), cx, cy, w, h))
    return boxes


def write_label_file(path: Path, boxes: Iterable[YoloBox]) -> None:
    lines = [box.line() for box in boxes]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# --- class names ----------------------------------------------------------------------------------------------

def names_from_yaml_value(value, where) -> list[str]:
    if isinstance(value, dict):
        try:
            ids = sorted(value, key=int)
        except (TypeError, ValueError):
            raise ConversionError(f"{where}: 'names' as a mapping needs class ids (0, 1, ...) as keys") from None
        if [int(i) for i in ids] != list(range(len(ids))):
            raise ConversionError(f"{where}: 'names' ids must be 0..{len(ids) - 1} without gaps")
        return [str(value[i]) for i in ids]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ConversionError(f"{where}: 'names' must be a list or a mapping of class id to name")


def read_classes_txt(folders: Sequence[Path]) -> Optional[list[str]]:
    for folder in folders:
        candidate = folder / "classes.txt"
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


def write_data_yaml(path: Path, names: Sequence[str], images: str = "images") -> None:
    """A data.yaml the training side reads: train and val both point at ``images`` (split it as you like)."""
    body = {"train": images, "val": images, "nc": len(names), "names": list(names)}
    path.write_text("# YOLO dataset written by YoloToLabelStudio.py (train and val share the images; split as "
                    "needed)\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")


# --- finding a dataset ------------------------------------------------------------------------------------------

def _entries(images: Iterable[Path], split: str) -> list[ImageEntry]:
    return [ImageEntry(image, label_file_for(image), split) for image in images]


def _split_images(item: str, base: Path, yaml_dir: Path, where: Path, key: str) -> list[Path]:
    candidates = [Path(item)] if Path(item).is_absolute() else [base / item, yaml_dir / item]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise ConversionError(f"{where}: {key} entry {item!r} not found (tried "
                              f"{', '.join(str(c) for c in candidates)})")
    if found.is_dir():
        if (found / "images").is_dir():  # 'train: train' in Roboflow style points at the split folder
            found = found / "images"
        return list_images(found)
    if found.suffix.lower() == ".txt":  # a list of image paths, relative to the dataset base
        images = []
        for line in found.read_text(encoding="utf-8").splitlines():
            if line.strip():
                p = Path(line.strip())
                images.append(p if p.is_absolute() else base / p)
        missing = [p for p in images if not p.is_file()]
        if missing:
            raise ConversionError(f"{found}: lists {len(missing)} image(s) that do not exist, e.g. {missing[0]}")
        return images
    if is_image(found):
        return [found]
    raise ConversionError(f"{where}: {key} entry {item!r} is neither a folder of images nor a .txt list")


def _from_yaml(path: Path) -> DatasetLayout:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConversionError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a mapping with names/train/val")
    names = names_from_yaml_value(config["names"], path) if "names" in config else None
    if names is not None and "nc" in config and int(config["nc"]) != len(names):
        raise ConversionError(f"{path}: nc is {config['nc']} but {len(names)} names are listed")
    base = Path(str(config["path"])) if config.get("path") else path.parent
    if not base.is_absolute():
        base = path.parent / base
    entries: list[ImageEntry] = []
    seen: set[Path] = set()
    for key in SPLIT_KEYS:
        value = config.get(key)
        if not value:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            for image in _split_images(str(item), base, path.parent, path, key):
                resolved = image.resolve()
                if resolved not in seen:  # an image listed in two splits is imported once
                    seen.add(resolved)
                    entries += _entries([image], key)
    if not entries:
        raise ConversionError(f"{path}: no images found under its train/val/test entries")
    return DatasetLayout(base, entries, names, str(path))


def find_dataset(path: Path) -> DatasetLayout:
    """Find the images, label files and (when the dataset says) class names under ``path``."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such dataset folder or data.yaml")
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            return _from_yaml(path)
        raise ConversionError(f"{path}: expected a dataset folder or a data.yaml")
    for name in YAML_NAMES:
        if (path / name).is_file():
            return _from_yaml(path / name)
    if (path / "images").is_dir():
        images_dir = path / "images"
        entries = []
        for image in list_images(images_dir):
            rel = image.relative_to(images_dir)
            entries += _entries([image], rel.parts[0] if len(rel.parts) > 1 else "")
        names = read_classes_txt([path, path / "labels"])
        return _check(DatasetLayout(path, entries, names, str(path)))
    split_dirs = [d for d in sorted(path.iterdir()) if d.is_dir() and (d / "images").is_dir()]
    if split_dirs:
        entries = [e for d in split_dirs for e in _entries(list_images(d / "images"), d.name)]
        names = read_classes_txt([path] + [d / "labels" for d in split_dirs])
        return _check(DatasetLayout(path, entries, names, str(path)))
    entries = _entries(list_images(path, recursive=False), "")
    parents = [path] + ([path.parent / "labels", path.parent] if path.name == "images" else [])
    return _check(DatasetLayout(path, entries, read_classes_txt(parents), str(path)))


def _check(layout: DatasetLayout) -> DatasetLayout:
    if not layout.entries:
        raise ConversionError(f"{layout.source}: no images found ({', '.join(IMAGE_SUFFIXES)}); expected a YOLO "
                              "dataset: images/ and labels/ side by side, a data.yaml, or images with .txt beside")
    return layout
