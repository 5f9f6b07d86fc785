"""Label config -> what to predict: the RectangleLabels control, its Image, and which label each class becomes.

``parse_label_config`` gives the classic ``parsed_label_config`` shape (label-studio-sdk's parser):
    {from_name: {"type": "RectangleLabels", "to_name": ["image"],
                 "inputs": [{"type": "Image", "value": "image"}], "labels": ["fire", "smoke"], ...}}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

IMAGE_OBJECTS = ("Image",)
VIDEO_OBJECTS = ("Video",)


# A label config is typed by a person: far below these. Bigger ones are refused before they are parsed or kept
# (anyone who can reach /setup sends one), and each label becomes a class of the model.
MAX_LABEL_CONFIG_BYTES = 512 * 1024
MAX_LABELS = 1000


class LabelConfigError(ValueError):
    """The label config cannot be used for box predictions; the message says what to change."""


@dataclass(frozen=True)
class RectangleTarget:
    """Where predicted boxes go: ``from_name`` (the RectangleLabels control), ``to_name`` (its Image),
    ``data_key`` (the task data field holding the image URL, ``$image`` -> ``image``) and the config's labels."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]


def parse_label_config(label_config: Optional[str]) -> dict:
    """The classic parsed label config (empty dict for an empty config); malformed XML -> LabelConfigError.

    One entry per control tag (a tag with ``toName``), as label-studio-ml's ``parsed_label_config`` has it:
    ``{name: {"type", "to_name": [...], "inputs": [{"type", "valueType", "value"}], "labels": [...],
    "labels_attrs": {label: attributes}}}``, read through label-studio-sdk's public ``LabelInterface``, plus
    ``"attrs"``: the control tag's own attributes (``model_score_threshold``, ``model_skip``: ``controls.py``).
    """
    if not label_config or not label_config.strip():
        return {}
    check_label_config_size(label_config)
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(label_config)
    except Exception as exc:  # XML syntax errors, tags without value=...
        raise LabelConfigError(f"the label config is not valid XML / Label Studio config: {exc}") from None
    parsed = {}
    for control in interface.controls:
        parsed[control.name] = {
            "type": control.tag,
            "to_name": list(control.to_name or []),
            "inputs": [_input(obj) for obj in control.objects],
            "labels": list(control.labels or []),
            "labels_attrs": {label: dict(tag.attr) for label, tag in (control.labels_attrs or {}).items()},
            "attrs": dict(control.attr or {}),
        }
    labels = sum(len(info["labels"]) for info in parsed.values())
    if labels > MAX_LABELS:
        raise LabelConfigError(f"the label config has {labels} labels; at most {MAX_LABELS} are supported (each "
                               "label is a class of the model)")
    return parsed


def _input(obj: Any) -> dict[str, Any]:
    """One object tag a control is on; a Video also gets its ``frameRate`` text (None: not set), read
    case-insensitively as Label Studio reads attributes (its template writes ``framerate``)."""
    entry = {"type": obj.tag, "valueType": obj.attr.get("valueType"), "value": str(obj.value or "").lstrip("$")}
    if obj.tag in VIDEO_OBJECTS:
        entry["frameRate"] = next((v for k, v in dict(obj.attr).items() if k.lower() == "framerate"), None)
    return entry


def check_label_config_size(label_config: str) -> None:
    """LabelConfigError for a config too large to be a person's, or one with a DOCTYPE (Label Studio configs have
    none; entities are how XML documents grow on parsing)."""
    size = len(label_config.encode("utf-8", "replace"))
    if size > MAX_LABEL_CONFIG_BYTES:
        raise LabelConfigError(f"the label config is {size} bytes; at most {MAX_LABEL_CONFIG_BYTES} are accepted")
    head = label_config[:4096].upper()
    if "<!DOCTYPE" in head or "<!ENTITY" in label_config.upper():
        raise LabelConfigError("the label config has a DOCTYPE or ENTITY declaration; Label Studio configs have "
                               "none: remove it")


# How a true model_skip="..." is written (controls.py reads the attribute and refuses other words).
TRUE_WORDS = ("true", "yes", "1")


def is_skipped(info: Mapping[str, Any]) -> bool:
    """Whether a parsed control has ``model_skip="true"`` (it gets no predictions)."""
    return str((info.get("attrs") or {}).get("model_skip", "")).strip().lower() in TRUE_WORDS


def parse_label_map(text: Optional[str]) -> dict[str, str]:
    """LABEL_MAP text -> {class name: config label}: ``fire=Fire,smoke=Smoke`` or a JSON object."""
    if not text or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LabelConfigError(f"LABEL_MAP is not valid JSON ({exc}); use {{\"fire\": \"Fire\"}} "
                                   "or fire=Fire,smoke=Smoke") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise LabelConfigError("LABEL_MAP JSON must map class names to label names (strings)")
        return dict(value)
    mapping = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise LabelConfigError(f"LABEL_MAP entry {part.strip()!r} has no '='; use class=Label pairs "
                                   "separated by commas, e.g. fire=Fire,smoke=Smoke")
        cls, label = (s.strip() for s in part.split("=", 1))
        if not cls or not label:
            raise LabelConfigError(f"LABEL_MAP entry {part.strip()!r} has an empty side; use class=Label")
        mapping[cls] = label
    return mapping


