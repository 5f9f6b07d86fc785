"""Sampled video frames -> detections -> tracks (one per object) and a task score, below Label Studio's formats.

The detector runs in batches on the frames ``video_frames.sampled_frames`` streams (every VIDEO_FRAME_STEP-th:
consecutive frames of a clip differ little, and the editor interpolates between keyframes). Detections are linked
into tracks by ByteTrack from Roboflow's ``trackers`` package (maintained, Apache-2.0; its Kalman filter and two
stage matching, not ours), told each frame's true time so a variable frame rate or a skipped frame does not
confuse its motion model. It is class-agnostic: a fire the detector calls smoke on a few frames stays one track,
and its label is the majority class (``labelstudio.video_results``).

ByteTrack forgets a track lost for more than a second; flames flicker and smoke thins for longer than that. A track
that starts after another ended, within STITCH_GAP_S and where the other was last seen (``stitch``), is the same
object: one region, its gap a stretch with ``enabled: false``.

ByteTrack gives a new track its id only on the second frame it is seen; the box of its first frame is kept here
(``_Linker``) and put back at the front of the track, so a region starts where the object was first seen.

A track's score is the mean confidence of its detections. The task score (low = label first, as for images) is
the mean of the lowest tenth of the sampled frames' image scores (``active_learning.task_score`` per frame): one
odd frame does not decide (the minimum would), while a short uncertain passage of a long clip still brings the
clip forward (the mean over all frames would drown it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from .active_learning import task_score
from .video_frames import Frame, VideoError
from .yolov7.metrics import box_iou_np

# Seconds a lost track is kept for re-association (ByteTrack counts it in 30 fps frames: 30 = 1 s).
LOST_TRACK_FRAMES = 30
# IoU a detection needs with a track's predicted box to continue it.
MIN_IOU = 0.1
# A track that starts within this many seconds after another ended, where that one was last seen (IoU at least
# STITCH_IOU), continues it: a flickering fire lost for longer than the tracker's buffer stays one object.
STITCH_GAP_S = 5.0
STITCH_IOU = 0.3
# The lowest fraction of sampled frames whose image scores make the task score.
LOW_FRACTION = 0.1


class VideoDeadline(Exception):
    """The deadline passed while a video was worked on: it gets no prediction now."""


@dataclass(frozen=True)
class TrackedBox:
    """One detection of a tracked object: the frame's decoding index and true time, pixel corners, class, score."""

    frame_index: int
    time_s: float
    xyxy: tuple[float, float, float, float]
    class_id: int
    score: float


@dataclass
class Track:
    """One object over the clip: its boxes in time order."""

    track_id: int
    boxes: list[TrackedBox] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The mean confidence of the track's detections."""
        return float(np.mean([b.score for b in self.boxes])) if self.boxes else 0.0


@dataclass
class VideoTracks:
    """What one clip gave: tracks (ordered by first appearance), frame size, the sampled frames' times and decoding
    indices, the task score, and the mean of the sampled frames' embeddings (when asked for)."""

    tracks: list[Track]
    width: int
    height: int
    times: list[float]
    task_score: float
    embedding: Optional[np.ndarray] = None
    indices: list[int] = field(default_factory=list)

    def missed_starts(self, track: Track, missed: int = 1) -> list[int]:
        """Decoding indices where ``track`` comes back after more than ``missed`` sampled frames without it."""
        ordinal = {index: n for n, index in enumerate(self.indices)}
        pairs = zip(track.boxes, track.boxes[1:])
        return [b.frame_index for a, b in pairs if ordinal[b.frame_index] - ordinal[a.frame_index] > missed + 1]


@dataclass(frozen=True)
class TrackOptions:
    """``threshold``: a detection at or above it may start a track (the shown threshold); ``floor``: the lowest
    confidence fed to the tracker (ByteTrack's second stage keeps tracks going through weak detections) and to the
    task score; ``strategy``: the image task-score strategy; ``fps``: the container's frame rate (a hint);
    ``batch_size``: frames per forward pass."""

    threshold: float = 0.25
    floor: float = 0.05
    strategy: str = "uncertainty"
    fps: float = 25.0
    batch_size: int = 8


