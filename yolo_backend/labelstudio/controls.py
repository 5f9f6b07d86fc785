"""The control tags the backend serves, one small object per tag, with the attributes Label Studio's YOLO example
taught users to write in the label config:

- ``model_score_threshold="0.4"`` on a control: the score a detection needs to be shown for that control (else
  MODEL_SCORE_THRESHOLD);
- ``model_skip="true"`` on a control: it gets no predictions (and its boxes are not trained on);
- ``predicted_values="fire,flame"`` on a ``<Label>`` or ``<Choice>``: which model classes become it (LABEL_MAP's
  job, per label; it wins over LABEL_MAP for those classes).

``read_controls(parsed, from_name)`` checks the attributes and picks the controls on one image: every
``RectangleLabels`` not skipped (FROM_NAME narrows them to one) and every ``Choices`` on the same image.
``ConfigControls.bind(class_names, label_map)`` maps the model's classes to each control's labels, giving the
``ServedControl`` objects that turn one image's detections into that control's results. A ``Choices`` control answers
for the whole image: the classes with a box at or above its threshold (one choice: the top class; ``choice=
"multiple"``: all of them). Its choices must match model classes, except at most one: the "nothing found" answer
(e.g. ``no fire``), chosen when no box reaches the threshold. A Choices control none of whose choices is a class is
not about the detector and is left alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

from .config import (IMAGE_OBJECTS, TRUE_WORDS, LabelConfigError, LabelMapping, RectangleTarget, check_unmatched,
                     map_classes_to_labels)
from .results import choices_region, detections_to_regions

log = logging.getLogger(__name__)

THRESHOLD_ATTR = "model_score_threshold"
SKIP_ATTR = "model_skip"
PREDICTED_ATTR = "predicted_values"
FALSE_WORDS = ("false", "no", "0", "")
SUPPORTED = ("Supported: RectangleLabels (boxes) and Choices (one answer per image) on an Image, and "
             "VideoRectangle with Labels on a Video (predictions and training); "
             "PolygonLabels, KeyPointLabels, BrushLabels, Labels with Rectangle and the other tags are not")


@dataclass(frozen=True)
class ControlTag:
    """One control tag of the config attached to an Image: its name, the Image's name and task data field, its
    labels (or choices) in config order, and the model attributes read from it."""

    name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    threshold: Optional[float] = None                         # model_score_threshold; None: the setting
    skip: bool = False                                        # model_skip
    predicted: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (label, its predicted_values)

    tag: ClassVar[str] = ""

    @classmethod
    def from_parsed(cls, name: str, info: Mapping[str, Any]) -> Optional["ControlTag"]:
        """The control from its ``parse_label_config`` entry (None: not attached to an Image); bad attribute values
        are a LabelConfigError."""
        images = [(to, inp) for to, inp in zip(info.get("to_name", []), info.get("inputs", []))
                  if inp.get("type") in IMAGE_OBJECTS and inp.get("value")]
        if not images:
            return None
        attrs = info.get("attrs") or {}
        to_name, image = images[0]
        return cls(name=name, to_name=to_name, data_key=image["value"], labels=tuple(info.get("labels", [])),
                   threshold=_threshold(name, attrs.get(THRESHOLD_ATTR)), skip=_flag(name, SKIP_ATTR,
                                                                                       attrs.get(SKIP_ATTR)),
                   predicted=_predicted(name, info.get("labels_attrs") or {}), **cls._extra(attrs))

    @classmethod
    def _extra(cls, attrs: Mapping[str, str]) -> dict[str, Any]:
        return {}

    def threshold_or(self, default: float) -> float:
        return default if self.threshold is None else self.threshold

    def mapping(self, class_names: Sequence[str], label_map: Mapping[str, str],
                trained_on_labels: bool = False) -> LabelMapping:
        """The model's classes -> this control's labels (predicted_values, then the LABEL_MAP entries for its
        labels, then names; ``trained_on_labels``: see ``map_classes_to_labels``)."""
        own_map = {cls: label for cls, label in label_map.items() if label in self.labels}
        return map_classes_to_labels(class_names, self.labels, own_map, dict(self.predicted), check_leftovers=False,
                                     trained_on_labels=trained_on_labels)


@dataclass(frozen=True)
class RectangleControl(ControlTag):
    """A ``<RectangleLabels>``: one region per detection of a class with a label."""

    tag: ClassVar[str] = "RectangleLabels"

    def target(self) -> RectangleTarget:
        return RectangleTarget(self.name, self.to_name, self.data_key, self.labels)


@dataclass(frozen=True)
class ChoicesControl(ControlTag):
    """A ``<Choices>``: one answer for the whole image (``multiple``: ``choice="multiple"``)."""

    multiple: bool = False

    tag: ClassVar[str] = "Choices"

    @classmethod
    def _extra(cls, attrs: Mapping[str, str]) -> dict[str, Any]:
        return {"multiple": str(attrs.get("choice", "single")).strip().lower() == "multiple"}


CONTROL_CLASSES: dict[str, type[ControlTag]] = {c.tag: c for c in (RectangleControl, ChoicesControl)}


# --- serving: one control with the model's classes ------------------------------------------------------------
@dataclass(frozen=True)
class ServedRectangles:
    """A RectangleLabels control with the model's classes mapped to its labels."""

    control: RectangleControl
    mapping: LabelMapping

    def results(self, detections: Any, default_threshold: float, version: str, task_key: Any) -> list[dict]:
        shown = detections.above(self.control.threshold_or(default_threshold))
        return detections_to_regions(shown, self.control.target(), self.mapping, version, task_key)