@dataclass(frozen=True)
class LabelMapping:
    """Which config label each checkpoint class becomes; classes with no label are not predicted."""

    labels: tuple[Optional[str], ...]  # index = class id
    unlearned_labels: tuple[str, ...] = ()  # config labels no class maps to: never predicted by this model

    @property
    def skipped_classes(self) -> list[int]:
        return [i for i, label in enumerate(self.labels) if label is None]

    def label_of(self, class_id: int) -> Optional[str]:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else None


def map_classes_to_labels(class_names: Sequence[str], config_labels: Sequence[str],
                          label_map: Optional[Mapping[str, str]] = None,
                          predicted: Optional[Mapping[str, Sequence[str]]] = None,
                          check_leftovers: bool = True, trained_on_labels: bool = False) -> LabelMapping:
    """Map checkpoint classes to config labels: a label's ``predicted_values`` (``predicted``: label -> class
    names) first, then the explicit ``label_map``, then a case-insensitive match.

    Classes that match no label are skipped, and labels no class matches are ``unlearned_labels`` (both logged
    by the caller): a label added to the config for a class the model has not learned yet is normal in active
    learning (training adds it). When both sides have leftovers, a label was almost always misspelt or renamed
    ("Flame" vs class "fire"), so that is a LabelConfigError saying which label and what to change
    (``check_leftovers=False``: the caller checks that over several controls, ``check_unmatched``).
    ``trained_on_labels``: the model's classes are the config's labels (trained by this backend on it): then
    ``predicted`` named the classes of the checkpoint the project started from, and values it lacks are ignored.
    """
    label_map = dict(label_map or {})
    classes_text = ", ".join(class_names) or "none"
    labels_by_lower: dict[str, str] = {}
    for label in config_labels:
        labels_by_lower.setdefault(label.lower(), label)
    for cls, label in label_map.items():
        if cls not in class_names and cls.lower() not in {c.lower() for c in class_names}:
            raise LabelConfigError(f"LABEL_MAP names class {cls!r}, which the checkpoint does not have "
                                   f"(classes: {classes_text})")
        if label not in config_labels:
            raise LabelConfigError(f"LABEL_MAP maps {cls!r} to {label!r}, which is not a label of the config "
                                   f"(labels: {', '.join(config_labels) or 'none'})")
    by_predicted = _predicted_classes(class_names, predicted or {}, trained_on_labels)
    map_lower = {k.lower(): v for k, v in label_map.items()}
    mapped: list[Optional[str]] = []
    for name in class_names:
        mapped.append(by_predicted.get(name.lower()) or label_map.get(name) or map_lower.get(name.lower())
                      or labels_by_lower.get(name.lower()))
    mapping = LabelMapping(tuple(mapped), tuple(label for label in config_labels if label not in mapped))
    if check_leftovers:
        check_unmatched(class_names, [mapping])
    return mapping


def _predicted_classes(class_names: Sequence[str], predicted: Mapping[str, Sequence[str]],
                       trained_on_labels: bool = False) -> dict[str, str]:
    """{class name (lower case): label} from the labels' ``predicted_values``; a value that is no class of the model
    is an error (unless ``trained_on_labels``: see ``map_classes_to_labels``)."""
    known = {c.lower() for c in class_names}
    found: dict[str, str] = {}
    for label, values in predicted.items():
        missing = [v for v in values if v.lower() not in known]
        if missing and not trained_on_labels:
            raise LabelConfigError(
                f"label {label!r} has predicted_values naming {', '.join(map(repr, missing))}, which the model does "
                f"not have (classes: {', '.join(class_names) or 'none'}); fix predicted_values to name its classes")
        for value in values:
            found.setdefault(value.lower(), label)
    return found


def check_unmatched(class_names: Sequence[str], mappings: Sequence[LabelMapping]) -> None:
    """The misspelt-label check of ``map_classes_to_labels`` over several controls: a label no class maps to, while
    some class has a label in none of them."""
    unused = [label for m in mappings for label in m.unlearned_labels]
    unmatched = [name for i, name in enumerate(class_names) if all(m.label_of(i) is None for m in mappings)]
    if unused and (unmatched or not class_names):
        label = unused[0]
        classes_text = ", ".join(class_names) or "none"
        raise LabelConfigError(
            f"label {label!r} in the config has no class in the checkpoint (classes: {classes_text}) while class "
            f"{unmatched[0] if unmatched else '-'!r} has no label; rename the label or set LABEL_MAP (e.g. "
            f"LABEL_MAP={unmatched[0] if unmatched else 'cls'}={label})"
            + (f"; also without a class: {', '.join(map(repr, unused[1:]))}" if unused[1:] else ""))
