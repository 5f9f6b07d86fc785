"""What the model saved the annotators, from their real annotations (Label Studio task JSON; no torch).

For each annotated task, the annotation training uses (``annotations.latest_annotation``) is compared with the
prediction the annotator started from:

- the annotation's ``parent_prediction`` (Label Studio 1.23 stores the id of the prediction an annotation was
  created from, and returns it in the task export and the task API), when that prediction is still on the task;
- else the prediction that served the task when the annotation was created: the newest one of the task's
  ``predictions`` whose ``created_at`` is not after the annotation's ``created_at``;
- else none: the task counts under the version ``None`` ("no prediction": drawn from scratch, or the prediction
  it started from is gone).

The rule (``match_boxes``): boxes of the same label (case-insensitive) are paired greedily by IoU, highest first;
a pair with IoU >= ACCEPT_IOU is a box accepted as is, one with IoU >= ADJUST_IOU an adjusted box; a predicted box
left unpaired was deleted, a final box left unpaired was drawn. A label change is therefore a deletion and a
drawing. A final region whose ``origin`` the editor set to "manual" was drawn by hand, so it pairs with nothing
(the annotator deleted a predicted box and drew one in its place). Rotated rectangles are compared by their
axis-aligned bounds, the same rule training uses (``regions.region_box``); IoU in image fractions equals IoU in
pixels, so no image is read. An image the model left empty and the annotator left empty is a task done with no
box drawn (it counts, with ``empty_agreed``).

Label Studio 1.23's JSON export lists a task's predictions by id only; ``with_predictions`` puts the full ones
(``GET /api/predictions?project=<id>``) in their place. Pool scoring deletes a task's older predictions (unless
KEEP_OLD_PREDICTIONS), and Label Studio then clears ``parent_prediction``: ``remembered_or_new`` keeps what an
earlier run measured for the same annotation while its prediction was there (the job stores those records).

Per model version (``version_effort``): tasks, boxes accepted / adjusted / deleted / drawn, the share of final
boxes that came from the model (accepted or adjusted), and Label Studio's ``lead_time`` (seconds the annotator
spent on the task): its median per task and the total per final box.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, astuple, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Iterable, Optional, Sequence, Union

from .annotations import latest_annotation
from .regions import RegionBox, is_box_region, region_box

ACCEPT_IOU = 0.9   # a final box this close to its predicted box was accepted as is
ADJUST_IOU = 0.5   # below this a final box is not the predicted box moved, but another box
MANUAL_ORIGIN = "manual"
BoxControls = Union[str, Sequence[str], None]  # the RectangleLabels control(s) whose boxes count; None: any


@dataclass(frozen=True)
class BoxMatch:
    """What became of one task's predicted boxes."""

    accepted: int = 0
    adjusted: int = 0
    deleted: int = 0
    drawn: int = 0

    @property
    def final_boxes(self) -> int:
        return self.accepted + self.adjusted + self.drawn

    def __add__(self, other: "BoxMatch") -> "BoxMatch":
        """The two tallies summed (over tasks of a version, or images of a batch)."""
        return BoxMatch(*(a + b for a, b in zip(astuple(self), astuple(other))))


def iou(a: RegionBox, b: RegionBox) -> float:
    """Intersection over union of two axis-aligned boxes."""
    w = min(a.x2, b.x2) - max(a.x1, b.x1)
    h = min(a.y2, b.y2) - max(a.y1, b.y1)
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(predicted: Sequence[RegionBox], final: Sequence[RegionBox],
                manual: Sequence[bool] = ()) -> BoxMatch:
    """Pair ``final`` boxes with ``predicted`` ones (the module doc's rule); ``manual[i]`` true: final box i was
    drawn by hand (its region's origin), so it pairs with nothing."""
    pairs = sorted(((iou(p, f), i, j) for i, p in enumerate(predicted) for j, f in enumerate(final)
                    if not (j < len(manual) and manual[j]) and p.label.lower() == f.label.lower()),
                   key=lambda pair: (-pair[0], pair[1], pair[2]))
    used_p, used_f = set(), set()
    accepted = adjusted = 0
    for overlap, i, j in pairs:
        if overlap < ADJUST_IOU:
            break
        if i in used_p or j in used_f:
            continue
        used_p.add(i)
        used_f.add(j)
        if overlap >= ACCEPT_IOU:
            accepted += 1
        else:
            adjusted += 1
    return BoxMatch(accepted, adjusted, len(predicted) - len(used_p), len(final) - len(used_f))


