"""Task score for active learning: which images the annotator should label first.

Label Studio sorts tasks by prediction score ascending and its uncertainty sampling takes the lowest scores
first, so here LOW SCORE = MOST INFORMATIVE = LABEL FIRST. Every strategy returns a float; the score is computed
from *all* detections above the low floor (``SCORE_FLOOR``), not only the boxes shown to the annotator.

Strategies (setting ``TASK_SCORE``):

``uncertainty`` (default)
    For each detection with confidence ``c`` (objectness x class probability) and the serving threshold ``t``
    (``MODEL_SCORE_THRESHOLD``, the line between "shown" and "not shown"):

    1. Decision uncertainty. Shift ``c`` in logit space so that the threshold sits at 0.5,
       ``p = sigmoid(logit(c) - logit(t))``, and take the binary entropy ``H(p)`` in bits. It is 1 for a
       detection exactly at the threshold (the model cannot decide whether to show it) and falls smoothly
       towards 0 for detections far above it (sure objects) or far below it (sure background); working in
       logits makes "far" mean the same on both sides of a low threshold such as 0.25.
    2. Class uncertainty. With the class probabilities normalised to sum to 1, ``1 - (q1 - q2)`` (one minus
       the margin between the two most likely classes: fire vs smoke), weighted by ``p`` because a class
       mix-up only matters for a box that is probably an object. 0 for one-class models.

    A detection's uncertainty is the larger of the two; the image's uncertainty is its most uncertain
    detection (one doubtful box is enough to make an image worth labelling), and the task score is
    ``1 - uncertainty`` in [0, 1].

    An image with no detection above the floor is a confident negative: uncertainty 0, score 1, so it does
    not jump the queue. (Fire/smoke data holds many negatives; ranking "nothing found" first would spend the
    annotator's time on empty frames.) An image whose detections are all sure objects also scores high.

``max_confidence``
    The highest confidence among the shown boxes (>= threshold), 0 when none: low = the model saw little.
``mean_confidence``
    The mean confidence of the shown boxes, 0 when none.
``count``
    The number of shown boxes (few boxes first).

The last three are the classic ML-backend scores, kept for compatibility; unlike ``uncertainty`` they put
images with no box first.

Numpy only: works on the detector's ``Detections`` (scores, class_probs).
"""

from __future__ import annotations

import numpy as np

from .settings import TASK_SCORE_STRATEGIES as STRATEGIES  # one list: the setting validates against it

_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _binary_entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))


def decision_probability(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """``sigmoid(logit(c) - logit(t))``: the confidence re-centred so that the threshold maps to 0.5."""
    z = _logit(np.asarray(confidence, np.float64)) - _logit(np.float64(threshold))
    return 1.0 / (1.0 + np.exp(-z))


def class_margin_uncertainty(class_probs: np.ndarray) -> np.ndarray:
    """``1 - (q1 - q2)`` per detection, with q the class probabilities normalised to sum to 1; 0 when nc < 2."""
    probs = np.asarray(class_probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2 or probs.shape[0] == 0:
        return np.zeros(probs.shape[0] if probs.ndim >= 1 else 0)
    q = probs / np.maximum(probs.sum(axis=1, keepdims=True), _EPS)
    top2 = np.sort(q, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def detection_uncertainty(scores: np.ndarray, class_probs: np.ndarray, threshold: float) -> np.ndarray:
    """Per-detection uncertainty in [0, 1] (see the module docstring)."""
    scores = np.asarray(scores, np.float64)
    if scores.size == 0:
        return np.zeros(0)
    p = decision_probability(scores, threshold)
    decision = _binary_entropy_bits(p)
    cls = class_margin_uncertainty(class_probs) * p
    return np.clip(np.maximum(decision, cls), 0.0, 1.0)


def task_score(detections, strategy: str = "uncertainty", threshold: float = 0.25, floor: float = 0.0) -> float:
    """The task's score under ``strategy`` (low = label first). ``detections`` should hold everything the
    detector found above ``floor``; detections below ``floor`` are ignored here too."""
    scores = np.asarray(detections.scores, np.float64)
    keep = scores >= floor
    scores = scores[keep]
    if strategy == "uncertainty":
        probs = np.asarray(detections.class_probs)[keep]
        if scores.size == 0:
            return 1.0
        return float(1.0 - detection_uncertainty(scores, probs, threshold).max())
    shown = scores[scores >= threshold]
    if strategy == "max_confidence":
        return float(shown.max()) if shown.size else 0.0
    if strategy == "mean_confidence":
        return float(shown.mean()) if shown.size else 0.0
    if strategy == "count":
        return float(shown.size)
    raise ValueError(f"task score strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
