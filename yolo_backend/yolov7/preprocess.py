"""Letterbox: resize keeping the aspect ratio, pad to a stride multiple — the reference detect pipeline's way.
Also the long-side resize training and the training job share (``resize_long_side``), and reading pixels
(image files, listing and header sizes: image_files.py).

Matching the reference step for step (rounding, split of the padding, interpolation, pad value 114) is what makes
our detections equal the reference's: the network sees the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from .image_files import ImageReadError, ImageTooLargeError, image_size

PAD_VALUE = 114


@dataclass(frozen=True)
class Letterboxed:
    """A letterboxed image and how to map its coordinates back to the original image.

    image:  (H, W, 3) uint8, H and W multiples of the stride
    ratio:  (rx, ry) scale applied to the original image on each axis (new size / original size)
    pad:    (left, top) pixels of padding before the resized image
    """

    image: np.ndarray
    ratio: tuple[float, float]
    pad: tuple[int, int]
    original_size: tuple[int, int]  # (width, height)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the letterboxed image."""
        return self.image.shape[0], self.image.shape[1]


def letterbox(image: np.ndarray, size: int = 640, stride: int = 32) -> Letterboxed:
    """Resize ``image`` so its long side is ``size`` (up or down), then pad each axis to a multiple of ``stride``.

    The padding is split evenly between both sides (the odd pixel goes to bottom/right). The image is resized
    with bilinear interpolation only when its size changes.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"letterbox expects an HxWx3 image, got shape {image.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"letterbox got an empty image of shape {image.shape}")
    r = min(size / height, size / width)
    new_w, new_h = int(round(width * r)), int(round(height * r))
    # Padding up to the next stride multiple below ``size`` (the reference's "auto" minimum-rectangle mode).
    return resize_and_pad(image, new_w, new_h, (size - new_w) % stride / 2, (size - new_h) % stride / 2)


def resize_long_side(image: np.ndarray, size: int, allow_upscale: bool = True) -> tuple[np.ndarray, float]:
    """Resize so the long side is ``size`` (aspect kept). Returns the image and the scale applied."""
    h, w = image.shape[:2]
    r = size / max(h, w)
    if r != 1 and (allow_upscale or r < 1):
        # Area averaging when shrinking keeps fine detail (smoke edges) better than bilinear.
        interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (max(1, round(w * r)), max(1, round(h * r))), interpolation=interp)
        return image, r
    return image, 1.0


def resize_and_pad(image: np.ndarray, new_w: int, new_h: int, dw: float, dh: float) -> Letterboxed:
    """Resize ``image`` to ``new_w`` x ``new_h`` (bilinear, only when the size changes), then pad ``dw`` / ``dh``
    pixels on each side with PAD_VALUE (a half pixel goes to bottom/right, as the reference splits it)."""
    height, width = image.shape[:2]
    if (new_w, new_h) != (width, height):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    if top or bottom or left or right:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                   value=(PAD_VALUE, PAD_VALUE, PAD_VALUE))
    return Letterboxed(np.ascontiguousarray(image), (new_w / width, new_h / height), (left, top), (width, height))


def scale_boxes_back(boxes: np.ndarray, ratio: tuple[float, float], pad: tuple[int, int],
                     original_size: tuple[int, int]) -> np.ndarray:
    """Map (n, 4) xyxy boxes from letterboxed pixels back to original pixels, clipped to the image."""
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - pad[0]) / ratio[0]
    out[:, [1, 3]] = (out[:, [1, 3]] - pad[1]) / ratio[1]
    width, height = original_size
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def read_image(path, max_pixels: Optional[int] = None) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, like the reference (cv2.imread, EXIF orientation applied). An image
    with more than ``max_pixels`` (default MAX_IMAGE_PIXELS) is refused from its header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")
    try:
        image_size(path, max_pixels)
    except ImageTooLargeError:
        raise
    except ImageReadError:
        pass  # a format Pillow cannot size: OpenCV decides below (and applies its own pixel cap)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageReadError(f"{path}: not a readable image (corrupt file or unsupported format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
