"""Image files on disk: which files are images, listing them, and their size as displayed.

Standard library and PIL (imported when a size is asked for) only: the converter and the YOLO-format reader use
this without loading OpenCV or torch; ``preprocess.read_image`` decodes the pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# EXIF orientations that swap width and height (rotated by 90 or 270 degrees, possibly mirrored).
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}

PathLike = Union[str, os.PathLike]


class ImageReadError(ValueError):
    """An image file is missing or cannot be decoded; the message names the file."""


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: PathLike) -> list[Path]:
    """The image files under ``folder`` at any depth, sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if is_image(p))


def image_size(path: PathLike) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied, as ``preprocess.read_image`` applies it), from the
    file header; no pixel decode. Raises ImageReadError naming the file when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(0x0112)
            except Exception:  # noqa: BLE001 - a broken EXIF block must not make a good image unreadable
                orientation = None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return int(width), int(height)
