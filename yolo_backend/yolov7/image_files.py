"""Image files on disk: which files are images, listing them, and their size as displayed.

Standard library and PIL (imported when a size is asked for) only: the converter and the YOLO-format reader use
this without loading OpenCV or torch; ``preprocess.read_image`` decodes the pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..image_header import ImageHeaderError, checked_size, default_max_pixels
from ..image_header import ImageTooLargeError as HeaderTooLarge

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

PathLike = Union[str, os.PathLike]


class ImageReadError(ValueError):
    """An image file is missing or cannot be decoded; the message names the file."""


class ImageTooLargeError(ImageReadError):
    """An image file has more pixels than MAX_IMAGE_PIXELS: refused before decoding; the message names it."""


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: PathLike) -> list[Path]:
    """The image files under ``folder`` at any depth, sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if is_image(p))


def image_size(path: PathLike, max_pixels: Optional[int] = None) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied, as ``preprocess.read_image`` applies it), from the
    file header; no pixel decode. Raises ImageReadError naming the file when it is not a readable image, and
    ImageTooLargeError when it has more than ``max_pixels`` (default: MAX_IMAGE_PIXELS, see image_header)."""
    try:
        return checked_size(path, default_max_pixels() if max_pixels is None else max_pixels)
    except HeaderTooLarge as exc:
        raise ImageTooLargeError(f"{path}: {exc}") from None
    except ImageHeaderError as exc:
        raise ImageReadError(f"{path}: {exc}") from None
