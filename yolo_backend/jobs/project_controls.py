"""What a project's label config trains: its image controls (RectangleLabels, Choices), its VideoRectangle, or both.

A video object tracking config (``<VideoRectangle>`` on a ``<Video>``, no Image) trains on clips only, its classes
the VideoRectangle's Labels in config order; a config with images and a VideoRectangle trains on both, class ids
by the image control's labels (a clip's label no class has is counted and skipped, as for images). The clips are
downloaded by the predict path's rules (``labelstudio.videos.video_file``: the image key and origin rules,
VIDEO_MAX_MB, VIDEO_TIMEOUT) and decoded within the same VIDEO_MAX_* bounds (``video_predictor``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from ..labelstudio.annotations import latest_annotation
from ..labelstudio.config import LabelConfigError, RectangleTarget
from ..labelstudio.controls import ConfigControls, read_controls
from ..labelstudio.urls import cut
from ..labelstudio.video_controls import (VideoRectangleControl, has_video_rectangles, is_video_config,
                                          read_video_control)
from .video_dataset import VideoSampling, VideoTraining, is_video_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectControls:
    """The served image controls (None: a project of clips only) and the VideoRectangle (None: images only)."""

    controls: Optional[ConfigControls]
    video: Optional[VideoRectangleControl]

    @property
    def target(self) -> Optional[RectangleTarget]:
        return self.controls.box_target() if self.controls is not None else None

    @property
    def names(self) -> list[str]:
        """The classes trained: the image boxes' labels, else the VideoRectangle's Labels (config order)."""
        target = self.target
        return list(target.labels) if target is not None else list(self.video.labels)  # type: ignore[union-attr]

    @property
    def box_names(self) -> tuple[str, ...]:
        """The image box controls (effort is counted on image tasks only)."""
        return tuple(self.controls.box_names) if self.controls is not None else ()

    @property
    def kind(self) -> str:
        """What the project's annotated tasks are, for messages."""
        if self.video is None:
            return "images"
        return "clips" if self.controls is None else "images or clips"

    @property
    def item(self) -> str:
        return {"images": "image", "clips": "clip"}.get(self.kind, "image or clip")

    def image_tasks(self, tasks: list[dict]) -> list[dict]:
        """``tasks`` without the clips: the annotation effort counts image boxes only (README: Annotation effort)."""
        if self.video is None:
            return tasks
        image_key = self.target.data_key if self.controls is not None else None  # type: ignore[union-attr]
        return [task for task in tasks
                if not is_video_task(task, latest_annotation(task) or {}, self.video, image_key)]


def read_project_controls(parsed: dict, from_name: Optional[str], project_id: object) -> ProjectControls:
    """The config's trained controls; LabelConfigError when it has none. In a config with images, a VideoRectangle
    that cannot be served (several of them, no Labels) leaves the clips out with one log line."""
    if is_video_config(parsed):
        return ProjectControls(None, read_video_control(parsed, from_name))
    controls = read_controls(parsed, from_name)
    video = None
    if has_video_rectangles(parsed):
        try:
            video = read_video_control(parsed)
        except LabelConfigError as exc:
            log.warning("project %s: its clips are not trained on: %s", project_id, cut(exc, 400))
    return ProjectControls(controls, video)


def video_training(context, control: VideoRectangleControl) -> VideoTraining:
    """How ``collect_examples`` gets the project's clips (``context``: a ``runtime.BackendContext``): each task's
    file by the predict path's download rules and bounds, no deadline but VIDEO_TIMEOUT per clip."""
    from ..labelstudio.videos import video_file
    from ..video_predictor import video_fetch_bounds, video_limits

    settings = context.settings
    bounds = video_fetch_bounds(settings)

    def open_video(task: dict):
        return video_file(context.images, (task.get("data") or {}).get(control.data_key), task.get("id"), bounds)

    return VideoTraining(control, open_video, VideoSampling.from_settings(settings), video_limits(settings))