@dataclass(frozen=True)
class ServedChoices:
    """A Choices control with the model's classes mapped to its choices; ``none_choice``: the answer when no box
    reaches the threshold (None: no answer then)."""

    control: ChoicesControl
    mapping: LabelMapping
    none_choice: Optional[str] = None

    def results(self, detections: Any, default_threshold: float, version: str, task_key: Any) -> list[dict]:
        """One choices result: the classes with a box at or above the threshold, each scored by its best box (one
        choice: the top class; multiple: all, scored by the weakest of them, as sure as the answer is whole); none
        found: the none choice, scored 1 - the best score of the control's classes."""
        best: dict[str, float] = {}
        for label_id, score in zip(detections.labels, detections.scores):
            choice = self.mapping.label_of(int(label_id))
            if choice is not None:
                best[choice] = max(best.get(choice, 0.0), float(score))
        threshold = self.control.threshold_or(default_threshold)
        found = sorted(((s, c) for c, s in best.items() if s >= threshold), reverse=True)
        if found:
            chosen = found if self.control.multiple else found[:1]
            return [choices_region(self.control.name, self.control.to_name, [c for _, c in chosen],
                                   min(s for s, _ in chosen), version, task_key)]
        if self.none_choice is None:
            return []
        return [choices_region(self.control.name, self.control.to_name, [self.none_choice],
                               1.0 - max(best.values(), default=0.0), version, task_key)]


ServedControl = Union[ServedRectangles, ServedChoices]


