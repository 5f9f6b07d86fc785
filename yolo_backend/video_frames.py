"""Video files -> sampled RGB frames with their real times, streamed (never the whole clip in memory).

Decoding is OpenCV's FFmpeg build (``cv2.VideoCapture``, already a dependency through opencv-python-headless: no
second copy of FFmpeg in the image). Frames are read in order: ``grab`` decodes every frame (a codec must), but only
the sampled ones are converted and handed on, one at a time.

Times come from each decoded frame's own timestamp (``CAP_PROP_POS_MSEC``), not from index / frame rate: a frame rate
read wrong from the container, or a variable-frame-rate file, would otherwise shift boxes in time (where a container
gives no rising timestamps, ``FrameClock`` falls back to one frame period after the frame before). Label Studio
numbers frames from 1 at its Video tag's ``frameRate``: ``label_studio_frame`` maps a time to that number.

The detector and Label Studio are both unknown here: this module knows files, frames and times.
"""

from __future__ import annotations

import math
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Optional, Sequence

import numpy as np


class VideoError(ValueError):
    """A file that is no readable video, or one beyond the bounds; the message says which and what to do."""


@dataclass(frozen=True)
class VideoLimits:
    """Bounds checked before and while decoding (0: no bound)."""

    max_pixels: int = 3840 * 2160        # per frame
    max_frames: int = 30 * 60 * 30       # decoded frames (30 min at 30 fps)
    max_seconds: float = 30 * 60.0


@dataclass(frozen=True)
class VideoInfo:
    """What the container says: frame rate and frame count are the container's word (may be wrong or 0)."""

    width: int
    height: int
    fps: float
    frames: int
    codec: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps if self.fps > 0 else 0.0


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its place in decoding order (from 0), its time in seconds, and its pixels (RGB, HxWx3)."""

    index: int
    time_s: float
    rgb: np.ndarray


def label_studio_frame(time_s: float, frame_rate: float) -> int:
    """Label Studio's frame number (from 1) of a frame shown at ``time_s``, at its Video tag's ``frameRate``."""
    return int(math.floor(time_s * frame_rate + 0.5)) + 1


def _capture(path: Path) -> Any:
    import cv2

    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"{path.name}: not a video OpenCV's FFmpeg can open (a corrupt or truncated file, or a "
                         "codec it lacks); convert it to H.264 MP4, e.g. ffmpeg -i in -c:v libx264 out.mp4")
    return capture


def _info(capture: Any) -> VideoInfo:
    import cv2

    fourcc = int(capture.get(cv2.CAP_PROP_FOURCC))
    codec = "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).strip("\0 ") or "?"
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    return VideoInfo(width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), fps=fps if math.isfinite(fps) else 0.0,
                     frames=max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))), codec=codec)


def _check(path: Path, info: VideoInfo, limits: VideoLimits) -> None:
    if info.width <= 0 or info.height <= 0:
        raise VideoError(f"{path.name}: the video has no readable frame size (codec {info.codec}); a corrupt file?")
    if limits.max_pixels and info.width * info.height > limits.max_pixels:
        raise VideoError(f"{path.name}: {info.width}x{info.height} frames are beyond the bound of "
                         f"{limits.max_pixels} pixels; scale the clip down (e.g. to 1080p)")
    if limits.max_seconds and info.duration_s > limits.max_seconds:
        raise VideoError(f"{path.name}: {info.duration_s:.0f} s is longer than the bound of {limits.max_seconds:.0f}"
                         " s; cut the clip into shorter tasks")


def probe(path: Path, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """The container's word on the video, checked against ``limits`` (VideoError otherwise)."""
    capture = _capture(Path(path))
    try:
        info = _info(capture)
    finally:
        capture.release()
    _check(Path(path), info, limits)
    return info


Decoded = Generator[tuple[int, float, Callable[[], Optional[np.ndarray]]], None, None]


