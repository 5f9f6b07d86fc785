"""Box IoU against hand-computed values; our NMS against a brute-force greedy NMS."""

import numpy as np
import pytest
import torch

from yolo_backend.yolov7.boxes import box_iou, greedy_nms, nms, xywh_to_xyxy

torch.set_num_threads(1)


def test_xywh_to_xyxy():
    out = xywh_to_xyxy(torch.tensor([[10.0, 20.0, 4.0, 6.0]]))
    assert out.tolist() == [[8.0, 17.0, 12.0, 23.0]]


def test_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # identical -> 1
        [5.0, 0.0, 15.0, 10.0],    # half overlap: 50 / 150
        [5.0, 5.0, 15.0, 15.0],    # quarter: 25 / 175
        [10.0, 0.0, 20.0, 10.0],   # touching edge -> 0
        [20.0, 20.0, 30.0, 30.0],  # disjoint -> 0
        [2.0, 2.0, 4.0, 4.0],      # inside: 4 / 100
    ])
    expected = [1.0, 50 / 150, 25 / 175, 0.0, 0.0, 4 / 100]
    assert box_iou(a, b)[0].tolist() == pytest.approx(expected, abs=1e-7)
    assert box_iou(b, a)[:, 0].tolist() == pytest.approx(expected, abs=1e-7)


def test_iou_degenerate_boxes_are_zero_not_nan():
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    iou = box_iou(a, a)
    assert torch.isfinite(iou).all() and iou.item() == 0.0


def brute_force_nms(boxes, scores, labels, threshold, max_det=None):
    """Textbook greedy NMS in plain Python: best first (ties: lower index), drop same-class overlaps > threshold."""
    def iou(p, q):
        w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = w * h
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        return inter / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if all(labels[i] != labels[k] or iou(boxes[i], boxes[k]) <= threshold for k in keep):
            keep.append(i)
    return keep[:max_det] if max_det else keep


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(2, size / 3, (n, 2))
    # float64 so both implementations compute the same IoU values bit for bit
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("num_classes", [1, 3])
def test_nms_equals_brute_force(seed, num_classes):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    boxes = random_boxes(rng, n)
    scores = rng.uniform(0, 1, n)
    if seed % 2:  # ties: a coarse score grid makes equal scores common
        scores = np.round(scores * 5) / 5
    labels = rng.integers(0, num_classes, n)
    threshold = [0.3, 0.45, 0.6, 0.1][seed % 4]
    expected = brute_force_nms(boxes.tolist(), scores.tolist(), labels.tolist(), threshold)
    got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold, labels=torch.from_numpy(labels))
    assert got.tolist() == expected
    # max_det keeps the first max_det of the same order
    got_capped = greedy_nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold,
                            labels=torch.from_numpy(labels), max_det=3)
    assert got_capped.tolist() == expected[:3]


def test_class_aware_keeps_overlapping_boxes_of_other_classes():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.5], [0.0, 0.0, 10.0, 10.2]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5, labels=torch.tensor([0, 1, 0])).tolist() == [0, 1]
    assert nms(boxes, scores, 0.5).tolist() == [0]  # class-agnostic without labels


def test_ties_keep_lower_index_first():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3 + [[50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert nms(boxes, scores, 0.45).tolist() == [0, 3]


def test_iou_exactly_at_threshold_is_kept():
    # IoU of these two is exactly 0.5 (50 / 100): only IoU > threshold suppresses, as in the reference
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]], dtype=torch.float64)
    assert nms(boxes, torch.tensor([0.9, 0.8], dtype=torch.float64), 0.5).tolist() == [0, 1]


def test_empty_input():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_auto_backend_falls_back_to_ours():
    rng = np.random.default_rng(0)
    boxes = torch.from_numpy(random_boxes(rng, 50)).float()
    scores = torch.from_numpy(rng.uniform(0, 1, 50)).float()
    labels = torch.from_numpy(rng.integers(0, 2, 50))
    assert nms(boxes, scores, 0.45, labels, backend="auto").tolist() == nms(boxes, scores, 0.45, labels).tolist()
    with pytest.raises(ValueError, match="unknown NMS backend"):
        nms(boxes, scores, 0.45, backend="fast")
