"""Video boxes: a ``videorectangle`` region's keyframe ``sequence`` <-> the box on every frame.

Label Studio (1.23) stores one region per tracked object, ``value.sequence`` a list of keyframes
``{"frame", "enabled", "x", "y", "width", "height", "rotation", "time"}``: frames count from 1, x/y/width/height are
percent of the frame, ``time`` is ``frame / framerate`` (the Video tag's ``frameRate``), and ``framesCount`` /
``duration`` sit next to the sequence. The editor draws the box on a frame by this rule (read from
``web/libs/editor/src/regions/VideoRectangleRegion.js`` ``getShape``, ``web/libs/editor/src/regions/VideoRegion.js``
``isInLifespan``/``closestKeypoint`` and ``web/libs/editor/src/utils/props.ts`` ``interpolateProp`` in
github.com/HumanSignal/label-studio), which ``box_at`` follows:

- before the first keyframe: no box;
- on a keyframe: that keyframe's box, even if it is disabled (a disabled keyframe is the last frame shown);
- between two keyframes: linear between them (rotation over the shorter way round), shown only if the earlier one is
  enabled, whatever the later one is;
- after the last keyframe: its box, shown only if it is enabled (to the end of the video).

``sparse_sequence`` goes the other way for predictions: a track (frame -> box) becomes keyframes only where linear
interpolation would drift more than a tolerance, with ``enabled: false`` on the last frame of each run, so Label
Studio's editor gets few keyframes and shows the box exactly where the track has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping, Optional, Sequence

from .config import LabelConfigError

# How many keyframes one region may have (a 2-hour clip at 30 fps with a keyframe on every frame is 216 000).
MAX_KEYFRAMES = 250_000
# The most track points one straight segment of ``sparse_sequence`` spans: each extension re-checks the points
# between, so this bounds the work to O(points x MAX_SPAN) for a box that stands still for minutes.
MAX_SPAN = 120


class SequenceError(LabelConfigError):
    """A videorectangle ``sequence`` that is not Label Studio's shape; the message says which keyframe and why."""


@dataclass(frozen=True)
class Box:
    """A box in percent of the frame (Label Studio's units): top-left corner, size, rotation in degrees."""

    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0

    def drift(self, other: "Box") -> float:
        """The largest difference of x, y, width, height (percent points), the tolerance's measure."""
        return max(abs(self.x - other.x), abs(self.y - other.y), abs(self.width - other.width),
                   abs(self.height - other.height))


@dataclass(frozen=True)
class Keyframe:
    """One item of a ``sequence``: the box at ``frame`` (from 1), and whether the region stays shown after it."""

    frame: int
    enabled: bool
    box: Box

    def to_json(self, frame_rate: float) -> dict[str, Any]:
        """Label Studio's stored shape; ``time`` is ``frame / frame_rate`` as the editor serializes it."""
        return {"frame": self.frame, "enabled": self.enabled, "rotation": self.box.rotation, "x": self.box.x,
                "y": self.box.y, "width": self.box.width, "height": self.box.height,
                "time": self.frame / frame_rate}


def parse_sequence(items: Any) -> list[Keyframe]:
    """A stored ``sequence`` -> keyframes sorted by frame; SequenceError for anything else.

    ``enabled`` defaults to true and ``rotation`` to 0 (keyframes written by hand or by other tools lack them).
    """
    if not isinstance(items, list):
        raise SequenceError(f"a videorectangle sequence must be a list of keyframes, not {type(items).__name__}")
    if len(items) > MAX_KEYFRAMES:
        raise SequenceError(f"a videorectangle sequence has {len(items)} keyframes; at most {MAX_KEYFRAMES} are read")
    keyframes = [_keyframe(i, item) for i, item in enumerate(items)]
    keyframes.sort(key=lambda k: k.frame)  # stable: the editor keeps the sequence sorted by frame
    return keyframes


