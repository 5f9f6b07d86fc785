"""Label Studio's video object tracking config: which control gets video boxes, with which labels.

Label Studio 1.23's template (``annotation_templates/videos/video-object-tracking``)::

    <Labels name="videoLabels" toName="video" allowEmpty="true"><Label value="fire"/>...</Labels>
    <Video name="video" value="$video" framerate="25.0"/>
    <VideoRectangle name="box" toName="video"/>

A ``<VideoRectangle>`` has no labels of its own: they come from the ``<Labels>`` on the same ``<Video>``, and the
stored region is ``{"from_name": "box", "to_name": "video", "type": "videorectangle", "value": {"labels": [...],
"sequence": [...], "framesCount", "duration"}}`` (``keyframes.py`` reads and writes the sequence). Classes map to
labels as for images (``predicted_values`` on a ``<Label>``, then LABEL_MAP, then names: ``config.py``);
``model_score_threshold`` and ``model_skip`` go on the ``<VideoRectangle>``.

The Video tag's ``frameRate`` (default 24, may be ``$field`` of the task data) is what Label Studio numbers frames
by: ``VideoRectangleControl.frame_rate`` reads it as the editor does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .config import IMAGE_OBJECTS, VIDEO_OBJECTS, LabelConfigError, LabelMapping, is_skipped, map_classes_to_labels
from .controls import SKIP_ATTR, THRESHOLD_ATTR, _flag, _predicted, _threshold

log = logging.getLogger(__name__)

VIDEO_RECTANGLE = "VideoRectangle"
VIDEO_LABELS = "Labels"
DEFAULT_FRAME_RATE = 24.0  # the Video tag's default

EXAMPLE = ("<Labels name=\"videoLabels\" toName=\"video\"><Label value=\"fire\"/><Label value=\"smoke\"/></Labels>"
           "<Video name=\"video\" value=\"$video\" framerate=\"25\"/><VideoRectangle name=\"box\" toName=\"video\"/>")


@dataclass(frozen=True)
class VideoRectangleControl:
    """A ``<VideoRectangle>`` on a ``<Video>``: its name (the regions' ``from_name``), the Video's name and task data
    field, the labels of the ``<Labels>`` on that Video (config order, each once), and the model attributes."""

    name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    labels_controls: tuple[str, ...]
    frame_rate_text: Optional[str] = None                     # the Video's frameRate as written; None: 24
    threshold: Optional[float] = None                         # model_score_threshold; None: the setting
    predicted: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (label, its predicted_values)

    def threshold_or(self, default: float) -> float:
        return default if self.threshold is None else self.threshold

    def frame_rate(self, task_data: Optional[Mapping[str, Any]] = None) -> float:
        """Frames per second as Label Studio's editor reads the Video's ``frameRate`` (``$field``: from the task
        data): not a positive number -> 24; below 1 -> its inverse (seconds per frame written by mistake)."""
        text = (self.frame_rate_text or "").strip()
        if text.startswith("$"):
            text = str((task_data or {}).get(text[1:], "")).strip()
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            return DEFAULT_FRAME_RATE
        return 1.0 / value if value < 1 else value

    def mapping(self, class_names: Sequence[str], label_map: Optional[Mapping[str, str]] = None) -> LabelMapping:
        """The model's classes -> this control's labels, with images' rules and errors (``map_classes_to_labels``);
        a model trained on this config has its labels as classes, so ``predicted_values`` were for the start one."""
        trained = bool(self.labels) and sorted(c.lower() for c in class_names) == sorted(
            label.lower() for label in self.labels)
        return map_classes_to_labels(class_names, self.labels, label_map, dict(self.predicted),
                                     trained_on_labels=trained)


def has_video_rectangles(parsed: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the config has a ``<VideoRectangle>`` on a ``<Video>`` (skipped or not)."""
    return any(info.get("type") == VIDEO_RECTANGLE and _video_input(info) for info in parsed.values())


def is_video_config(parsed: Mapping[str, Mapping[str, Any]]) -> bool:
    """A video project's config: a ``<VideoRectangle>`` on a ``<Video>`` and no control on an ``<Image>`` (a config
    with both is served as an image project, as before video was known)."""
    on_image = any(inp.get("type") in IMAGE_OBJECTS for info in parsed.values() for inp in info.get("inputs", []))
    return has_video_rectangles(parsed) and not on_image


def read_video_control(parsed: Mapping[str, Mapping[str, Any]],
                       from_name: Optional[str] = None) -> VideoRectangleControl:
    """The ``<VideoRectangle>`` to predict for; LabelConfigError saying what to change when there is none, when
    several leave the choice open (FROM_NAME picks one), or when its Video has no ``<Labels>``."""
    candidates = {name: info for name, info in parsed.items()
                  if info.get("type") == VIDEO_RECTANGLE and _video_input(info)}
    skipped = [name for name, info in candidates.items() if _skip(name, info)]
    served = {name: info for name, info in candidates.items() if name not in skipped}
    if from_name:
        if from_name not in candidates:
            raise LabelConfigError(f"FROM_NAME={from_name!r} names no VideoRectangle control of the label config; "
                                   f"candidates: {', '.join(sorted(candidates)) or 'none'}")
        if from_name in skipped:
            raise LabelConfigError(f"FROM_NAME={from_name!r} names a control with {SKIP_ATTR}=\"true\": remove one")
        served = {from_name: served[from_name]}
    if not served:
        found = ", ".join(f"{name} ({info.get('type')})" for name, info in parsed.items()) or "no control tags"
        raise LabelConfigError(
            f"the label config has no <VideoRectangle> control for the model attached to a <Video> (found: {found}"
            f"{'; ' + SKIP_ATTR + ': ' + ', '.join(skipped) if skipped else ''}); add e.g. {EXAMPLE}")
    if len(served) > 1:
        raise LabelConfigError(f"the label config has several VideoRectangle controls ({', '.join(sorted(served))});"
                               " set FROM_NAME to the one the model should predict for, or add "
                               f"{SKIP_ATTR}=\"true\" to the others")
    name, info = next(iter(served.items()))
    return _control(name, info, parsed)


def _control(name: str, info: Mapping[str, Any], parsed: Mapping[str, Mapping[str, Any]]) -> VideoRectangleControl:
    to_name, video = _video_input(info)[0]
    labels_controls = [(other, other_info) for other, other_info in parsed.items()
                       if other_info.get("type") == VIDEO_LABELS and to_name in other_info.get("to_name", [])]
    labels: dict[str, str] = {}
    predicted: list[tuple[str, tuple[str, ...]]] = []
    for other, other_info in labels_controls:
        for label in other_info.get("labels", []):
            labels.setdefault(label.lower(), label)
        predicted += _predicted(other, other_info.get("labels_attrs") or {})
    if not labels:
        raise LabelConfigError(
            f"VideoRectangle {name!r} is on Video {to_name!r}, which has no <Labels> control with labels (the "
            f"classes of the boxes); add <Labels name=\"videoLabels\" toName=\"{to_name}\"><Label value=\"fire\"/>"
            "</Labels>")
    attrs = info.get("attrs") or {}
    return VideoRectangleControl(
        name=name, to_name=to_name, data_key=video["value"], labels=tuple(labels.values()),
        labels_controls=tuple(other for other, _ in labels_controls), frame_rate_text=video.get("frameRate"),
        threshold=_threshold(name, attrs.get(THRESHOLD_ATTR)), predicted=tuple(predicted))


def _video_input(info: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(to, inp) for to, inp in zip(info.get("to_name", []), info.get("inputs", []))
            if inp.get("type") in VIDEO_OBJECTS and inp.get("value")]


def _skip(name: str, info: Mapping[str, Any]) -> bool:
    """model_skip, checked (a bad value is an error, as for image controls)."""
    _flag(name, SKIP_ATTR, (info.get("attrs") or {}).get(SKIP_ATTR))
    return is_skipped(info)


def check_video_attributes(parsed: Mapping[str, Mapping[str, Any]]) -> None:
    """LabelConfigError for a bad model attribute on a ``<VideoRectangle>`` or on the labels of a ``<Labels>`` on a
    Video (what /setup checks: no model needed)."""
    for name, info in parsed.items():
        if info.get("type") == VIDEO_RECTANGLE and _video_input(info):
            _skip(name, info)
            _threshold(name, (info.get("attrs") or {}).get(THRESHOLD_ATTR))
        elif info.get("type") == VIDEO_LABELS and _video_input(info):
            _predicted(name, info.get("labels_attrs") or {})
