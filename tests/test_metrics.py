"""Detection metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from yolo_backend.yolov7.metrics import (DetectionMetrics, average_precision, box_iou_np, fitness, format_table,
                                         match_image, paired_fitness_se)


def _box(x, y, w=10, h=10):
    return [x, y, x + w, y + h]


def test_hand_computed_average_precision():
    """3 ground-truth boxes; 4 detections by descending score: TP, FP, TP, TP.

    precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1. Envelope: 1 up to recall 1/3, then 3/4.
    101-point: recall 0.00..0.33 (34 points) -> 1, recall 0.34..1.00 (67 points) -> 0.75:
    AP = (34 + 67 * 0.75) / 101.
    """
    gts = np.array([_box(0, 0), _box(50, 50), _box(100, 0)], np.float32)
    dets = np.array([_box(0, 0), _box(200, 200), _box(50, 50), _box(100, 0)], np.float32)
    metrics = DetectionMetrics(["thing"])
    metrics.add(dets, [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0], gts, [0, 0, 0])
    result = metrics.compute()
    expected = (34 + 67 * 0.75) / 101
    assert result["map50"] == pytest.approx(expected, abs=1e-9)
    assert result["per_class"][0]["ap50"] == pytest.approx(expected, abs=1e-9)
    # Exact boxes: the same AP at every IoU threshold.
    assert result["map"] == pytest.approx(expected, abs=1e-9)
    # At the serving threshold 0.25 all four count: precision 3/4, recall 1.
    assert result["precision"] == pytest.approx(0.75) and result["recall"] == pytest.approx(1.0)


def test_ap_over_iou_thresholds_and_serving_threshold():
    # One box found with IoU 0.6: a hit at 0.50, 0.55, 0.60, a miss above -> AP@.5:.95 = 3/10.
    gt = np.array([[0, 0, 10, 10]], np.float32)
    det = np.array([[0, 0, 10, 6]], np.float32)  # IoU 0.6
    assert box_iou_np(det, gt)[0, 0] == pytest.approx(0.6)
    metrics = DetectionMetrics(["a"], serve_conf=0.25)
    metrics.add(det, [0.2], [0], gt, [0])
    result = metrics.compute()
    assert result["map50"] == pytest.approx(1.0)
    assert result["map"] == pytest.approx(0.3)
    # Its score is below the serving threshold: nothing served -> precision 0, recall 0.
    assert result["precision"] == 0.0 and result["recall"] == 0.0


def test_matching_rules():
    gt = np.array([_box(0, 0), _box(30, 0)], np.float32)
    dets = np.array([_box(0, 0), _box(1, 0), _box(30, 0)], np.float32)
    # The duplicate of the first box is a false positive; the third box has the wrong class.
    correct = match_image(dets, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]), gt, np.array([0, 0]))
    assert correct[:, 0].tolist() == [True, False, False]
    # Higher score wins the box even if listed later.
    correct = match_image(dets[:2], np.array([0.1, 0.9]), np.array([0, 0]), gt[:1], np.array([0]))
    assert correct[:, 0].tolist() == [False, True]


def test_class_without_ground_truth_is_left_out_of_the_mean():
    metrics = DetectionMetrics(["a", "b"])
    gt = np.array([_box(0, 0)], np.float32)
    metrics.add(gt, [0.9], [0], gt, [0])
    metrics.add(np.zeros((0, 4)), [], [], np.zeros((0, 4)), [])  # a negative image, nothing found
    result = metrics.compute()
    assert result["map50"] == pytest.approx(1.0) and result["images"] == 2 and result["instances"] == 1
    assert math.isnan(result["per_class"][1]["ap50"])
    table = format_table(result)
    assert "a" in table and "b" in table and "mAP@.5" in table


def test_missed_boxes_and_empty_curves():
    metrics = DetectionMetrics(["a"])
    metrics.add(np.zeros((0, 4)), [], [], np.array([_box(0, 0)], np.float32), [0])
    result = metrics.compute()
    assert result["map50"] == 0.0 and result["recall"] == 0.0
    assert average_precision(np.array([]), np.array([])) == 0.0


def test_trapz_variant_and_fitness():
    recall, precision = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    coco = average_precision(recall, precision, "coco")
    assert coco == pytest.approx((51 * 1.0 + 50 * 0.5) / 101)
    trapz = average_precision(recall, precision, "trapz")
    assert trapz == pytest.approx(0.5 + 0.5 * 0.75, abs=1e-3)  # linear between the curve points
    with pytest.raises(ValueError):
        average_precision(recall, precision, "eleven")
    assert fitness({"map50": 1.0, "map": 0.5}) == pytest.approx(0.55)
    assert fitness(None) == 0.0


def _image_set(shift: float, images: int = 30, seed: int = 3) -> DetectionMetrics:
    """One exact box per image, found ``shift`` pixels off in every other image (a miss at IoU 0.5 when large)."""
    rng = np.random.default_rng(seed)
    metrics = DetectionMetrics(["thing"])
    for k in range(images):
        x, y = rng.uniform(0, 200, 2)
        off = shift if k % 2 else 0.0
        metrics.add(np.array([_box(x + off, y)], np.float32), [rng.uniform(0.3, 0.9)], [0],
                    np.array([_box(x, y)], np.float32), [0])
    return metrics


def test_subset_resamples_images_and_paired_bootstrap_se():
    good, worse = _image_set(0.0), _image_set(6.0)
    # A subset of images in any order, repeats allowed, is the accumulator of those images.
    firsts = good.subset([0, 0, 2])
    assert firsts.images == 3 and firsts.compute()["instances"] == 3
    assert good.subset(range(good.images)).compute() == good.compute()
    # The same model against itself differs by nothing in every resample; two models by a positive SE, the same
    # for the same seed, smaller for the same gap on more images.
    assert paired_fitness_se(good, good) == 0.0
    se = paired_fitness_se(good, worse)
    assert se > 0 and se == paired_fitness_se(good, worse) and se != paired_fitness_se(good, worse, seed=1)
    assert paired_fitness_se(_image_set(0.0, 240), _image_set(6.0, 240)) < se
    with pytest.raises(ValueError, match="same images"):
        paired_fitness_se(good, _image_set(0.0, 10))
