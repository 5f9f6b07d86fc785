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

``uncertainty_per_second``
    ``uncertainty``'s information per second of the annotator's expected work. The model's own guess of what
    the image will cost (``annotation_cost.CostModel.expected_seconds``: the time per image, plus, for each
    detection of confidence ``c``, adjusting it with probability ``c`` or deleting it if shown, drawing it with
    probability ``c`` if not) divides the image's uncertainty, scaled by the time per image so that the value
    stays in [0, 1]: ``score = 1 - uncertainty x image_s / expected_seconds``. Of two equally doubtful images the
    one with less to draw and fix comes first: a busy scene with eight boxes costs an annotator as much as four
    sparse ones, and under domain shift the plain ``uncertainty`` picks busy scenes (docs/active-learning.md,
    "Annotation effort"). Objects the model missed entirely cannot be priced; empty images still score 1.

``max_confidence``
    The highest confidence among the shown boxes (>= threshold), 0 when none: low = the model saw little.
``mean_confidence``
    The mean confidence of the shown boxes, 0 when none.
``count``
    The number of shown boxes (few boxes first).

The last three are the classic ML-backend scores, kept for compatibility; unlike ``uncertainty`` they put
images with no box first.

``margin_sum``, ``margin_mean``, ``entropy_sum``, ``entropy_mean`` (Brust et al. 2019 style aggregations)
    Each detection gets a distribution over "fire, smoke, ..., background": the class scores
    ``objectness x class probability`` and ``1 - objectness`` for background, normalised. Its uncertainty is
    either the margin ``1 - (q1 - q2)`` between the two most likely outcomes or the entropy (normalised to
    [0, 1]). The image's uncertainty is the sum (many doubtful boxes = more to learn) or the mean over its
    detections; the score is ``1 / (1 + sum)`` or ``1 - mean``, 1 for an image with no detection.
``objectness``
    The sum over detections of the binary entropy of the objectness alone ("is there an object here?",
    ignoring the class), scored ``1 / (1 + sum)``.

