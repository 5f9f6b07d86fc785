"""An image's size from its file header, and the pixel cap every reader checks before decoding.

A small compressed file can hold a huge image (a 0.9 MB PNG of 30000 x 30000 px decodes to 2.7 GB): reading the
width and height from the header first lets the server, training and conversion refuse such files before any
pixel is decoded. Torch-free and Label-Studio-free, so every layer may use it.
"""

from __future__ import annotations

import io
import os
from typing import Union

# 120 megapixels: above every phone (108 MP sensors: 12000 x 9000) and drone camera (48 MP) in common use and
# full-frame / medium-format photos (61 / 100 MP); a decoded image of that size costs ~360 MB (RGB) and about
# twice that while it is converted. Larger images (gigapixel panoramas, 200 MP phone modes): raise it.
DEFAULT_MAX_IMAGE_PIXELS = 120_000_000

# EXIF orientations that swap width and height when the photo is displayed upright.
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


def default_max_pixels() -> int:
    """The cap for readers that are not handed the app's settings (the detector's file readers, the converter):
    the MAX_IMAGE_PIXELS environment variable, else DEFAULT_MAX_IMAGE_PIXELS."""
    raw = os.environ.get("MAX_IMAGE_PIXELS", "").strip()
    try:
        return int(raw) if raw else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        return DEFAULT_MAX_IMAGE_PIXELS


class ImageHeaderError(ValueError):
    """The file is not an image whose size can be read; the message says which and why."""


class ImageTooLargeError(ImageHeaderError):
    """The image has more pixels than allowed; the message gives its size and the setting to raise."""


def header_size(source: Union[bytes, str, os.PathLike]) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied) of image bytes or a file, from the header
    alone: no pixel is decoded. Not a readable image -> ImageHeaderError."""
    from PIL import Image, UnidentifiedImageError

    # Pillow's own bomb check would refuse a header read above 179 MP with a message naming no setting; every
    # reader here applies MAX_IMAGE_PIXELS itself (check_pixels) before it decodes, so Pillow's is switched off.
    Image.MAX_IMAGE_PIXELS = None
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(stream) as image:
            width, height = image.size
            orientation = None
            # Pillow finds a PNG's EXIF chunk only by decoding the whole image: read it only where it is in the
            # header (JPEG, TIFF, WebP; a PNG whose eXIf chunk comes before the pixels).
            if image.format != "PNG" or "exif" in image.info:
                try:
                    orientation = image.getexif().get(0x0112)
                except Exception:  # noqa: BLE001 - a broken EXIF block must not make a good image unreadable
                    orientation = None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageHeaderError(f"not a readable image ({exc})") from None
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return int(width), int(height)


def check_pixels(width: int, height: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """ImageTooLargeError when width x height exceeds ``max_pixels`` (0: no cap)."""
    if max_pixels and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{width} x {height} px ({width * height / 1e6:.0f} megapixels) is more than MAX_IMAGE_PIXELS="
            f"{max_pixels} ({max_pixels / 1e6:.0f} megapixels); refused before decoding (raise MAX_IMAGE_PIXELS "
            "if such images are real)")


def checked_size(source: Union[bytes, str, os.PathLike], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) \
        -> tuple[int, int]:
    """``header_size`` then ``check_pixels``: the size of an image that may be decoded."""
    width, height = header_size(source)
    check_pixels(width, height, max_pixels)
    return width, height
