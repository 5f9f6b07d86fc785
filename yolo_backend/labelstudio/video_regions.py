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


def stored_frames_count(results: Sequence[Any], from_name: Optional[str]) -> int:
    """The clip's length as Label Studio stored it with the regions (``value.framesCount``; the largest; 0: none)."""
    counts = [0]
    for region in results:
        value = region.get("value") if is_video_box_region(region, from_name) else None
        count = value.get("framesCount") if isinstance(value, dict) else None
        if isinstance(count, (int, float)) and not isinstance(count, bool) and 0 < count < 10_000_000:
            counts.append(int(count))
    return max(counts)


# --- which frames of an annotated clip to train on -------------------------------------------------------------
def spread(frames: Sequence[int], most: int, min_gap: int = 1) -> list[int]:
    """At most ``most`` of the sorted ``frames``, at least ``min_gap`` apart, spread evenly over them (the first
    kept): consecutive frames of a clip are near-duplicates, so distance buys variety."""
    if most <= 0:
        return []
    spaced: list[int] = []
    for frame in frames:
        if not spaced or frame - spaced[-1] >= min_gap:
            spaced.append(frame)
    if len(spaced) <= most:
        return spaced
    if most == 1:
        return [spaced[(len(spaced) - 1) // 2]]
    return [spaced[round(i * (len(spaced) - 1) / (most - 1))] for i in range(most)]


def sample_frames(clip: ClipBoxes, most: int, min_gap: int = 1, negative_share: float = 0.25) -> list[int]:
    """The frames of ``clip`` to train on (sorted): at most ``most``, at least ``min_gap`` frames apart, spread
    evenly over the frames with boxes and over the negative frames (no box shown: the annotator saw no fire there).
    Negatives are at most ``negative_share`` of ``most`` when the clip has boxes (all of it when it has none: a clip
    annotated as empty is all negatives, as an image without boxes is), and only frames at least ``min_gap`` from
    any box: where a track starts or ends the annotator's timing is rough, so those frames are neither sure
    positives nor sure negatives."""
    positives = sorted(f for f, boxes in clip.boxes.items() if boxes and 1 <= f <= clip.frames_count)
    negatives = _clear_negatives(positives, clip.frames_count, max(1, min_gap))
    negative_quota = most if not positives else int(most * min(1.0, max(0.0, negative_share)))
    chosen_negatives = spread(negatives, negative_quota, min_gap)
    chosen_positives = spread(positives, most - len(chosen_negatives), min_gap)
    return sorted(chosen_positives + chosen_negatives)


def _clear_negatives(positives: Sequence[int], frames_count: int, margin: int) -> list[int]:
    """Frames 1..frames_count at least ``margin`` from every frame in ``positives`` (sorted)."""
    near = [0] * (frames_count + 2)  # difference array: +1 where a blocked stretch starts, -1 after it ends
    for frame in positives:
        near[max(1, frame - margin + 1)] += 1
        near[min(frames_count + 1, frame + margin)] -= 1
    out, depth = [], 0
    for frame in range(1, frames_count + 1):
        depth += near[frame]
        if depth == 0:
            out.append(frame)
    return out