@dataclass(frozen=True)
class TaskEffort:
    """One annotated task against the prediction it started from."""

    task_id: Any
    version: Optional[str]         # the model version of that prediction; None: no prediction known
    match: BoxMatch
    lead_time: Optional[float]     # seconds, Label Studio's lead_time of the annotation
    via_parent: bool = False       # the prediction was named by parent_prediction (else: by time, or none)
    annotation_id: Any = None

    def record(self) -> dict:
        return {"task": self.task_id, "annotation": self.annotation_id, "version": self.version,
                "match": asdict(self.match), "lead_time": self.lead_time, "via_parent": self.via_parent}

    @classmethod
    def from_record(cls, data: Any) -> Optional["TaskEffort"]:
        """Read back from ``record()``'s form; None when it is not one."""
        try:
            match = BoxMatch(*(int(data["match"][k]) for k in ("accepted", "adjusted", "deleted", "drawn")))
            lead = data.get("lead_time")
            version = data.get("version")
            return cls(data.get("task"), None if version is None else str(version), match,
                       float(lead) if isinstance(lead, (int, float)) else None, bool(data.get("via_parent")),
                       data.get("annotation"))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def remembered_or_new(found: Iterable[TaskEffort], remembered: dict[Any, TaskEffort]) -> list[TaskEffort]:
    """``found``, where a task's prediction is no longer known (None; pool scoring deletes a task's older
    predictions, and Label Studio then clears ``parent_prediction``) the record of the same annotation measured by
    an earlier run, while its prediction was still there."""
    return [remembered.get(e.annotation_id, e) if e.version is None and e.annotation_id is not None else e
            for e in found]


def _time(value: Any) -> Optional[datetime]:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(timezone.utc).replace(tzinfo=None) if parsed.tzinfo else parsed


def started_from(task: dict, annotation: dict) -> tuple[Optional[dict], bool]:
    """(the prediction the annotation started from, or None; whether parent_prediction named it)."""
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    parent = annotation.get("parent_prediction")
    if isinstance(parent, dict):  # some API forms nest the prediction instead of giving its id
        parent = parent.get("id")
    if parent is not None:
        for prediction in predictions:
            if prediction.get("id") == parent:
                return prediction, True
    created = _time(annotation.get("created_at"))
    if created is None:
        return None, False
    before = [(when, p) for p in predictions if (when := _time(p.get("created_at"))) is not None and when <= created]
    return (max(before, key=lambda item: item[0])[1], False) if before else (None, False)


def needs_predictions(tasks: Iterable[dict]) -> bool:
    """Whether some task lists its predictions by id (the 1.23 export does), not in full."""
    return any(not isinstance(p, dict) for t in tasks if isinstance(t, dict) for p in t.get("predictions") or [])


def with_predictions(tasks: Iterable[dict], predictions: Iterable[dict]) -> list[dict]:
    """``tasks``, each one that listed prediction ids given its full predictions (those of ``predictions`` whose
    ``task`` is its id) instead; the tasks themselves are not changed."""
    by_task: dict[Any, list[dict]] = {}
    for prediction in predictions:
        if isinstance(prediction, dict):
            by_task.setdefault(prediction.get("task"), []).append(prediction)
    return [{**t, "predictions": by_task.get(t.get("id"), [])}
            if isinstance(t, dict) and any(not isinstance(p, dict) for p in t.get("predictions") or []) else t
            for t in tasks]


def _boxes(regions: Optional[Iterable], from_name: BoxControls) -> tuple[list[RegionBox], list[bool]]:
    """The usable rectangles of ``regions`` and, for each, whether its origin says it was drawn by hand."""
    boxes, manual = [], []
    for region in regions or []:
        if not is_box_region(region, from_name):
            continue
        box = region_box(region)
        if isinstance(box, RegionBox):
            boxes.append(box)
            manual.append(region.get("origin") == MANUAL_ORIGIN)
    return boxes, manual


