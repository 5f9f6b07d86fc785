"""Predictions for video tasks: a clip -> one ``videorectangle`` region per tracked object, and a task score.

For each task of a video project (``labelstudio.video_controls``: a ``<VideoRectangle>`` on a ``<Video>``): the
video file (``labelstudio.videos``: the image download rules, VIDEO_MAX_MB, VIDEO_TIMEOUT), its sampled frames
streamed from OpenCV's decoder (``video_frames``: every VIDEO_FRAME_STEP-th frame, true frame times, the
VIDEO_MAX_* bounds), the detector in batches and ByteTrack (``video_tracks``), and each track as a region
(``labelstudio.video_results``: majority label, mean score, sparse keyframes). Frame numbers are Label Studio's:
from each sampled frame's true time at the Video tag's ``frameRate``.

A file that cannot be had or decoded, or one beyond the bounds, gives its task no prediction and one log line;
the other tasks go on. ``predict`` stops at the deadline it is given, also inside a long video.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .labelstudio.client import LabelStudioAuthError
from .labelstudio.config import LabelMapping, parse_label_map
from .labelstudio.images import ImageFetchError, shown_url
from .labelstudio.results import failed_task_prediction, task_prediction
from .labelstudio.urls import cut
from .labelstudio.video_controls import VideoRectangleControl, read_video_control
from .labelstudio.video_results import TrackPoint, VideoClip, percent_box, track_region
from .labelstudio.videos import VideoFetchBounds, video_file
from .model_holder import LoadedModel
from .runtime import BackendContext
from .settings import Settings
from .video_frames import VideoError, VideoInfo, VideoLimits, label_studio_frame, probe, sampled_frames
from .video_tracks import Track, TrackOptions, VideoDeadline, VideoTracks, track_video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoServing:
    """What predictions for one video project need: its VideoRectangle, the model, classes -> labels."""

    control: VideoRectangleControl
    model: LoadedModel
    mapping: LabelMapping

    @property
    def version(self) -> str:
        return self.model.version


@dataclass
class VideoItem:
    """One task's item (as Label Studio stores it) and the mean embedding of its sampled frames (or None)."""

    item: dict
    embedding: Optional[np.ndarray] = None


@dataclass
class VideoRun:
    """Items for every task, in order, and how many the deadline left undone (items without ``result``)."""

    version: str
    items: list[VideoItem]
    unfinished: int = 0