# --- the config: which controls are served ----------------------------------------------------------------------
@dataclass(frozen=True)
class ConfigControls:
    """The served controls of a label config, all on one image: RectangleLabels (``rectangles``) and Choices."""

    rectangles: tuple[RectangleControl, ...]
    choices: tuple[ChoicesControl, ...] = ()
    skipped: tuple[str, ...] = field(default=())   # controls with model_skip="true"

    @property
    def data_key(self) -> str:
        return (self.rectangles or self.choices)[0].data_key

    @property
    def labels(self) -> tuple[str, ...]:
        """The box labels a model trained for this config learns: the served RectangleLabels' labels, in config
        order, each once (compared case-insensitively)."""
        seen: dict[str, str] = {}
        for control in self.rectangles:
            for label in control.labels:
                seen.setdefault(label.lower(), label)
        return tuple(seen.values())

    @property
    def box_names(self) -> tuple[str, ...]:
        """The RectangleLabels controls whose annotated boxes are trained on."""
        return tuple(c.name for c in self.rectangles)

    def box_target(self) -> RectangleTarget:
        """One target for training: the first served RectangleLabels' names, every served label."""
        if not self.rectangles:
            raise LabelConfigError("training needs a <RectangleLabels> control (boxes) attached to the image; the "
                                   "served controls are Choices only")
        first = self.rectangles[0]
        return RectangleTarget(first.name, first.to_name, first.data_key, self.labels)

    def class_choices(self) -> dict[str, tuple[str, ...]]:
        """{Choices control: the choices that name a box label} (what a chosen class means in an annotation)."""
        labels = {label.lower() for label in self.labels}
        out = {}
        for control in self.choices:
            predicted = dict(control.predicted)
            out[control.name] = tuple(c for c in control.labels if c.lower() in labels or any(
                v.lower() in labels for v in predicted.get(c, ())))
        return out

    def bind(self, class_names: Sequence[str], label_map: Optional[Mapping[str, str]] = None) \
            -> tuple[ServedControl, ...]:
        """The served controls with the model's classes mapped; LabelConfigError for a LABEL_MAP or
        predicted_values naming what is not there, and for misspelt labels (``check_unmatched``)."""
        label_map = dict(label_map or {})
        all_labels = {label for c in (*self.rectangles, *self.choices) for label in c.labels}
        for cls, label in label_map.items():
            if label not in all_labels:
                raise LabelConfigError(f"LABEL_MAP maps {cls!r} to {label!r}, which is not a label of the config "
                                       f"(labels: {', '.join(sorted(all_labels)) or 'none'})")
        # A model this backend trained on the config has its labels as classes: predicted_values were for the
        # checkpoint the project started from.
        trained = bool(self.labels) and sorted(c.lower() for c in class_names) == sorted(
            label.lower() for label in self.labels)
        rectangles = [ServedRectangles(c, c.mapping(class_names, label_map, trained)) for c in self.rectangles]
        if rectangles:
            check_unmatched(class_names, [r.mapping for r in rectangles])
        choices = [served for c in self.choices if (served := _served_choices(c, class_names, label_map, trained))]
        return (*rectangles, *choices)


def _served_choices(control: ChoicesControl, class_names: Sequence[str], label_map: Mapping[str, str],
                    trained: bool) -> Optional[ServedChoices]:
    mapping = control.mapping(class_names, label_map, trained)
    unmatched = list(mapping.unlearned_labels)
    if len(unmatched) == len(control.labels):  # not about the detector's classes: left to the annotators
        log.info("Choices %r: no choice is a class of the model (%s); not predicted", control.name,
                 ", ".join(class_names) or "none")
        return None
    if len(unmatched) > 1:
        raise LabelConfigError(
            f"Choices {control.name!r}: choices {', '.join(map(repr, unmatched))} are not classes of the model "
            f"(classes: {', '.join(class_names) or 'none'}); at most one choice may match no class (the answer "
            "when nothing is found, e.g. 'no fire'): rename the others, add predicted_values=\"class\" to them, or "
            f"add {SKIP_ATTR}=\"true\" to the Choices")
    return ServedChoices(control, mapping, unmatched[0] if unmatched else None)


