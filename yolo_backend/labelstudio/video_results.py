"""A tracked object -> one Label Studio ``videorectangle`` region (what a video task's prediction holds).

    {"id": "...", "from_name": "box", "to_name": "video", "type": "videorectangle", "score": 0.81,
     "value": {"labels": ["fire"], "framesCount": 1500, "duration": 60.0,
               "sequence": [{"frame": 1, "enabled": true, "x": .., "y": .., "width": .., "height": .., "rotation": 0,
                             "time": 0.04}, ..., {"frame": 230, "enabled": false, ...}]}}

A track is a list of points (Label Studio frame number, box in percent, class, score), from whatever tracker linked
the detections (this module knows none). Its label is the majority class over the points (a track flickering
between fire and smoke is the class it was most often), its score the mean score of the points (a track seen
surely throughout scores high), and its sequence the sparse keyframes of ``keyframes.sparse_sequence``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Collection, Optional, Sequence

from .config import LabelMapping
from .keyframes import Box, sequence_json, sparse_sequence
from .results import region_id


@dataclass(frozen=True)
class TrackPoint:
    """One detection of a tracked object: Label Studio's frame number (from 1), its box, class id and score."""

    frame: int
    box: Box
    class_id: int
    score: float


@dataclass(frozen=True)
class VideoClip:
    """What the region needs of the clip: Label Studio's frame rate (the Video tag's), frame count and duration."""

    frame_rate: float
    frames_count: int
    duration_s: float


def percent_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box:
    """Pixel corners -> a Box in percent of the frame, clipped to it."""
    def pct(value: float, size: int) -> float:
        return float(min(100.0, max(0.0, value / size * 100.0)))

    x, y = pct(x1, width), pct(y1, height)
    return Box(x, y, pct(x2, width) - x, pct(y2, height) - y)


def majority_label(points: Sequence[TrackPoint], mapping: LabelMapping) -> Optional[str]:
    """The label most points have (classes without a label do not vote); a tie goes to the higher summed score."""
    votes: dict[str, list[float]] = defaultdict(list)
    for point in points:
        label = mapping.label_of(point.class_id)
        if label is not None:
            votes[label].append(point.score)
    if not votes:
        return None
    return max(votes, key=lambda label: (len(votes[label]), sum(votes[label])))


def track_region(points: Sequence[TrackPoint], names: tuple[str, str], mapping: LabelMapping, clip: VideoClip,
                 frame_step: int = 1, tolerance: float = 0.5, model_version: str = "", task_key: Any = "",
                 index: int = 0, run_starts: Collection[int] = ()) -> Optional[dict]:
    """The ``videorectangle`` region of one track (None: no point has a class with a label).

    ``names``: (from_name, to_name). ``frame_step``: the frames the detector saw are this far apart, so points this
    far apart are one run for the editor to interpolate across (``sparse_sequence``'s ``max_gap``); ``run_starts``:
    frames where a new run starts whatever the gap (``sparse_sequence``).
    """
    label = majority_label(points, mapping)
    if label is None or not points:
        return None
    track: dict[int, Box] = {}
    for point in sorted(points, key=lambda p: p.frame):
        track.setdefault(point.frame, point.box)  # two detections on one frame: the first
    keyframes = sparse_sequence(track, tolerance=tolerance, max_gap=max(1, frame_step), run_starts=run_starts)
    return {
        "id": region_id(model_version, task_key, index),
        "from_name": names[0],
        "to_name": names[1],
        "type": "videorectangle",
        "value": {"labels": [label], "framesCount": int(clip.frames_count), "duration": float(clip.duration_s),
                  "sequence": sequence_json(keyframes, clip.frame_rate)},
        "score": float(sum(p.score for p in points) / len(points)),
    }
