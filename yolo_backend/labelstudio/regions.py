"""A Label Studio rectangle region -> a box: the one rule for training and for conversion.

Label Studio stores a RectangleLabels region in percent of the image (``x``, ``y``, ``width``, ``height``) and a
``rotation`` in degrees, clockwise about the rectangle's top-left corner in pixels. Here:

- a region counts when it is a dict of type ``rectanglelabels`` (any case) whose ``from_name`` is the control's; a
  region without ``from_name`` names no other control and counts too;
- a rotated rectangle becomes its axis-aligned bounding box (this needs the image's size: the one given, else the
  region's ``original_width``/``original_height``);
- a box passing the image border is clipped to the image (``clipped`` says so);
- with several labels the first is kept (``extra_labels`` holds the others);
- a region that gives no box is a ``BadRegion`` saying why: no label; missing, non-numeric or non-finite numbers; no
  area (width or height <= 0); rotated without a known image size; outside the image; under one pixel (when the
  image size is known). Callers skip it and count or report it: nothing is dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

BORDER_TOLERANCE = 1e-6  # a box edge this far past the border (in image fractions) is not reported as clipped


@dataclass(frozen=True)
class RegionBox:
    """A box in fractions of the image (0..1), clipped to it."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    extra_labels: tuple[str, ...] = ()
    rotation: float = 0.0
    clipped: bool = False

    @property
    def rotated(self) -> bool:
        return abs(self.rotation) % 360 > 1e-9

    def pixels(self, width: float, height: float) -> tuple[float, float, float, float]:
        return self.x1 * width, self.y1 * height, self.x2 * width, self.y2 * height

    def center_size(self) -> tuple[float, float, float, float]:
        """(cx, cy, w, h) in fractions of the image, as YOLO label files have them."""
        return (self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2, self.x2 - self.x1, self.y2 - self.y1


@dataclass(frozen=True)
class BadRegion:
    """Why a region gives no box; ``kind`` is short (for counting), ``message`` names the region."""

    kind: str
    message: str


def is_box_region(region: Any, from_name: Union[str, Sequence[str], None] = None) -> bool:
    """Whether ``region`` is a rectangle of the control ``from_name`` (or of one of several controls; any control
    when None)."""
    if not isinstance(region, dict) or str(region.get("type", "")).lower() != "rectanglelabels":
        return False
    names = (from_name,) if isinstance(from_name, str) else from_name
    return names is None or region.get("from_name") is None or region.get("from_name") in names


def labelled_value(region: dict, labels_key: str) -> Union[tuple[str, dict, list], BadRegion]:
    """(the region's name for messages, its ``value``, its labels under ``labels_key``), or why it has none."""
    name = f"region {region.get('id')}" if region.get("id") is not None else "a region"
    given = region.get("value")
    value = given if isinstance(given, dict) else {}
    labels = value.get(labels_key) or []
    if not isinstance(labels, list) or not labels:
        return BadRegion("region without label", f"{name} has no {labels_key}")
    return name, value, labels


def region_box(region: dict, image_size: Optional[tuple[float, float]] = None) -> Union[RegionBox, BadRegion]:
    """The box of a rectangle region (see the module doc); ``image_size`` is (width, height) in pixels."""
    read = labelled_value(region, "rectanglelabels")
    if isinstance(read, BadRegion):
        return read
    name, value, labels = read
    try:
        x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
        rotation = float(value.get("rotation") or 0.0)
    except (KeyError, TypeError, ValueError):
        return BadRegion("bad region", f"{name} lacks numeric x/y/width/height")
    if not all(math.isfinite(v) for v in (x, y, w, h, rotation)) or w <= 0 or h <= 0:
        return BadRegion("bad region", f"{name} has no area or non-finite values")
    size = image_size or _original_size(region)
    x1, y1, x2, y2 = x / 100, y / 100, (x + w) / 100, (y + h) / 100
    if abs(rotation) % 360 > 1e-9:  # RegionBox.rotated
        if size is None:
            return BadRegion("bad region", f"{name} is rotated but has no original_width/original_height")
        x1, y1, x2, y2 = _rotated_bounds(x1, y1, x2, y2, rotation, size)
    clipped = min(x1, y1) < -BORDER_TOLERANCE or max(x2, y2) > 1 + BORDER_TOLERANCE
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0)
    if x2 <= x1 or y2 <= y1:
        return BadRegion("bad region", f"{name} lies outside the image")
    if size is not None and ((x2 - x1) * size[0] < 1 or (y2 - y1) * size[1] < 1):
        return BadRegion("bad region", f"{name} is smaller than one pixel")
    return RegionBox(str(labels[0]), x1, y1, x2, y2, tuple(str(v) for v in labels[1:]), rotation, clipped)


def _original_size(region: dict) -> Optional[tuple[float, float]]:
    try:
        width, height = float(region["original_width"]), float(region["original_height"])
    except (KeyError, TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def _rotated_bounds(x1: float, y1: float, x2: float, y2: float, rotation: float,
                    size: tuple[float, float]) -> tuple[float, float, float, float]:
    """The axis-aligned bounds (fractions) of the rectangle turned ``rotation`` degrees about its top-left corner."""
    width, height = size
    a = math.radians(rotation)
    px, py, pw, ph = x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height
    corners = [(px + dx * math.cos(a) - dy * math.sin(a), py + dx * math.sin(a) + dy * math.cos(a))
               for dx, dy in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return min(xs) / width, min(ys) / height, max(xs) / width, max(ys) / height
