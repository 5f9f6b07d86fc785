"""An annotated clip -> the boxes on each frame, for training on sampled frames.

Each ``videorectangle`` region of the VideoRectangle control is one object: its ``sequence`` gives the box on every
frame where the editor shows it (``keyframes.dense_boxes``: Label Studio's interpolation), and each frame's box goes
through the image rule (``regions.region_box``: clipping, no-area and off-frame boxes) with the region's first label.
A region that cannot be read (no label, a bad sequence) is a ``BadRegion`` saying why; the others still count.
Frames of the clip where no region is shown are negatives: the annotator saw no fire there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from .keyframes import Box, SequenceError, dense_boxes, parse_sequence
from .regions import BadRegion, RegionBox, labelled_value, region_box

VIDEO_RECTANGLE_TYPE = "videorectangle"


@dataclass
class ClipBoxes:
    """The boxes of one annotated clip: {frame (from 1): boxes}, and the regions that gave none."""

    frames_count: int
    boxes: dict[int, list[RegionBox]] = field(default_factory=dict)
    bad: list[BadRegion] = field(default_factory=list)

    def on(self, frame: int) -> list[RegionBox]:
        """The boxes on ``frame`` ([]: a negative frame, when it is within the clip)."""
        return self.boxes.get(frame, [])


def is_video_box_region(region: Any, from_name: Optional[str] = None) -> bool:
    """Whether ``region`` is a videorectangle of the control ``from_name`` (any control when None)."""
    if not isinstance(region, dict) or str(region.get("type", "")).lower() != VIDEO_RECTANGLE_TYPE:
        return False
    return from_name is None or region.get("from_name") in (None, from_name)


def clip_boxes(results: Sequence[Any], from_name: Optional[str], frames_count: int,
               frame_size: Optional[tuple[float, float]] = None) -> ClipBoxes:
    """Per-frame boxes of an annotation's ``results`` on a clip of ``frames_count`` frames (Label Studio's count at
    the Video tag's frame rate; frames past it are dropped, which also bounds a bogus stored count).
    ``frame_size`` (width, height in pixels): needed for rotated boxes, as for images."""
    clip = ClipBoxes(frames_count)
    for region in results:
        if not is_video_box_region(region, from_name):
            continue
        found = _region_frames(region, frames_count, frame_size)
        if isinstance(found, BadRegion):
            clip.bad.append(found)
            continue
        for frame, box in found.items():
            clip.boxes.setdefault(frame, []).append(box)
    return clip


def _region_frames(region: dict, frames_count: int, frame_size: Optional[tuple[float, float]]) \
        -> Union[dict[int, RegionBox], BadRegion]:
    read = labelled_value(region, "labels")
    if isinstance(read, BadRegion):
        return read
    name, value, labels = read
    try:
        keyframes = parse_sequence(value.get("sequence"))
    except SequenceError as exc:
        return BadRegion("bad region", f"{name}: {exc}")
    frames: dict[int, RegionBox] = {}
    for frame, box in dense_boxes(keyframes, frames_count).items():
        found = region_box(_as_rectangle(box, labels), frame_size)
        if isinstance(found, RegionBox):  # a frame where the box is off-frame or has no area: nothing there
            frames[frame] = found
    return frames


def _as_rectangle(box: Box, labels: list) -> dict:
    return {"type": "rectanglelabels", "value": {"x": box.x, "y": box.y, "width": box.width, "height": box.height,
                                                  "rotation": box.rotation, "rectanglelabels": list(labels)}}
