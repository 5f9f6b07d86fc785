"""What the simulated annotator does with the served model's pre-annotations, and what it costs in time.

For each image a strategy picks, the boxes the server would show (the serving model's detections at or above
MODEL_SCORE_THRESHOLD, the same model that scored the pool for that pick) are compared with the pool's ground-truth
boxes by the rule that measures real annotations (``labelstudio.effort.match_boxes``: same label, IoU >= 0.9
accepted, 0.5-0.9 adjusted, a predicted box left over deleted, a ground-truth box left over drawn). Without
pre-annotations every ground-truth box is drawn.

``CostModel`` (``yolo_backend.annotation_cost``, where its defaults' sources are) turns those counts into
estimated annotator seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ..labelstudio.effort import BoxMatch, match_boxes
from ..labelstudio.regions import RegionBox
from ..yolov7.detections import Detections

EFFORT_FIELDS = ("boxes_accepted", "boxes_adjusted", "boxes_deleted", "boxes_drawn", "truth_boxes")


@dataclass(frozen=True)
class RoundEffort:
    """What labelling one round's picked images took: counts of box actions over the batch."""

    images: int = 0
    accepted: int = 0
    adjusted: int = 0
    deleted: int = 0
    drawn: int = 0
    truth_boxes: int = 0   # ground-truth boxes in the batch (what the annotator ends with)

    @property
    def worked(self) -> int:
        """Boxes drawn or fixed (adjusted or deleted): the boxes the annotator had to touch."""
        return self.drawn + self.adjusted + self.deleted

    def row(self) -> dict:
        """The curve row's fields (``EFFORT_FIELDS``)."""
        return dict(zip(EFFORT_FIELDS, (self.accepted, self.adjusted, self.deleted, self.drawn, self.truth_boxes)))

    @classmethod
    def from_row(cls, row: dict) -> Optional["RoundEffort"]:
        """Read back from a curve row (``images`` from ``new_labels``); None for a row written before effort
        was counted."""
        try:
            values = [int(row[k]) for k in EFFORT_FIELDS]
            images = int(row["new_labels"])
        except (KeyError, TypeError, ValueError):
            return None
        return cls(images, *values)


def predicted_boxes(detections: Detections, threshold: float) -> list[RegionBox]:
    """The boxes the server shows: detections at or above ``threshold``, in fractions of the image."""
    w, h = max(detections.width, 1), max(detections.height, 1)
    return [RegionBox(str(detections.names[int(label)]), float(box[0]) / w, float(box[1]) / h,
                      float(box[2]) / w, float(box[3]) / h)
            for box, score, label in zip(detections.boxes, detections.scores, detections.labels)
            if float(score) >= threshold]


def truth_boxes(boxes: np.ndarray, classes: np.ndarray, names: Sequence[str], width: int,
                height: int) -> list[RegionBox]:
    """Ground-truth boxes (xyxy pixels, class ids into ``names``) in fractions of a ``width`` x ``height`` image."""
    w, h = max(width, 1), max(height, 1)
    return [RegionBox(str(names[int(c)]), float(b[0]) / w, float(b[1]) / h, float(b[2]) / w, float(b[3]) / h)
            for b, c in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(classes).reshape(-1))]


def batch_effort(predicted: Sequence[Sequence[RegionBox]], truth: Sequence[Sequence[RegionBox]]) -> RoundEffort:
    """Sum of ``match_boxes`` over a batch of images (``predicted[i]`` shown on the image with ``truth[i]``)."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} images")
    total = BoxMatch()
    for shown, final in zip(predicted, truth):
        total = total + match_boxes(shown, final)
    return RoundEffort(len(truth), total.accepted, total.adjusted, total.deleted, total.drawn,
                       sum(len(boxes) for boxes in truth))


def effort_at_thresholds(detections: Sequence[Detections], truth: Sequence[Sequence[RegionBox]],
                         thresholds: Iterable[float]) -> dict[float, RoundEffort]:
    """``batch_effort`` of the same images (``detections[i]`` on the image with ``truth[i]``) as if the boxes at or
    above each threshold were shown: which MODEL_SCORE_THRESHOLD costs the annotator least."""
    return {t: batch_effort([predicted_boxes(d, t) for d in detections], truth) for t in thresholds}


def scratch_effort(truth_counts: Sequence[int]) -> RoundEffort:
    """A batch labelled with no pre-annotations: every ground-truth box drawn."""
    boxes = int(sum(truth_counts))
    return RoundEffort(len(truth_counts), 0, 0, 0, boxes, boxes)