def _keyframe(index: int, item: Any) -> Keyframe:
    if not isinstance(item, Mapping):
        raise SequenceError(f"keyframe {index} of a videorectangle sequence is not an object")
    frame = item.get("frame")
    if isinstance(frame, bool) or not isinstance(frame, (int, float)) or frame != int(frame) or frame < 1:
        raise SequenceError(f"keyframe {index}: frame {str(frame)[:40]!r} is not a frame number (1, 2, ...)")
    values = []
    for key in ("x", "y", "width", "height", "rotation"):
        value = item.get(key, 0.0 if key == "rotation" else None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SequenceError(f"keyframe {index} (frame {int(frame)}): {key} {str(value)[:40]!r} is not a number")
        values.append(float(value))
    return Keyframe(int(frame), bool(item.get("enabled", True)), Box(*values))


# --- keyframes -> boxes ------------------------------------------------------------------------------------------
def normalize_angle(angle: float) -> float:
    """An angle in degrees onto (-180, 180], as the editor's ``normalizeAngle`` does."""
    while angle > 0:
        angle -= 360
    return math.fmod(angle - 180, 360) + 180  # fmod: JavaScript's % keeps the dividend's sign


def interpolate(start: Keyframe, end: Keyframe, frame: int) -> Box:
    """The box at ``frame`` between two keyframes: linear in each value, rotation the shorter way round."""
    r = (frame - start.frame) / (end.frame - start.frame)
    a, b = start.box, end.box
    rotation = normalize_angle(a.rotation + normalize_angle(b.rotation - a.rotation) * r)
    return Box(a.x + (b.x - a.x) * r, a.y + (b.y - a.y) * r, a.width + (b.width - a.width) * r,
               a.height + (b.height - a.height) * r, rotation)


def box_at(keyframes: Sequence[Keyframe], frame: int) -> Optional[Box]:
    """The box Label Studio's editor shows on ``frame`` (None: none shown); ``keyframes`` sorted by frame."""
    prev: Optional[Keyframe] = None
    for keyframe in keyframes:
        if keyframe.frame == frame:
            return keyframe.box
        if keyframe.frame > frame:
            if prev is None or not prev.enabled:
                return None
            return interpolate(prev, keyframe, frame)
        prev = keyframe
    return prev.box if prev is not None and prev.enabled else None


def dense_boxes(keyframes: Sequence[Keyframe], frames_count: Optional[int] = None) -> dict[int, Box]:
    """{frame: box} for every frame the editor shows the region on, up to ``frames_count`` (None: the last keyframe;
    a region whose last keyframe is enabled lasts to the end of the video). One pass, O(frames)."""
    out: dict[int, Box] = {}
    if not keyframes:
        return out
    last = frames_count if frames_count is not None else keyframes[-1].frame
    for i, start in enumerate(keyframes):
        end = keyframes[i + 1] if i + 1 < len(keyframes) else None
        if start.frame <= last:
            out.setdefault(start.frame, start.box)  # two keyframes on one frame: the editor shows the first
        if not start.enabled:
            continue
        stop = min(end.frame - 1 if end is not None else last, last)
        for frame in range(start.frame + 1, stop + 1):
            out[frame] = interpolate(start, end, frame) if end is not None else start.box
    return out


# --- boxes -> keyframes ------------------------------------------------------------------------------------------
def sparse_sequence(track: Mapping[int, Box], tolerance: float = 0.5, max_gap: int = 1,
                    run_starts: Collection[int] = ()) -> list[Keyframe]:
    """Keyframes that make the editor show ``track`` (frame -> box) within ``tolerance`` percent points on every
    frame of it, with as few keyframes as a greedy pass finds.

    Frames at most ``max_gap`` apart are one run (the detector saw every Nth frame: ``max_gap=N`` lets the editor
    interpolate between them); a longer gap ends a run with a disabled keyframe on its last frame, so the box is not
    shown where the track has none. The last run ends disabled too: a track ends where it was last seen.
    ``run_starts``: frames that start a new run whatever the gap (the caller knows where the track was missed, e.g.
    on a clip whose frame rate varies, where no one ``max_gap`` fits).
    """
    if max_gap < 1:
        raise ValueError("max_gap must be at least 1 (frames next to each other)")
    keyframes: list[Keyframe] = []
    for run in _runs(sorted(track), max_gap, run_starts):
        keyframes += _run_keyframes(run, track, tolerance)
    return keyframes


def _runs(frames: Sequence[int], max_gap: int, starts: Collection[int] = ()) -> Iterable[list[int]]:
    run: list[int] = []
    for frame in frames:
        if run and (frame - run[-1] > max_gap or frame in starts):
            yield run
            run = []
        run.append(frame)
    if run:
        yield run


def _run_keyframes(run: Sequence[int], track: Mapping[int, Box], tolerance: float) -> list[Keyframe]:
    """One run's keyframes: from each keyframe, the farthest frame whose straight line keeps every frame between
    within tolerance becomes the next one (the run's last frame always is, disabled)."""
    chosen = [0]
    while chosen[-1] < len(run) - 1:
        start = chosen[-1]
        end = start + 1
        while end + 1 < len(run) and end + 1 - start <= MAX_SPAN and _fits(run, track, start, end + 1, tolerance):
            end += 1
        chosen.append(end)
    keyframes = [Keyframe(run[i], True, track[run[i]]) for i in chosen]
    keyframes[-1] = Keyframe(keyframes[-1].frame, False, keyframes[-1].box)
    return keyframes


def _fits(run: Sequence[int], track: Mapping[int, Box], start: int, end: int, tolerance: float) -> bool:
    a = Keyframe(run[start], True, track[run[start]])
    b = Keyframe(run[end], True, track[run[end]])
    return all(interpolate(a, b, run[i]).drift(track[run[i]]) <= tolerance for i in range(start + 1, end))


def sequence_json(keyframes: Sequence[Keyframe], frame_rate: float) -> list[dict[str, Any]]:
    """Keyframes in Label Studio's stored shape (``time`` from ``frame_rate``)."""
    if not frame_rate > 0:
        raise ValueError(f"frame rate must be positive, not {frame_rate!r}")
    return [k.to_json(frame_rate) for k in keyframes]
