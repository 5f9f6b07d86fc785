"""Detections -> Label Studio prediction JSON."""

import json

import numpy as np
import pytest

from yolo_backend.labelstudio.config import RectangleTarget, map_classes_to_labels
from yolo_backend.labelstudio.results import detections_to_regions, failed_task_prediction, task_prediction
from yolo_backend.yolov7.detections import Detections

TARGET = RectangleTarget("label", "image", "image", ("Fire", "smoke"))


def make_detections(boxes, scores, labels, width=800, height=400, names=("fire", "smoke")):
    n = len(scores)
    probs = np.zeros((n, len(names)), np.float32)
    probs[np.arange(n), labels] = 1.0
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(labels, np.int64), np.asarray(scores, np.float32), probs, width, height, names)


def test_percent_coordinates_on_non_square_image():
    det = make_detections([[80, 40, 480, 240], [0, 0, 800, 400]], [0.9, 0.3], [0, 1])
    regions = detections_to_regions(det, TARGET, map_classes_to_labels(det.names, TARGET.labels), "v1", 7)
    assert len(regions) == 2
    first = regions[0]
    assert first["value"]["x"] == pytest.approx(10.0)
    assert first["value"]["y"] == pytest.approx(10.0)
    assert first["value"]["width"] == pytest.approx(50.0)
    assert first["value"]["height"] == pytest.approx(50.0)
    assert first["value"]["rectanglelabels"] == ["Fire"]
    assert first["value"]["rotation"] == 0
    assert (first["original_width"], first["original_height"], first["image_rotation"]) == (800, 400, 0)
    assert (first["from_name"], first["to_name"], first["type"]) == ("label", "image", "rectanglelabels")
    assert first["score"] == pytest.approx(0.9)
    assert regions[1]["value"]["width"] == pytest.approx(100.0) and regions[1]["value"]["rectanglelabels"] == ["smoke"]
    assert len({r["id"] for r in regions}) == 2
    json.dumps(regions)  # plain JSON types only


def test_boxes_outside_are_clipped_and_unmapped_classes_skipped():
    det = make_detections([[-10, -10, 900, 500], [10, 10, 20, 20]], [0.8, 0.8], [0, 2],
                          names=("fire", "smoke", "person"))
    mapping = map_classes_to_labels(det.names, TARGET.labels)
    regions = detections_to_regions(det, TARGET, mapping)
    assert len(regions) == 1
    value = regions[0]["value"]
    assert (value["x"], value["y"], value["width"], value["height"]) == (0.0, 0.0, 100.0, 100.0)


def test_task_items():
    item = task_prediction([], 0.25, "v3")
    assert item == {"result": [], "score": 0.25, "model_version": "v3"}
    assert task_prediction([], float("nan"), "v3")["score"] is None
    # Label Studio skips an item without "result" (and asks again later) instead of storing an empty prediction.
    assert failed_task_prediction("v3") == {"model_version": "v3"}
