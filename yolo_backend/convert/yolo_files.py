"""YOLO datasets on disk, for conversion: the engine's one YOLO-format reader (yolov7/yolo_format.py), its
problems reported into a ``ProblemLog`` and its errors raised as ``ConversionError``; and writing a dataset.

Conversion imports each image once, even when a data.yaml lists it in two splits (training keeps both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import yaml

from ..yolov7 import yolo_format
from ..yolov7.image_files import IMAGE_SUFFIXES, ImageReadError, is_image, list_images
from ..yolov7.image_files import image_size as header_size
from ..yolov7.yolo_format import EDGE_TOLERANCE, DatasetLayout, ImageEntry, YoloBox, write_label_file
from .problems import ConversionError, ProblemLog

__all__ = ["EDGE_TOLERANCE", "IMAGE_SUFFIXES", "DatasetLayout", "ImageEntry", "YoloBox", "find_dataset", "image_size",
           "is_image", "list_images", "read_label_file", "write_data_yaml", "write_label_file"]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the file header; no pixel decode.

    Raises ConversionError naming the file when it is not a readable image.
    """
    try:
        return header_size(path)
    except ImageReadError as exc:
        raise ConversionError(str(exc)) from None


def read_label_file(path: Path, nc: Optional[int], problems: ProblemLog) -> list[YoloBox]:
    """The boxes of a YOLO label file (yolo_format's rule for lines); each problem goes to ``problems``, which
    makes it fatal in strict mode. Polygon lines are counted."""
    try:
        boxes = yolo_format.read_label_file(path, nc, strict=problems.strict, report=problems.add)
    except yolo_format.LabelLineError as exc:
        raise problems.fatal(exc.problem) from None
    except yolo_format.DatasetError as exc:
        raise ConversionError(str(exc)) from None
    polygons = sum(box.polygon for box in boxes)
    if polygons:
        problems.count("polygons read as their bounding box", polygons)
    return boxes


def find_dataset(path: Path) -> DatasetLayout:
    """Find the images, label files and (when the dataset says) class names under ``path``; each image once."""
    try:
        layout = yolo_format.find_dataset(path)
    except yolo_format.DatasetError as exc:
        raise ConversionError(str(exc)) from None
    seen: set[Path] = set()
    entries = []
    for entry in layout.entries:
        resolved = entry.image.resolve()
        if resolved not in seen:  # an image listed in two splits is imported once
            seen.add(resolved)
            entries.append(entry)
    layout.entries = entries
    return layout


def write_data_yaml(path: Path, names: Sequence[str], images: str = "images") -> None:
    """A data.yaml the training side reads: train and val both point at ``images`` (split it as you like)."""
    body = {"train": images, "val": images, "nc": len(names), "names": list(names)}
    path.write_text("# YOLO dataset written by YoloToLabelStudio.py (train and val share the images; split as "
                    "needed)\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")
