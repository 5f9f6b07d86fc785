"""The YOLO dataset format, read one way for training (dataset.py) and for conversion (yolo_backend.convert).

Layouts ``find_dataset`` reads (the usual ones):

* a ``data.yaml`` (or a folder holding one) with ``names`` (a list, or a mapping id -> name without gaps) and
  ``train`` / ``val`` / ``test`` entries: a folder of images, a list of folders, or a ``.txt`` list of image paths;
  relative entries are resolved against ``path`` (itself relative to the yaml's folder) or the yaml's folder;
* a folder with ``images/`` (any depth, e.g. ``images/train``, ``images/valid``: the first subfolder names the
  split) and ``labels/`` mirroring it;
* a folder with ``<split>/images`` and ``<split>/labels`` (Roboflow's export);
* a folder of images (any depth) with the ``.txt`` label files beside them, or in ``labels/`` mirroring the last
  ``images/`` folder of their path.

Class names come from the yaml, else a ``classes.txt`` (root, ``labels/`` or beside the images), else the caller.
A missing label file means the image was never labelled; an empty one, a labelled image without objects.

One rule for label lines (``read_label_file``), whoever reads them: ``class cx cy w h`` normalised to the image as
displayed (EXIF orientation applied), or a polygon ``class x1 y1 x2 y2 x3 y3 ...`` read as its bounding box. A line
with the wrong field count, a field that is not a finite number, a class id that is not a whole number in [0, nc),
a value outside [0, 1] or a box without area is a problem: reported and skipped, or fatal with ``strict``. A box
whose edges pass the image border (by more than EDGE_TOLERANCE) is clipped to the image, and reported (fatal with
``strict``) too.

Standard library, PyYAML and PIL (image headers) only: no torch, no OpenCV.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import yaml

from .image_files import IMAGE_SUFFIXES, is_image, list_images

log = logging.getLogger(__name__)

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
SPLIT_KEYS = ("train", "val", "test")

# Box edges may pass the image border by this much (float noise in exported labels) before it is a problem.
EDGE_TOLERANCE = 1e-6

SKIPPED = "line skipped"
CLIPPED = "clipped to the image"


class DatasetError(ValueError):
    """A dataset cannot be read; the message names the file or folder and what to fix."""


@dataclass(frozen=True)
class Problem:
    """Something wrong in a dataset, and where: a file (and line), or e.g. "task 12"."""

    kind: str              # short category for summaries, e.g. "wrong field count"
    where: str
    message: str
    line: Optional[int] = None

    def __str__(self) -> str:
        place = f"{self.where}:{self.line}" if self.line is not None else self.where
        return f"{place}: {self.message}"


class LabelLineError(DatasetError):
    """A label line is a problem and ``strict`` reading makes it fatal; ``problem`` says which."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


# What a lenient reader does with a problem: ``report(problem, outcome)``, outcome SKIPPED or CLIPPED.
Reporter = Callable[[Problem, str], None]


def log_problem(problem: Problem, outcome: str) -> None:
    log.warning("%s; %s", problem, outcome)


@dataclass(frozen=True)
class YoloBox:
    """One box, normalised to the image: centre, size. ``polygon``: read from a polygon line."""

    class_id: int
    cx: float
    cy: float
    w: float
    h: float
    polygon: bool = field(default=False, compare=False)

    def line(self) -> str:
        return f"{self.class_id} {self.cx:.10f} {self.cy:.10f} {self.w:.10f} {self.h:.10f}"


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


