"""Detection metrics (numpy only): per-class AP at IoU 0.5 and 0.5:0.95, and precision/recall at a threshold.

Matching follows COCO: per image and IoU threshold, detections in descending score order each take the
unmatched ground-truth box of the same class they overlap most, if that IoU reaches the threshold.
AP uses COCO's 101-point interpolation: the mean over recall 0, 0.01, ..., 1 of the precision envelope
(the best precision at that recall or beyond). ``method="trapz"`` gives the reference test.py's variant
(the envelope interpolated at those 101 points and integrated with the trapezoid rule), for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (n, 4) and (m, 4) xyxy boxes -> (n, m)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(2)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_image(det_boxes: np.ndarray, det_scores: np.ndarray, det_labels: np.ndarray, gt_boxes: np.ndarray,
                gt_labels: np.ndarray, iou_thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """(n_det, T) bool: whether each detection is a true positive at each IoU threshold (COCO greedy matching)."""
    n, t = len(det_scores), len(iou_thresholds)
    correct = np.zeros((n, t), dtype=bool)
    if n == 0 or len(gt_labels) == 0:
        return correct
    iou = box_iou_np(det_boxes, gt_boxes)
    iou[np.asarray(det_labels)[:, None] != np.asarray(gt_labels)[None, :]] = -1.0  # other classes never match
    order = np.argsort(-np.asarray(det_scores), kind="stable")
    # Only detections overlapping some box enough can match: skip the rest (most of them at conf 0.001).
    order = order[iou[order].max(1) >= float(np.min(iou_thresholds))]
    for k, threshold in enumerate(iou_thresholds):
        taken = np.zeros(len(gt_labels), dtype=bool)
        for d in order:
            candidates = np.where(taken, -1.0, iou[d])
            g = int(np.argmax(candidates))
            if candidates[g] >= threshold:
                taken[g] = True
                correct[d, k] = True
    return correct


def average_precision(recall: np.ndarray, precision: np.ndarray, method: str = "coco") -> float:
    """AP of one class from its cumulative recall/precision curve (detections by descending score)."""
    if len(recall) == 0:
        return 0.0
    points = np.linspace(0, 1, 101)
    if method == "coco":
        envelope = np.maximum.accumulate(np.asarray(precision, np.float64)[::-1])[::-1]
        index = np.searchsorted(recall, points, side="left")
        values = np.where(index < len(recall), envelope[np.minimum(index, len(recall) - 1)], 0.0)
        return float(values.mean())
    if method == "trapz":
        mrec = np.concatenate(([0.0], recall, [recall[-1] + 0.01]))
        mpre = np.concatenate(([1.0], precision, [0.0]))
        mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
        curve = np.interp(points, mrec, mpre)
        return float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(points)))
    raise ValueError(f"unknown AP method {method!r}; use 'coco' or 'trapz'")


@dataclass
class ClassMetrics:
    name: str
    instances: int
    ap50: float
    ap: float          # mean over IoU 0.5:0.95
    precision: float   # at the serving threshold, IoU 0.5
    recall: float


@dataclass
class DetectionMetrics:
    """Accumulates detections and ground truth image by image; ``compute()`` gives the summary."""

    names: Sequence[str]
    serve_conf: float = 0.25
    method: str = "coco"
    images: int = 0
    _correct: List[np.ndarray] = field(default_factory=list)
    _scores: List[np.ndarray] = field(default_factory=list)
    _labels: List[np.ndarray] = field(default_factory=list)
    _gt_labels: List[np.ndarray] = field(default_factory=list)

    def add(self, det_boxes, det_scores, det_labels, gt_boxes, gt_labels) -> None:
        det_scores = np.asarray(det_scores, np.float64).reshape(-1)
        det_labels = np.asarray(det_labels, np.int64).reshape(-1)
        gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
        self._correct.append(match_image(np.asarray(det_boxes).reshape(-1, 4), det_scores, det_labels,
                                         np.asarray(gt_boxes).reshape(-1, 4), gt_labels))
        self._scores.append(det_scores)
        self._labels.append(det_labels)
        self._gt_labels.append(gt_labels)
        self.images += 1

    def subset(self, indices: Union[Sequence[int], np.ndarray]) -> "DetectionMetrics":
        """The accumulator of these images only (repeats allowed: a bootstrap resample)."""
        part = DetectionMetrics(self.names, self.serve_conf, self.method)
        for k in indices:
            part._correct.append(self._correct[k])
            part._scores.append(self._scores[k])
            part._labels.append(self._labels[k])
            part._gt_labels.append(self._gt_labels[k])
        part.images = len(part._correct)
        return part

    def compute(self) -> Dict:
        """{"map50", "map", "precision", "recall", "images", "instances", "per_class": [ClassMetrics as dict]}.

        Means run over the classes that have ground truth (a class absent from the set has no AP).
        """
        t = len(IOU_THRESHOLDS)
        correct = np.concatenate(self._correct, 0) if self._correct else np.zeros((0, t), bool)
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
        gt = np.concatenate(self._gt_labels) if self._gt_labels else np.zeros(0, np.int64)
        order = np.argsort(-scores, kind="stable")
        correct, scores, labels = correct[order], scores[order], labels[order]
        per_class: List[ClassMetrics] = []
        for c, name in enumerate(self.names):
            n_gt = int((gt == c).sum())
            mask = labels == c
            hits = correct[mask]
            if n_gt == 0:
                per_class.append(ClassMetrics(name, 0, float("nan"), float("nan"), float("nan"), float("nan")))
                continue
            tp = np.cumsum(hits, 0)
            fp = np.cumsum(~hits, 0)
            recall = tp / n_gt
            precision = tp / np.maximum(tp + fp, 1)
            aps = [average_precision(recall[:, k], precision[:, k], self.method) for k in range(t)]
            served = scores[mask] >= self.serve_conf
            n_served = int(served.sum())
            tp_served = int(hits[served, 0].sum())
            per_class.append(ClassMetrics(name, n_gt, aps[0], float(np.mean(aps)),
                                          tp_served / n_served if n_served else 0.0, tp_served / n_gt))
        present = [m for m in per_class if m.instances > 0]

        def mean(attr: str) -> float:
            return float(np.mean([getattr(m, attr) for m in present])) if present else 0.0

        return {"map50": mean("ap50"), "map": mean("ap"), "precision": mean("precision"), "recall": mean("recall"),
                "images": self.images, "instances": int(len(gt)), "serve_conf": self.serve_conf,
                "per_class": [vars(m) for m in per_class]}


def format_table(metrics: Dict) -> str:
    """The per-class table as text (what ``python -m yolo_backend val`` prints)."""
    head = f"{'class':<16}{'images':>8}{'instances':>11}{'P@' + format(metrics.get('serve_conf', 0.25), 'g'):>9}" \
           f"{'R':>8}{'mAP@.5':>9}{'mAP@.5:.95':>12}"
    rows = [head, f"{'all':<16}{metrics['images']:>8}{metrics['instances']:>11}{metrics['precision']:>9.3f}"
                  f"{metrics['recall']:>8.3f}{metrics['map50']:>9.3f}{metrics['map']:>12.3f}"]
    for m in metrics["per_class"]:
        if m["instances"] == 0:
            rows.append(f"{m['name']:<16}{'':>8}{0:>11}{'-':>9}{'-':>8}{'-':>9}{'-':>12}")
        else:
            rows.append(f"{m['name']:<16}{'':>8}{m['instances']:>11}{m['precision']:>9.3f}{m['recall']:>8.3f}"
                        f"{m['ap50']:>9.3f}{m['ap']:>12.3f}")
    return "\n".join(rows)


def fitness(metrics: Optional[Dict]) -> float:
    """One number to pick the best epoch and the model to publish by (the reference weights: 0.1 mAP@.5 +
    0.9 mAP@.5:.95). A missing mAP counts 0 (metrics stored by an older version may lack one)."""
    if not metrics:
        return 0.0
    return 0.1 * float(metrics.get("map50", 0.0)) + 0.9 * float(metrics.get("map", 0.0))


def paired_fitness_se(new: DetectionMetrics, old: DetectionMetrics, resamples: int = 200, seed: int = 0) -> float:
    """Standard error of fitness(new) - fitness(old) on the same images, by a paired bootstrap over images (both
    accumulators resampled with the same image indices). How far apart two models may score on a small
    validation set by chance alone."""
    if new.images != old.images:
        raise ValueError(f"paired comparison needs the same images: {new.images} against {old.images}")
    if new.images < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(resamples):
        pick = rng.integers(0, new.images, new.images)
        differences.append(fitness(new.subset(pick).compute()) - fitness(old.subset(pick).compute()))
    return float(np.std(differences, ddof=1))