def read_controls(parsed: Mapping[str, Mapping[str, Any]], from_name: Optional[str] = None) -> ConfigControls:
    """The controls to serve (see the module doc); LabelConfigError when there are none or the choice is
    ambiguous, saying what to change. ``from_name`` (FROM_NAME) names the one RectangleLabels to serve."""
    controls = [c for name, info in parsed.items() if (kind := CONTROL_CLASSES.get(str(info.get("type"))))
                and (c := kind.from_parsed(name, info)) is not None]
    skipped = tuple(c.name for c in controls if c.skip)
    rectangles = [c for c in controls if isinstance(c, RectangleControl)]
    if from_name:
        named = [c for c in rectangles if c.name == from_name]
        if not named:
            raise LabelConfigError(
                f"FROM_NAME={from_name!r} names no RectangleLabels control of the label config; "
                f"candidates: {', '.join(sorted(c.name for c in rectangles)) or 'none'}")
        if named[0].skip:
            raise LabelConfigError(f"FROM_NAME={from_name!r} names a control with {SKIP_ATTR}=\"true\": remove one")
        rectangles = named
    rectangles = [c for c in rectangles if not c.skip]
    images = {c.data_key for c in rectangles}
    if len(images) > 1:
        raise LabelConfigError(
            f"the label config's RectangleLabels controls ({', '.join(sorted(c.name for c in rectangles))}) are on "
            f"different images; set FROM_NAME to the one the model should predict for, or add {SKIP_ATTR}=\"true\" "
            "to the others")
    choices = [c for c in controls if isinstance(c, ChoicesControl) and not c.skip]
    if rectangles:
        choices = [c for c in choices if c.data_key == rectangles[0].data_key]
    elif choices:  # Choices only: those on the first one's image
        choices = [c for c in choices if c.data_key == choices[0].data_key]
    if not rectangles and not choices:
        found = ", ".join(f"{name} ({info.get('type')})" for name, info in parsed.items()) or "no control tags"
        if any(info.get("type") == "VideoRectangle" for info in parsed.values()):
            raise LabelConfigError(
                f"the label config is a video object tracking config (found: {found}): video projects are served "
                f"by the video path (README: Video), not as images; this step takes images only. {SUPPORTED}")
        raise LabelConfigError(
            "the label config has no <RectangleLabels> or <Choices> control for the model attached to an <Image> "
            f"(found: {found}{'; ' + SKIP_ATTR + ': ' + ', '.join(skipped) if skipped else ''}). {SUPPORTED}; add "
            "e.g. <Image name=\"image\" value=\"$image\"/><RectangleLabels name=\"label\" toName=\"image\"><Label "
            "value=\"fire\"/><Label value=\"smoke\"/></RectangleLabels>")
    return ConfigControls(tuple(rectangles), tuple(choices), skipped)


def check_control_attributes(parsed: Mapping[str, Mapping[str, Any]]) -> None:
    """LabelConfigError for a bad model attribute on any control (what /setup checks: no model needed)."""
    for name, info in parsed.items():
        kind = CONTROL_CLASSES.get(str(info.get("type")))
        if kind is not None:
            kind.from_parsed(name, info)


# --- attribute values --------------------------------------------------------------------------------------------
def _threshold(control: str, text: Optional[str]) -> Optional[float]:
    if text is None or not str(text).strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise LabelConfigError(f"control {control!r}: {THRESHOLD_ATTR}={str(text)[:40]!r} is not a number from 0 "
                               f"to 1; write e.g. {THRESHOLD_ATTR}=\"0.4\"")
    return value


def _flag(control: str, attr: str, text: Optional[str]) -> bool:
    word = str(text or "").strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise LabelConfigError(f"control {control!r}: {attr}={str(text)[:40]!r} is not true or false; write "
                           f"{attr}=\"true\"")


def _predicted(control: str, labels_attrs: Mapping[str, Mapping[str, str]]) \
        -> tuple[tuple[str, tuple[str, ...]], ...]:
    found = []
    for label, attrs in labels_attrs.items():
        text = attrs.get(PREDICTED_ATTR)
        if text is None:
            continue
        values = tuple(v.strip() for v in str(text).split(",") if v.strip())
        if not values:
            raise LabelConfigError(f"control {control!r}, label {label!r}: {PREDICTED_ATTR} is empty; name the "
                                   f"model classes that become this label, e.g. {PREDICTED_ATTR}=\"fire,flame\"")
        found.append((label, values))
    return tuple(found)