def task_effort(task: dict, from_name: BoxControls = None) -> Optional[TaskEffort]:
    """The task's effort, None when it has no annotation training would use (only cancelled ones)."""
    annotation = latest_annotation(task)
    if annotation is None:
        return None
    prediction, via_parent = started_from(task, annotation)
    final, manual = _boxes(annotation.get("result"), from_name)
    predicted, _ = _boxes((prediction or {}).get("result"), from_name)
    lead = annotation.get("lead_time")
    lead = float(lead) if isinstance(lead, (int, float)) and not isinstance(lead, bool) and lead >= 0 else None
    version = None if prediction is None else str(prediction.get("model_version") or "")
    return TaskEffort(task.get("id"), version, match_boxes(predicted, final, manual), lead, via_parent,
                      annotation.get("id"))


@dataclass(frozen=True)
class EffortSummary:
    """One version's numbers as the run history keeps them (``asdict``) and the server reads them back."""

    version: Optional[str]           # None: tasks annotated without a known prediction
    tasks: int = 0
    accepted: int = 0
    adjusted: int = 0
    deleted: int = 0
    drawn: int = 0
    final_boxes: int = 0             # accepted + adjusted + drawn
    empty_agreed: int = 0            # tasks the model and the annotator both left without a box
    via_parent: int = 0              # tasks whose prediction parent_prediction named (the rest: by time)
    timed_tasks: int = 0             # tasks with a lead_time
    median_seconds: Optional[float] = None   # median lead_time per task
    seconds_per_box: Optional[float] = None  # lead_time of the timed tasks / their final boxes
    model_share: Optional[float] = None      # (accepted + adjusted) / final_boxes

    @classmethod
    def from_dict(cls, data: dict) -> "EffortSummary":
        """Read back from a history line (unknown keys ignored, wrong types replaced by the defaults)."""
        known: dict[str, Any] = {}
        for name, default in ((f.name, f.default) for f in fields(cls)):
            value = data.get(name, default)
            if name == "version":
                known[name] = None if value is None else str(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                known[name] = value
        return cls(**known)


@dataclass
class VersionEffort:
    """Adds up the tasks annotated from one version's predictions."""

    version: Optional[str]
    match: BoxMatch = BoxMatch()
    tasks: int = 0
    empty_agreed: int = 0
    via_parent: int = 0
    timed_boxes: int = 0
    lead_times: list[float] = field(default_factory=list)

    def add(self, task: TaskEffort) -> None:
        m = task.match
        self.tasks += 1
        self.match = self.match + m
        self.empty_agreed += int(m == BoxMatch())
        self.via_parent += int(task.via_parent)
        if task.lead_time is not None:
            self.lead_times.append(task.lead_time)
            self.timed_boxes += m.final_boxes

    def summary(self) -> EffortSummary:
        m, lead = self.match, self.lead_times
        return EffortSummary(
            self.version, self.tasks, m.accepted, m.adjusted, m.deleted, m.drawn, m.final_boxes, self.empty_agreed,
            self.via_parent, len(lead), round(statistics.median(lead), 2) if lead else None,
            round(sum(lead) / self.timed_boxes, 2) if self.timed_boxes else None,
            round((m.accepted + m.adjusted) / m.final_boxes, 4) if m.final_boxes else None)


def task_efforts(tasks: Iterable[dict], from_name: BoxControls = None) -> list[TaskEffort]:
    """Each task's effort (tasks with only cancelled annotations left out)."""
    found = (task_effort(task, from_name) for task in tasks if isinstance(task, dict))
    return [effort for effort in found if effort is not None]


def summarise(efforts: Iterable[TaskEffort]) -> list[EffortSummary]:
    """The efforts by the version they started from, in order of first appearance (None: no prediction)."""
    by_version: dict[Optional[str], VersionEffort] = {}
    for effort in efforts:
        by_version.setdefault(effort.version, VersionEffort(effort.version)).add(effort)
    return [v.summary() for v in by_version.values()]


def version_effort(tasks: Iterable[dict], from_name: BoxControls = None) -> list[EffortSummary]:
    """The tasks' effort by the version they started from (``summarise`` of ``task_efforts``)."""
    return summarise(task_efforts(tasks, from_name))