class _Linker:
    """ByteTrack over one clip, remembering each new track's first box until the track gets its id."""

    def __init__(self, options: TrackOptions):
        try:
            from trackers import ByteTrackTracker
        except ImportError as exc:  # installed apart (requirements-nodeps.txt): say how
            raise VideoError(f"the video tracker is not installed ({exc}); run pip install --no-deps -r "
                             "requirements-nodeps.txt") from None

        self.tracker = ByteTrackTracker(
            lost_track_buffer=LOST_TRACK_FRAMES, frame_rate=options.fps if options.fps > 0 else 25.0,
            track_activation_threshold=options.threshold, minimum_consecutive_frames=1,
            minimum_iou_threshold=MIN_IOU, high_conf_det_threshold=options.threshold)
        self.tracks: dict[int, Track] = {}
        self._first: dict[int, TrackedBox] = {}  # id() of a tracklet without an id yet -> its first box
        self._seen: set[int] = set()

    def add(self, frame: Frame, detections: Any) -> None:
        import supervision as sv

        n = len(detections)
        found = sv.Detections(xyxy=np.asarray(detections.boxes, np.float32).reshape(n, 4),
                              confidence=np.asarray(detections.scores, np.float32),
                              class_id=np.asarray(detections.labels, int), data={"row": np.arange(n)})
        before = {id(t) for t in self.tracker.tracks}
        result = self.tracker.update(found, timestamp=frame.time_s)
        rows = result.data.get("row", [])
        ids = result.tracker_id if result.tracker_id is not None else [-1] * len(rows)
        for row, track_id in zip(rows, ids):
            if track_id >= 0:
                box = self._box(frame, detections, int(row))
                self.tracks.setdefault(int(track_id), Track(int(track_id))).boxes.append(box)
        self._remember_new(before, detections, frame)
        self._adopt_first_boxes()

    @staticmethod
    def _box(frame: Frame, detections: Any, row: int) -> TrackedBox:
        x1, y1, x2, y2 = (float(v) for v in detections.boxes[row])
        return TrackedBox(frame.index, frame.time_s, (x1, y1, x2, y2), int(detections.labels[row]),
                          float(detections.scores[row]))

    def _remember_new(self, before: set[int], detections: Any, frame: Frame) -> None:
        """A tracklet born on this frame starts at one of its detections' boxes: remember which."""
        for tracklet in self.tracker.tracks:
            if id(tracklet) in before or tracklet.tracker_id >= 0:
                continue
            start = np.asarray(tracklet.get_state_bbox(), np.float64).reshape(4)
            rows = np.abs(np.asarray(detections.boxes, np.float64) - start).max(axis=1) if len(detections) else []
            if len(rows) and float(np.min(rows)) < 1e-3:
                self._first[id(tracklet)] = self._box(frame, detections, int(np.argmin(rows)))

    def _adopt_first_boxes(self) -> None:
        alive = {id(t) for t in self.tracker.tracks}
        for tracklet in self.tracker.tracks:
            first = self._first.pop(id(tracklet), None) if tracklet.tracker_id >= 0 else None
            if first is not None and int(tracklet.tracker_id) in self.tracks:
                self.tracks[int(tracklet.tracker_id)].boxes.insert(0, first)
        for key in [k for k in self._first if k not in alive]:  # died before it got an id: a one-frame blip
            del self._first[key]


def stitch(tracks: Sequence[Track], max_gap_s: float = STITCH_GAP_S, min_iou: float = STITCH_IOU) -> list[Track]:
    """Tracks (in order of first appearance) with each one that starts after another ended, within ``max_gap_s``
    and overlapping its last box by ``min_iou``, joined to it (the best overlap wins; class-agnostic, as the
    tracker is)."""
    joined: list[Track] = []
    for track in sorted(tracks, key=lambda t: (t.boxes[0].time_s, t.track_id)):
        start = track.boxes[0]
        ended = [(n, t) for n, t in enumerate(joined)
                 if t.boxes[-1].time_s < start.time_s <= t.boxes[-1].time_s + max_gap_s]
        overlaps = box_iou_np(np.array([t.boxes[-1].xyxy for _, t in ended]), np.array(start.xyxy))[:, 0]
        candidates = [(float(iou), t.boxes[-1].time_s, n) for (n, t), iou in zip(ended, overlaps)]
        best = max(candidates, default=(0.0, 0.0, -1))   # the best overlap; of equals, the one seen last
        if best[0] >= min_iou:
            joined[best[2]].boxes.extend(track.boxes)
        else:
            joined.append(Track(track.track_id, list(track.boxes)))
    return joined


def batched(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    """Frames in lists of ``size`` (the last may be shorter); only one list is in memory at a time."""
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def low_tail_mean(scores: Sequence[float], fraction: float = LOW_FRACTION) -> float:
    """The mean of the lowest ``fraction`` of ``scores`` (at least one); 1 (nothing to learn) when empty."""
    if not scores:
        return 1.0
    ordered = sorted(scores)
    return float(np.mean(ordered[:max(1, math.ceil(len(ordered) * fraction))]))


Detect = Callable[[list[np.ndarray]], list[Any]]


def track_video(frames: Iterable[Frame], detect: Detect, options: TrackOptions = TrackOptions(),
                deadline: Optional[float] = None) -> VideoTracks:
    """Detect on ``frames`` in batches, link the detections into tracks, score the clip.

    ``detect``: a list of RGB frames -> one Detections each (the detector's, above ``options.floor``).
    ``deadline``: a ``time.monotonic()`` value; past it, VideoDeadline (checked between batches).
    """
    linker = _Linker(options)
    times: list[float] = []
    indices: list[int] = []
    frame_scores: list[float] = []
    embeddings: list[np.ndarray] = []
    width = height = 0
    for batch in batched(frames, max(1, options.batch_size)):
        if deadline is not None and time.monotonic() > deadline:
            raise VideoDeadline()
        height, width = batch[0].rgb.shape[:2]
        for frame, found in zip(batch, detect([f.rgb for f in batch])):
            times.append(frame.time_s)
            indices.append(frame.index)
            frame_scores.append(task_score(found, options.strategy, options.threshold, options.floor))
            if getattr(found, "embedding", None) is not None:
                embeddings.append(np.asarray(found.embedding, np.float32))
            linker.add(frame, found.above(options.floor))
    tracks = stitch([t for t in linker.tracks.values() if t.boxes])
    embedding = np.mean(embeddings, axis=0) if embeddings else None
    return VideoTracks(tracks, width, height, times, low_tail_mean(frame_scores), embedding, indices)