Batch selection (the simulator's, not a per-task score): ``select_lowest`` is Label Studio's order (lowest score
first; with cluster ids, the least-solved cluster first: ``clusters.next_task_order``), ``select_random``, and
``select_k_center`` / ``select_diverse_lowest``, a k-center greedy pick on image embeddings (pooled neck features,
see ``yolo_backend.simulate``) that keeps a batch from being spent on near-duplicates.

Numpy only: works on the detector's ``Detections`` (scores, class_probs).
"""

from __future__ import annotations

import numpy as np

from typing import Optional, Sequence

from .annotation_cost import CostModel
from .clusters import Scores, serve_sequence
from .settings import TASK_SCORE_STRATEGIES as STRATEGIES  # one list: the setting validates against it

_EPS = 1e-6
_COST = CostModel()  # the simulator's default annotator seconds: one cost model for both


def _logit(p: np.ndarray | np.float64) -> np.ndarray:
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


def outcome_distribution(class_scores: np.ndarray, objectness: np.ndarray) -> np.ndarray:
    """(n, nc + 1) per detection: its class scores (objectness x class probability, one column per class) and
    background ``1 - objectness``, normalised to sum to 1."""
    background = 1.0 - np.clip(np.asarray(objectness, np.float64).reshape(-1), 0.0, 1.0)
    scores = np.clip(np.asarray(class_scores, np.float64), 0.0, 1.0).reshape(background.size, -1)
    full = np.concatenate([scores, background[:, None]], axis=1)
    return full / np.maximum(full.sum(axis=1, keepdims=True), _EPS)


def per_box_uncertainty(objectness: np.ndarray, class_probs: np.ndarray, kind: str) -> np.ndarray:
    """Per detection, in [0, 1]: ``margin`` (1 - (q1 - q2)) or normalised ``entropy`` of the distribution over
    classes and background (``outcome_distribution``)."""
    objectness = np.asarray(objectness, np.float64).reshape(-1)
    if objectness.size == 0:
        return np.zeros(0)
    probs = np.asarray(class_probs, np.float64).reshape(objectness.size, -1)
    q = outcome_distribution(probs * objectness[:, None], objectness)
    if kind == "margin":
        top2 = np.sort(q, axis=1)[:, -2:]
        return 1.0 - (top2[:, 1] - top2[:, 0])
    if kind == "entropy":
        clipped = np.clip(q, _EPS, 1.0)
        return -(q * np.log(clipped)).sum(axis=1) / np.log(q.shape[1])
    raise ValueError(f"per-box uncertainty {kind!r}: use margin or entropy")


def aggregate_score(uncertainties: np.ndarray, how: str) -> float:
    """Image score from per-box uncertainties: ``sum`` -> 1 / (1 + sum), ``mean`` -> 1 - mean; 1 when empty."""
    u = np.asarray(uncertainties, np.float64)
    if u.size == 0:
        return 1.0
    if how == "sum":
        return float(1.0 / (1.0 + u.sum()))
    if how == "mean":
        return float(1.0 - u.mean())
    raise ValueError(f"aggregation {how!r}: use sum or mean")


def objectness_score(objectness: np.ndarray) -> float:
    """``1 / (1 + sum of the binary entropy (bits) of each detection's objectness)``; 1 when empty."""
    obj = np.asarray(objectness, np.float64).reshape(-1)
    return aggregate_score(_binary_entropy_bits(obj) if obj.size else obj, "sum")


_AGGREGATES = {"margin_sum": ("margin", "sum"), "margin_mean": ("margin", "mean"),
               "entropy_sum": ("entropy", "sum"), "entropy_mean": ("entropy", "mean")}


def task_score(detections, strategy: str = "uncertainty", threshold: float = 0.25, floor: float = 0.0) -> float:
    """The task's score under ``strategy`` (low = label first). ``detections`` should hold everything the
    detector found above ``floor``; detections below ``floor`` are ignored here too."""
    scores = np.asarray(detections.scores, np.float64)
    keep = scores >= floor
    scores = scores[keep]
    if strategy in ("uncertainty", "uncertainty_per_second"):
        if scores.size == 0:
            return 1.0
        uncertainty = detection_uncertainty(scores, np.asarray(detections.class_probs)[keep], threshold).max()
        if strategy == "uncertainty_per_second":
            uncertainty *= _COST.image_s / _COST.expected_seconds(scores, threshold)
        return float(1.0 - uncertainty)
    if strategy in _AGGREGATES:
        kind, how = _AGGREGATES[strategy]
        objectness = np.asarray(detections.objectness, np.float64)[keep]
        probs = np.asarray(detections.class_probs, np.float64)[keep]
        return aggregate_score(per_box_uncertainty(objectness, probs, kind), how)
    if strategy == "objectness":
        return objectness_score(np.asarray(detections.objectness, np.float64)[keep])
    shown = scores[scores >= threshold]
    if strategy == "max_confidence":
        return float(shown.max()) if shown.size else 0.0
    if strategy == "mean_confidence":
        return float(shown.mean()) if shown.size else 0.0
    if strategy == "count":
        return float(shown.size)
    raise ValueError(f"task score strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")


# --------------------------------------------------------------------------------------------------------------
# Batch selection: which k unlabelled images come next
# --------------------------------------------------------------------------------------------------------------

def select_random(candidates: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    """``k`` of ``candidates`` uniformly at random (the baseline every strategy is judged against)."""
    pool = np.asarray(list(candidates), np.int64)
    k = min(k, pool.size)
    return [int(i) for i in rng.choice(pool, size=k, replace=False)] if k else []


def select_lowest(candidates: Sequence[int], scores: Scores, k: int,
                  clusters: Optional[Sequence[int]] = None,
                  solved: Optional[dict[int, int]] = None) -> list[int]:
    """The next ``k`` as Label Studio serves them: lowest score first (ties: lower index first).

    With ``clusters`` (a cluster id per candidate, aligned with ``scores``) Label Studio's uncertainty-sampling
    rule applies, as one annotator labelling each task as it is served meets it: each pick is the first of
    ``clusters.next_task_order`` (the fewest labelled images in its cluster, ``solved``: cluster id -> count,
    updated as picks are made; then the lowest score; ties: the earlier candidate); see
    ``clusters.serve_sequence``.
    """
    candidates = [int(c) for c in candidates]
    values = np.asarray(scores, np.float64)
    if len(candidates) != values.size:
        raise ValueError(f"{len(candidates)} candidates but {values.size} scores")
    if clusters is None:
        order = sorted(range(len(candidates)), key=lambda j: (values[j], candidates[j]))
        return [candidates[j] for j in order[:k]]
    return [candidates[j] for j in serve_sequence(values, clusters, solved or {}, k)]


def _normalised(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), _EPS)


def select_k_center(candidates: Sequence[int], embeddings: np.ndarray, labelled_embeddings: np.ndarray,
                    k: int) -> list[int]:
    """k-center greedy (core-set): repeatedly take the candidate farthest (cosine distance) from everything
    labelled or picked so far. ``embeddings`` is aligned with ``candidates``. With nothing labelled the first
    pick is the candidate farthest from the candidates' mean."""
    candidates = [int(c) for c in candidates]
    if not candidates or k <= 0:
        return []
    x = _normalised(embeddings)
    if len(labelled_embeddings):
        nearest = 1.0 - (x @ _normalised(labelled_embeddings).T).max(axis=1)
    else:
        centre = _normalised(x.mean(axis=0, keepdims=True))
        nearest = 1.0 - (x @ centre.T)[:, 0]
    picked: list[int] = []
    available = np.ones(len(candidates), bool)
    for _ in range(min(k, len(candidates))):
        j = int(np.argmax(np.where(available, nearest, -np.inf)))
        picked.append(candidates[j])
        available[j] = False
        nearest = np.minimum(nearest, 1.0 - x @ x[j])
    return picked


def select_diverse_lowest(candidates: Sequence[int], scores: Scores, embeddings: np.ndarray,
                          labelled_embeddings: np.ndarray, k: int, shortlist_factor: int = 3) -> list[int]:
    """Uncertainty first, then diversity: the ``shortlist_factor x k`` lowest-scored candidates, of which k-center
    greedy keeps ``k`` (so a batch is not spent on near-duplicates of one doubtful photo)."""
    candidates = [int(c) for c in candidates]
    values = np.asarray(scores, np.float64)
    order = sorted(range(len(candidates)), key=lambda j: (values[j], candidates[j]))
    short = order[:max(k, shortlist_factor * k)]
    emb = np.asarray(embeddings)
    return select_k_center([candidates[j] for j in short], emb[short], labelled_embeddings, k)