class VideoPredictor:
    """Video tasks of the projects of one process (``BackendContext``: the model holder, the fetcher)."""

    def __init__(self, context: BackendContext):
        self.context = context
        self.settings = context.settings

    def serving(self, project_id: Optional[int], parsed: dict) -> VideoServing:
        control = read_video_control(parsed, self.settings.from_name)
        model = self.context.models.get(project_id, control.labels)
        return VideoServing(control, model, control.mapping(model.names, parse_label_map(self.settings.label_map)))

    def predict(self, project_id: Optional[int], parsed: dict, tasks: list[dict], deadline: Optional[float],
                embed: bool = False) -> VideoRun:
        """Items for ``tasks``, one video after the other, until ``deadline`` (``time.monotonic()``; None: none)."""
        serving = self.serving(project_id, parsed)
        items: list[VideoItem] = []
        for position, task in enumerate(tasks):
            try:
                if deadline is not None and time.monotonic() > deadline:
                    raise VideoDeadline()
                items.append(self._task(task, position, serving, deadline, embed))
            except VideoDeadline:
                left = len(tasks) - position
                log.warning("predicted %d of %d video tasks within PREDICT_DEADLINE_S=%g s; the other %d get no "
                            "prediction now (Label Studio asks for them again; pool scoring stores them)", position,
                            len(tasks), self.settings.predict_deadline_s, left)
                failed = [VideoItem(failed_task_prediction(serving.version)) for _ in range(left)]
                return VideoRun(serving.version, items + failed, left)
        return VideoRun(serving.version, items)

    def _task(self, task: dict, position: int, serving: VideoServing, deadline: Optional[float],
              embed: bool) -> VideoItem:
        version, data_key = serving.version, serving.control.data_key
        shown = shown_url(str(task.get("id")), 40)
        url = task["data"].get(data_key)
        if url is None:
            log.warning("task %s: no %r field in its data (fields: %s); predicting nothing for it", shown, data_key,
                        cut(", ".join(sorted(map(str, task["data"]))) or "none"))
            return VideoItem(task_prediction([], None, version))
        try:
            with video_file(self.context.images, url, task.get("id"), self._fetch_bounds(deadline)) as path:
                info = probe(path, self._limits())
                found = track_video(sampled_frames(path, self.settings.video_frame_step, self._limits()),
                                    self._detect(serving, embed), self._options(serving, info), deadline)
        except VideoDeadline:
            raise
        except (ImageFetchError, LabelStudioAuthError, VideoError) as exc:
            if deadline is not None and time.monotonic() > deadline:  # cut off by the deadline: not the file's fault
                raise VideoDeadline() from None
            log.warning("task %s: video not available, no prediction: %s", shown, cut(exc, 600))
            return VideoItem(failed_task_prediction(version))
        except Exception:  # an unexpected failure on one video must not fail the others
            log.exception("task %s: video %s failed unexpectedly; no prediction", shown, shown_url(str(url)))
            return VideoItem(failed_task_prediction(version))
        regions, score = self.regions(found, info, serving, task, task.get("id", position))
        return VideoItem(task_prediction(regions, score, version), found.embedding)

    def regions(self, found: VideoTracks, info: VideoInfo, serving: VideoServing, task: dict,
                key: Any) -> tuple[list[dict], Optional[float]]:
        """The tracks as regions, and the task score (None: no frame could be decoded)."""
        if not found.times:
            log.warning("task %s: no frame of the video could be decoded (%s); an empty prediction",
                        shown_url(str(task.get("id")), 40), info.codec)
            return [], None
        rate = serving.control.frame_rate(task.get("data"))
        clip = VideoClip(rate, max(_frames_count(info, rate), label_studio_frame(found.times[-1], rate)),
                         max(info.duration_s, found.times[-1]))
        names = (serving.control.name, serving.control.to_name)
        regions: list[dict] = []
        for track in found.tracks:
            points = [_point(box, found, rate) for box in track.boxes]
            frame_of = {box.frame_index: point.frame for box, point in zip(track.boxes, points)}
            # One run while the track is seen on every sampled frame, or misses one (ByteTrack kept it): the editor
            # interpolates across; a longer absence ends the run (enabled: false). Counted in sampled frames, not
            # in Label Studio frames, which a variable frame rate spaces unevenly.
            starts = {frame_of[index] for index in found.missed_starts(track)}
            region = track_region(points, names, serving.mapping, clip, frame_step=clip.frames_count + 1,
                                  model_version=serving.version, task_key=key, index=len(regions), run_starts=starts)
            if region is not None and _shown(track, serving, self.settings.model_score_threshold):
                regions.append(region)
        return regions, found.task_score

    # --- settings -> options ----------------------------------------------------------------------------------
    def _limits(self) -> VideoLimits:
        return video_limits(self.settings)

    def _fetch_bounds(self, deadline: Optional[float]) -> VideoFetchBounds:
        return video_fetch_bounds(self.settings, deadline)

    def _options(self, serving: VideoServing, info: VideoInfo) -> TrackOptions:
        s = self.settings
        return TrackOptions(threshold=serving.control.threshold_or(s.model_score_threshold), floor=self._floor(serving),
                            strategy=s.task_score, fps=info.fps, batch_size=s.predict_batch_size)

    def _floor(self, serving: VideoServing) -> float:
        return min(self.settings.score_floor, serving.control.threshold_or(self.settings.score_floor))

    def _detect(self, serving: VideoServing, embed: bool):
        detector, floor = serving.model.detector, self._floor(serving)
        extra = {"embed": True} if embed else {}
        return lambda images: detector.detect(images, conf=floor, **extra)


def video_limits(settings: Settings) -> VideoLimits:
    """The decoding bounds (VIDEO_MAX_PIXELS, VIDEO_MAX_FRAMES, VIDEO_MAX_SECONDS): predictions and training."""
    return VideoLimits(max_pixels=settings.video_max_pixels, max_frames=settings.video_max_frames,
                       max_seconds=settings.video_max_seconds)


def video_fetch_bounds(settings: Settings, deadline: Optional[float] = None) -> VideoFetchBounds:
    """VIDEO_MAX_MB, and VIDEO_TIMEOUT or the time left to ``deadline`` (``time.monotonic()``), whichever is
    shorter: predictions and training download clips by the same rules."""
    timeout = settings.video_timeout
    if deadline is not None:
        timeout = max(0.1, min(timeout, deadline - time.monotonic()))
    mb = settings.video_max_mb
    return VideoFetchBounds(max_bytes=(mb << 20) if mb > 0 else 1 << 62, timeout=timeout)  # 0: no bound


def _frames_count(info: VideoInfo, rate: float) -> int:
    """``framesCount`` as Label Studio counts frames: the clip's duration at the tag's rate."""
    return max(1, int(round(info.duration_s * rate))) if info.fps > 0 else max(1, info.frames)


def _point(box, found: VideoTracks, rate: float) -> TrackPoint:
    x1, y1, x2, y2 = box.xyxy
    return TrackPoint(label_studio_frame(box.time_s, rate), percent_box(x1, y1, x2, y2, found.width, found.height),
                      box.class_id, box.score)


def _shown(track: Track, serving: VideoServing, default: float) -> bool:
    """A track becomes a region when one of its detections reaches the shown threshold (model_score_threshold)."""
    threshold = serving.control.threshold_or(default)
    return any(box.score >= threshold for box in track.boxes)
