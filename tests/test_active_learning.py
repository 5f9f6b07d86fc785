"""Task score ordering: low = label first."""

import numpy as np
import pytest

from yolo_backend.active_learning import (
    class_margin_uncertainty,
    decision_probability,
    detection_uncertainty,
    task_score,
)
from yolo_backend.yolov7.detections import Detections

T = 0.25


def dets(scores, class_probs=None, names=("fire", "smoke")):
    scores = np.asarray(scores, np.float32)
    n = len(scores)
    if class_probs is None:
        class_probs = np.tile(np.array([[0.95, 0.02]], np.float32), (n, 1))
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1))
    return Detections(boxes, scores, np.zeros(n, np.int64), scores, np.asarray(class_probs, np.float32).reshape(n, len(names)),
                      100, 100, names)


def score(d, strategy="uncertainty"):
    return task_score(d, strategy, threshold=T, floor=0.05)


def test_threshold_is_the_most_uncertain_point():
    assert decision_probability(np.array([T]), T)[0] == pytest.approx(0.5)
    u = detection_uncertainty(np.array([0.06, 0.15, T, 0.5, 0.95]), np.tile([[1.0, 0.0]], (5, 1)), T)
    assert u[2] == pytest.approx(1.0)
    assert u[1] > u[0] and u[3] > u[4] and u[2] > u[3]


def test_near_threshold_images_come_first():
    near = score(dets([0.27]))
    sure_fire = score(dets([0.95]))
    faint = score(dets([0.06]))
    negative = score(dets([]))
    assert near < faint < negative
    assert near < sure_fire < negative
    assert 0.0 <= near < 0.05 and negative == 1.0


def test_negative_images_do_not_come_first():
    # A fire/smoke set has many empty frames: they must sort after images with anything doubtful on them.
    images = {"empty": dets([]), "doubtful": dets([0.2]), "confident": dets([0.97, 0.9])}
    order = sorted(images, key=lambda k: score(images[k]))
    assert order[0] == "doubtful" and order[-1] == "empty"


def test_hidden_detections_count():
    # The shown box is confident, but a hidden one sits just below the threshold: the image is uncertain.
    assert score(dets([0.95, 0.22])) < score(dets([0.95]))


def test_most_uncertain_detection_decides():
    assert score(dets([0.95, 0.9, 0.26])) == pytest.approx(score(dets([0.26])))


def test_class_confusion_counts_for_likely_objects():
    clear = dets([0.9], [[0.95, 0.05]])
    confused = dets([0.9], [[0.5, 0.48]])
    assert score(confused) < score(clear)
    assert class_margin_uncertainty(np.array([[0.5, 0.5]]))[0] == pytest.approx(1.0)
    assert class_margin_uncertainty(np.array([[0.9]]))[0] == 0.0  # one class: no confusion possible


def test_floor_ignores_tiny_detections():
    assert score(dets([0.01, 0.02])) == 1.0


def test_classic_strategies():
    d = dets([0.9, 0.5, 0.1])
    assert score(d, "max_confidence") == pytest.approx(0.9)
    assert score(d, "mean_confidence") == pytest.approx(0.7)
    assert score(d, "count") == 2.0
    assert score(dets([]), "max_confidence") == 0.0
    with pytest.raises(ValueError, match="unknown"):
        score(d, "random")


def test_scores_stay_in_range():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(0, 6))
        s = task_score(dets(rng.random(n), rng.random((n, 2))), "uncertainty", T, 0.05)
        assert 0.0 <= s <= 1.0
