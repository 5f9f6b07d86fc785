"""A training example: one annotated image, or one frame of an annotated clip, at the training size.

Its own module so that both example makers (``dataset`` for images, ``video_dataset`` for clips) build on it
without importing each other; ``dataset`` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..labelstudio.regions import RegionBox


@dataclass
class Example:
    """One annotated task (or one frame of an annotated clip, with the clip's task id): its image scaled to the
    training size, boxes (xyxy pixels of that image), classes."""

    task_id: int
    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    reload: Optional[Callable[[], np.ndarray]] = None  # the original image again (None: ``image`` is all there is)
    scale: float = 1.0                                  # ``image`` is the original scaled by this (<= 1)


def scale_to(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Downscale so the long side is at most ``size`` (training resizes there anyway); returns (image, factor)."""
    from ..yolov7.preprocess import resize_long_side

    return resize_long_side(image, size, allow_upscale=False)


def class_boxes(boxes: Sequence[RegionBox], names: Sequence[str], width: int, height: int) \
        -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Boxes (an image's, or a frame's) in pixels of a ``width`` x ``height`` image, their class ids by ``names``
    (case-insensitive), and the labels that match no name (left out)."""
    index = {str(name).lower(): i for i, name in enumerate(names)}
    pixels, classes, unknown = [], [], []
    for box in boxes:
        cls = index.get(box.label.lower())
        if cls is None:
            unknown.append(box.label)
            continue
        pixels.append(box.pixels(width, height))
        classes.append(cls)
    return np.asarray(pixels, np.float32).reshape(-1, 4), np.asarray(classes, np.int64), unknown