def _decoded(path: Path, limits: VideoLimits) -> Decoded:
    """Every decoded frame in order, checked against ``limits``, as (index, time in seconds, convert): ``convert()``
    gives its RGB pixels (None when the codec gives none) and is called only for the frames kept (converting is the
    expensive part). Close it (``contextlib.closing``) to release the file when stopping early."""
    import cv2

    capture = _capture(path)
    try:
        info = _info(capture)
        _check(path, info, limits)
        index, clock = 0, FrameClock(info.fps)
        while capture.grab():
            time_s = clock.time(float(capture.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0)
            _check_running(path, index, time_s, limits)
            yield index, time_s, lambda: _rgb(capture)
            index += 1
    finally:
        capture.release()


def _rgb(capture: Any) -> Optional[np.ndarray]:
    import cv2

    ok, bgr = capture.retrieve()
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok and bgr is not None else None


def sampled_frames(path: Path, step: int = 1, limits: VideoLimits = VideoLimits()) -> Iterator[Frame]:
    """Every ``step``-th decoded frame (the first, then every ``step``-th after it), one at a time, in order.

    Stops with VideoError at the bounds (a file longer than its header said is caught while decoding); a file that
    ends early just ends (a truncated file gives the frames it has).
    """
    if step < 1:
        raise ValueError(f"step must be at least 1, not {step}")
    with closing(_decoded(Path(path), limits)) as frames:
        for index, time_s, convert in frames:
            if index % step:
                continue
            rgb = convert()
            if rgb is None:
                break
            yield Frame(index, time_s, rgb)


class FrameClock:
    """Each decoded frame's time: its own timestamp while timestamps rise; a container whose timestamps are missing
    (all 0) or go backwards would put every box on one frame, so such a frame is placed one frame period (the
    container's rate, else 25 fps) after the one before."""

    def __init__(self, fps: float):
        self.period = 1.0 / fps if fps > 0 else 1.0 / 25.0
        self.last: Optional[float] = None

    def time(self, timestamp_s: float) -> float:
        if self.last is not None and not timestamp_s > self.last:
            timestamp_s = self.last + self.period
        self.last = timestamp_s
        return timestamp_s


def _check_running(path: Path, index: int, time_s: float, limits: VideoLimits) -> None:
    if limits.max_frames and index >= limits.max_frames:
        raise VideoError(f"{path.name}: more than {limits.max_frames} frames; cut the clip into shorter tasks")
    if limits.max_seconds and time_s > limits.max_seconds:
        raise VideoError(f"{path.name}: runs past {limits.max_seconds:.0f} s; cut the clip into shorter tasks")


def frame_count_hint(info: VideoInfo, frame_rate: Optional[float]) -> int:
    """``framesCount`` for Label Studio: the clip's duration at its Video tag's frame rate (the container's count
    when no rate is given)."""
    if frame_rate and info.fps > 0:
        return max(1, int(round(info.duration_s * frame_rate)))
    return info.frames


def frames_at(path: Path, targets: Sequence[int], frame_rate: float,
              limits: VideoLimits = VideoLimits()) -> Iterator[tuple[int, Frame]]:
    """For each Label Studio frame number in ``targets`` (at the Video tag's ``frame_rate``), the first decoded frame
    shown at or after it, as (its own Label Studio frame number, frame), in order, each decoded frame once.

    The number handed back is the frame's own (from its timestamp): when the tag's rate is higher than the file's,
    a target falls between decoded frames and the next one is taken, so boxes must be read at that number. Only the
    frames taken are converted; decoding stops after the last target (the rest of the clip is never read).
    """
    wanted = sorted(set(int(t) for t in targets))
    if not wanted:
        return
    if not frame_rate > 0:
        raise ValueError(f"frame rate must be positive, not {frame_rate!r}")
    next_target = 0
    with closing(_decoded(Path(path), limits)) as frames:
        for index, time_s, convert in frames:
            number = label_studio_frame(time_s, frame_rate)
            if number < wanted[next_target]:
                continue
            rgb = convert()
            if rgb is None:
                break
            yield number, Frame(index, time_s, rgb)
            while next_target < len(wanted) and wanted[next_target] <= number:
                next_target += 1
            if next_target == len(wanted):
                break
