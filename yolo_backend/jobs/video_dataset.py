"""Training examples from annotated video clips: a video task's latest annotation -> a few of its frames, each an
``Example`` with the boxes Label Studio's editor shows on it.

Per clip: the annotation's ``videorectangle`` regions give the boxes on every frame (``labelstudio.video_regions``:
the editor's interpolation, the image rule for clipping, bad regions counted); ``sample_frames`` picks at most
VIDEO_TRAIN_FRAMES_PER_CLIP of them (fewer when the project's clips together pass VIDEO_TRAIN_MAX_FRAMES), at least
VIDEO_TRAIN_MIN_GAP_S apart, negatives (no box shown) bounded by VIDEO_TRAIN_NEGATIVE_SHARE; the file is streamed
(``video_frames.frames_at``: only those frames converted, decoding stops after the last) and each frame scaled to
the training size at once, so memory is the kept frames, never the clip.

Every frame of a clip keeps the clip's task id: ``split_examples`` splits by task id, so a clip's frames are all on
one side of train / validation. The file comes from ``VideoTraining.open_video`` (the caller's download: this module
fetches nothing); Label Studio's frame numbers are read at the Video tag's frame rate, frames matched by their own
timestamps.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence, Union

import numpy as np

from ..labelstudio.regions import BadRegion
from ..labelstudio.urls import cut, shorten
from ..labelstudio.video_controls import VideoRectangleControl
from ..labelstudio.video_regions import clip_boxes, is_video_box_region, sample_frames, stored_frames_count
from ..settings import Settings
from ..video_frames import VideoLimits, frame_count_hint, frames_at, probe
from .examples import Example, class_boxes, scale_to
from .states import JobPhase

log = logging.getLogger(__name__)

# task -> the clip as a local file: a path, or a context manager giving one (a download removed on exit)
VideoOpener = Callable[[dict], Union[str, Path, ContextManager[Union[str, Path]]]]


@dataclass(frozen=True)
class VideoSampling:
    """How many frames of which clips (the VIDEO_TRAIN_* settings)."""

    frames_per_clip: int = 30
    max_frames: int = 3000
    min_gap_s: float = 0.5
    negative_share: float = 0.25

    @classmethod
    def from_settings(cls, settings: Settings) -> "VideoSampling":
        return cls(settings.video_train_frames_per_clip, settings.video_train_max_frames,
                   settings.video_train_min_gap_s, settings.video_train_negative_share)

    def per_clip(self, clips: int) -> int:
        """Frames one clip may give when the project has ``clips`` annotated clips (each at least one)."""
        return max(1, min(self.frames_per_clip, self.max_frames // max(1, clips)))

    def min_gap(self, frame_rate: float) -> int:
        """VIDEO_TRAIN_MIN_GAP_S in Label Studio frames at ``frame_rate`` (at least 1)."""
        return max(1, math.ceil(self.min_gap_s * frame_rate - 1e-9))


@dataclass(frozen=True)
class VideoTraining:
    """What ``collect_examples`` needs to train on a project's video tasks: the VideoRectangle control, how to get
    a task's clip as a file, the sampling and the decoding bounds."""

    control: VideoRectangleControl
    open_video: VideoOpener
    sampling: VideoSampling = VideoSampling()
    limits: VideoLimits = VideoLimits()


@dataclass
class ClipExamples:
    """One clip's examples and what was skipped on the way."""

    examples: list[Example] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)   # labels of boxes on the taken frames that no class has
    bad: list[BadRegion] = field(default_factory=list)


def is_video_task(task: dict, annotation: dict, control: VideoRectangleControl,
                  image_key: Optional[str] = None) -> bool:
    """Whether the task is trained on as a clip: its data has the Video's field and (in a project that also has
    images) its annotation has a region of the VideoRectangle, or its data lacks the image field."""
    data = task.get("data") or {}
    if not isinstance(data, dict) or not data.get(control.data_key):
        return False
    if image_key is None or not data.get(image_key):
        return True
    return any(is_video_box_region(r, control.name) for r in annotation.get("result") or [])


def clip_examples(path: Union[str, Path], task_id: int, results: Sequence[Any], control: VideoRectangleControl,
                  frame_rate: float, names: Sequence[str], size: int, most: int,
                  sampling: Optional[VideoSampling] = None, limits: Optional[VideoLimits] = None) -> ClipExamples:
    """The training examples of one annotated clip (the file at ``path``; ``results``: its annotation's regions):
    at most ``most`` sampled frames, scaled so the long side is at most ``size``. VideoError when the file cannot
    be read or passes ``limits`` (None: ``VideoLimits()``'s defaults)."""
    sampling, limits = sampling or VideoSampling(), limits or VideoLimits()
    info = probe(Path(path), limits)
    frames_count = frame_count_hint(info, frame_rate) or stored_frames_count(results, control.name)
    clip = clip_boxes(results, control.name, frames_count, (info.width, info.height))
    out = ClipExamples(bad=list(clip.bad))
    targets = sample_frames(clip, most, sampling.min_gap(frame_rate), sampling.negative_share)
    for number, frame in frames_at(Path(path), targets, frame_rate, limits):
        height, width = frame.rgb.shape[:2]
        boxes, classes, unknown = class_boxes(clip.on(number), names, width, height)
        small, r = scale_to(frame.rgb, size)
        out.examples.append(Example(int(task_id), np.ascontiguousarray(small), boxes * r, classes, None, r))
        out.unknown += unknown
    return out


@contextlib.contextmanager
def _opened(open_video: VideoOpener, task: dict) -> Iterator[Path]:
    found = open_video(task)
    if isinstance(found, (str, Path)):
        yield Path(found)
    else:
        with found as path:
            yield Path(path)


def collect_video_examples(video: VideoTraining, chosen: Sequence[tuple[dict, dict]], names: Sequence[str],
                           size: int, report: Callable[[dict], None]) -> tuple[list[Example], dict]:
    """(task, its latest annotation) pairs of video tasks -> examples and counts (the image path's keys plus
    ``video_tasks``, ``video_frames``, ``video_failed``). A clip that cannot be had or read is logged and skipped:
    one bad file must not fail the job."""
    counts = {"video_tasks": len(chosen), "video_frames": 0, "video_failed": 0, "negatives": 0, "boxes": 0,
              "unknown_labels": 0, "bad_regions": 0}
    most = video.sampling.per_clip(len(chosen))
    examples: list[Example] = []
    for done, (task, annotation) in enumerate(chosen, start=1):
        shown_id = shorten(task.get("id"), 40)
        try:
            with _opened(video.open_video, task) as path:
                found = clip_examples(path, int(task["id"]), annotation.get("result") or [], video.control,
                                      video.control.frame_rate(task.get("data")), names, size, most,
                                      video.sampling, video.limits)
        except Exception as exc:  # a missing, corrupt or too large clip: this task only
            log.warning("task %s: video not available, not trained on: %s", shown_id, cut(exc, 600))
            counts["video_failed"] += 1
            continue
        finally:
            report({"phase": JobPhase.DOWNLOADING, "videos": done, "total": len(chosen)})
        for region in found.bad:
            log.warning("task %s: %s; skipped", shown_id, cut(region.message, 400))
        counts["bad_regions"] += len(found.bad)
        counts["unknown_labels"] += len(found.unknown)
        counts["video_frames"] += len(found.examples)
        counts["boxes"] += sum(len(e.boxes) for e in found.examples)
        counts["negatives"] += sum(1 for e in found.examples if len(e.boxes) == 0)
        examples += found.examples
    return examples, counts