def _parse_line(fields: list[str], raw: str, nc: Optional[int]):
    """(YoloBox, None) for a good line, (YoloBox, (kind, message)) for a clipped one, (None, (kind, message))
    for a bad one."""
    polygon = len(fields) >= 7 and len(fields) % 2 == 1  # segmentation format: class x1 y1 x2 y2 x3 y3 ...
    text = raw.strip()[:60]
    if len(fields) != 5 and not polygon:
        return None, ("wrong field count", f"expected 5 fields 'class cx cy w h' (or a polygon "
                      f"'class x1 y1 x2 y2 x3 y3 ...'), found {len(fields)} ({text!r})")
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return None, ("non-numeric", f"not numbers: {text!r}")
    if polygon:
        xs, ys = values[1::2], values[2::2]
        values = [values[0], (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs),
                  max(ys) - min(ys)]
    cls, cx, cy, w, h = values
    if not all(math.isfinite(v) for v in values):
        return None, ("non-numeric", f"not finite numbers: {text!r}")
    if cls != int(cls) or cls < 0 or (nc is not None and cls >= nc):
        known = f"0..{nc - 1}" if nc else "none"
        return None, ("unknown class id", f"class id {fields[0]} is not a known class (known ids: {known})")
    if not all(_in_unit(v) for v in (cx, cy, w, h)):
        return None, ("out-of-range value", f"coordinates must be normalised to [0, 1]: {text!r}")
    if w <= 0 or h <= 0:
        return None, ("empty box", f"box has no area (w={fields[3]}, h={fields[4]})")
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if min(x1, y1) >= -EDGE_TOLERANCE and max(x2, y2) <= 1 + EDGE_TOLERANCE:
        return YoloBox(int(cls), cx, cy, w, h, polygon), None
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0)
    clipped = YoloBox(int(cls), (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, polygon)
    return clipped, ("clipped box", f"box passes the image border ({text!r})")


def read_label_file(path: Path, nc: Optional[int] = None, *, strict: bool = False,
                    report: Reporter = log_problem) -> list[YoloBox]:
    """The boxes of a YOLO label file, by the module's one rule for lines.

    ``nc``: class ids must be below it (None: any whole id >= 0). Lenient (default): each problem goes to
    ``report`` (default: a logged warning naming file and line) and its line is skipped, or its box clipped.
    ``strict``: the first problem raises LabelLineError. An unreadable file raises DatasetError.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the label file ({exc})") from None
    boxes = []
    for number, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields:
            continue
        box, trouble = _parse_line(fields, raw, nc)
        if trouble is not None:
            problem = Problem(trouble[0], str(path), trouble[1], number)
            if strict:
                raise LabelLineError(problem)
            report(problem, SKIPPED if box is None else CLIPPED)
        if box is not None:
            boxes.append(box)
    return boxes


def write_label_file(path: Path, boxes: Iterable[YoloBox]) -> None:
    lines = [box.line() for box in boxes]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# --- class names ----------------------------------------------------------------------------------------------

def names_from_yaml_value(value, where) -> list[str]:
    """``names`` of a data.yaml: a list, or a mapping of class ids 0..n-1 (a gap would shift every later class)."""
    if isinstance(value, dict):
        try:
            ids = sorted(value, key=int)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: 'names' as a mapping needs class ids (0, 1, ...) as keys") from None
        if [int(i) for i in ids] != list(range(len(ids))):
            raise DatasetError(f"{where}: 'names' ids must be 0..{len(ids) - 1} without gaps")
        return [str(value[i]) for i in ids]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise DatasetError(f"{where}: 'names' must be a list or a mapping of class id to name")


def read_classes_txt(folders: Sequence[Path]) -> Optional[list[str]]:
    for folder in folders:
        candidate = folder / "classes.txt"
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


# --- finding a dataset ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageEntry:
    """An image of a dataset, its label file (None: not labelled) and the split it came from."""

    image: Path
    label_file: Optional[Path]
    split: str = ""


@dataclass
class DatasetLayout:
    root: Path                              # what relative image paths are relative to by default
    entries: list[ImageEntry]               # split by split, sorted within each; an image may be in two splits
    names: Optional[list[str]] = None       # class names when the dataset says (yaml, classes.txt)
    source: str = ""                        # for messages: the yaml or folder read
    from_yaml: bool = False
    notes: list[str] = field(default_factory=list)


def _entries(images: Iterable[Path], split: str) -> list[ImageEntry]:
    return [ImageEntry(image, label_file_for(image), split) for image in images]


def _split_images(item: str, base: Path, yaml_dir: Path, where: Path, key: str) -> list[Path]:
    candidates = [Path(item)] if Path(item).is_absolute() else [base / item, yaml_dir / item]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise DatasetError(f"{where}: {key} entry {item!r} not found (tried "
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
            raise DatasetError(f"{found}: lists {len(missing)} image(s) that do not exist, e.g. {missing[0]}")
        return images
    if is_image(found):
        return [found]
    raise DatasetError(f"{where}: {key} entry {item!r} is neither a folder of images nor a .txt list")


def _from_yaml(path: Path) -> DatasetLayout:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise DatasetError(f"{path}: expected a mapping with names/train/val")
    names = names_from_yaml_value(config["names"], path) if "names" in config else None
    if names is not None and "nc" in config and int(config["nc"]) != len(names):
        raise DatasetError(f"{path}: nc is {config['nc']} but {len(names)} names are listed")
    base = Path(str(config["path"])) if config.get("path") else path.parent
    if not base.is_absolute():
        base = path.parent / base
    entries: list[ImageEntry] = []
    for key in SPLIT_KEYS:
        value = config.get(key)
        if not value:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            entries += _entries(_split_images(str(item), base, path.parent, path, key), key)
    if not entries:
        raise DatasetError(f"{path}: no images found under its train/val/test entries")
    return DatasetLayout(base, entries, names, str(path), from_yaml=True)


def find_dataset(path: Path) -> DatasetLayout:
    """Find the images, label files and (when the dataset says) class names under ``path``."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such dataset folder or data.yaml")
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            return _from_yaml(path)
        raise DatasetError(f"{path}: expected a dataset folder or a data.yaml")
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
    entries = _entries(list_images(path), "")
    parents = [path] + ([path.parent / "labels", path.parent] if path.name == "images" else [])
    return _check(DatasetLayout(path, entries, read_classes_txt(parents), str(path)))


def _check(layout: DatasetLayout) -> DatasetLayout:
    if not layout.entries:
        raise DatasetError(f"{layout.source}: no data.yaml and no images found ({', '.join(IMAGE_SUFFIXES)}); "
                           "expected a YOLO dataset: images/ and labels/ side by side, a data.yaml with "
                           "names/train/val, or images with their .txt label files beside them")
    return layout
