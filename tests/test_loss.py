"""The YOLOv7 loss: CIoU, ratio matching with neighbour cells, gain scaling, and loss behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from yolo_backend.yolov7 import graphs
from yolo_backend.yolov7.loss import LossGains, YoloLoss, bbox_ciou, match_targets
from yolo_backend.yolov7.model import build_model

torch.set_num_threads(1)


def test_ciou_hand_computed_cases():
    same = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    assert bbox_ciou(same, same).item() == pytest.approx(1.0, abs=1e-5)
    # Same centre and aspect, 4x the area: IoU 0.25, no centre or aspect penalty.
    big = torch.tensor([[1.0, 1.0, 4.0, 4.0]])
    assert bbox_ciou(same, big).item() == pytest.approx(0.25, abs=1e-5)
    # Shifted by 1 along x: IoU 2/6, centre distance 1, enclosing box 3x2 (diagonal² 13).
    shifted = torch.tensor([[2.0, 1.0, 2.0, 2.0]])
    assert bbox_ciou(same, shifted).item() == pytest.approx(1 / 3 - 1 / 13, abs=1e-5)
    # Disjoint boxes: negative.
    far = torch.tensor([[10.0, 10.0, 2.0, 2.0]])
    assert bbox_ciou(same, far).item() < 0


def test_ratio_matching_uses_two_neighbour_cells():
    anchors = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [10.0, 10.0]]])  # one level, grid units
    # 10x10 grid: centre at (5.3, 5.8) cells, size 2x2 cells.
    targets = torch.tensor([[0, 1, 0.53, 0.58, 0.2, 0.2]])
    (level,) = match_targets(targets, anchors, [(10, 10)], anchor_t=4.0)
    cells = sorted(set(zip(level.gi.tolist(), level.gj.tolist())))
    assert cells == [(4, 5), (5, 5), (5, 6)]  # own cell, left (x frac .3), below (y frac .8)
    assert sorted(set(level.anchor.tolist())) == [0, 1]  # ratio 2 and 1 pass, 5 does not
    assert len(level.image) == 6
    assert set(level.cls.tolist()) == {1}
    left = (level.gi == 4).nonzero()[0].item()
    assert level.box[left].tolist() == pytest.approx([1.3, 0.8, 2.0, 2.0], abs=1e-5)
    below = (level.gj == 6).nonzero()[0].item()
    assert level.box[below].tolist() == pytest.approx([0.3, -0.2, 2.0, 2.0], abs=1e-5)


def test_matching_with_no_targets_and_edge_cells():
    anchors = torch.ones(3, 3, 2)
    out = match_targets(torch.zeros(0, 6), anchors, [(8, 8), (4, 4), (2, 2)])
    assert all(t.image.numel() == 0 for t in out)
    # A centre in the first cell has no left/up neighbour (it would fall off the grid).
    (level,) = match_targets(torch.tensor([[0, 0, 0.02, 0.02, 0.1, 0.1]]), torch.ones(1, 1, 2), [(10, 10)])
    assert level.gi.tolist() == [0] and level.gj.tolist() == [0]


def test_gains_rescaled_for_levels_classes_and_size():
    g = LossGains().scaled(nl=3, nc=2, img_size=320)
    assert g.box == pytest.approx(0.05)
    assert g.cls == pytest.approx(0.5 * 2 / 80)
    assert g.obj == pytest.approx(1.0 * (320 / 640) ** 2)
    g4 = LossGains().scaled(nl=4, nc=80, img_size=640)
    assert g4.box == pytest.approx(0.05 * 3 / 4) and g4.cls == pytest.approx(0.5 * 3 / 4)


def _tiny(nc: int = 2):
    torch.manual_seed(0)
    return build_model(graphs.get_graph("yolov7-tiny"), nc).train()


def test_loss_parts_batch_scaling_and_single_class():
    model = _tiny(2)
    loss_fn = YoloLoss.for_model(model, LossGains(), 64)
    x = torch.rand(2, 3, 64, 64)
    preds = model(x)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [1, 0, 0.3, 0.6, 0.2, 0.5]])
    total, parts = loss_fn(preds, targets)
    box, obj, cls, summed = parts.tolist()
    assert box > 0 and obj > 0 and cls > 0
    assert summed == pytest.approx(box + obj + cls, rel=1e-5)
    assert total.item() == pytest.approx(summed * 2, rel=1e-5)  # x batch size
    total.backward()
    assert model.model[0].conv.weight.grad is not None
    # No targets: only objectness (everything is background).
    _, parts = loss_fn([p.detach() for p in preds], torch.zeros(0, 6))
    assert parts[0].item() == 0 and parts[2].item() == 0 and parts[1].item() > 0
    # One class: no class loss.
    single = _tiny(1)
    _, parts = YoloLoss.for_model(single, LossGains(), 64)(single(x), targets[:, :] * torch.tensor([1, 0, 1, 1, 1, 1]))
    assert parts[2].item() == 0


def test_loss_prefers_the_right_answer():
    """Raw maps that predict the target box, objectness and class score lower than the same maps without."""
    anchors = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    loss_fn = YoloLoss(anchors, nc=2, gains=LossGains().scaled(1, 2, 640), strides=[8])
    targets = torch.tensor([[0, 1, 0.55, 0.45, 0.2, 0.2]])  # 10x10 grid: centre (5.5, 4.5), 2x2 cells
    bad = torch.zeros(1, 3, 10, 10, 7)
    bad[..., 4] = -2.0
    good = bad.clone()
    for t in match_targets(targets, anchors, [(10, 10)]):
        for a, gj, gi, box in zip(t.anchor, t.gj, t.gi, t.box):
            xy = (box[:2] + 0.5) / 2  # invert 2*sigmoid - 0.5
            wh = (box[2:] / anchors[0, a]).sqrt() / 2  # invert (2*sigmoid)^2 * anchor
            good[0, a, gj, gi, 0:2] = torch.logit(xy.clamp(1e-4, 1 - 1e-4))
            good[0, a, gj, gi, 2:4] = torch.logit(wh.clamp(1e-4, 1 - 1e-4))
            good[0, a, gj, gi, 4] = 4.0
            good[0, a, gj, gi, 5:] = torch.tensor([-4.0, 4.0])
    _, bad_parts = loss_fn([bad], targets)
    _, good_parts = loss_fn([good], targets)
    assert good_parts[0] < 1e-3  # CIoU ~ 1: the decoded boxes are the target
    assert (good_parts[:3] < bad_parts[:3]).all()


def test_loss_is_device_safe_on_cpu_and_rejects_unknown_assigner():
    with pytest.raises(ValueError, match="assigner"):
        YoloLoss(torch.ones(3, 3, 2), 2, LossGains(), assigner="nope")
    assert math.isfinite(YoloLoss(torch.ones(1, 1, 2), 2, LossGains())([torch.zeros(1, 1, 2, 2, 7)],
                                                                    torch.zeros(0, 6))[0].item())


def test_ota_assigner_gives_every_box_a_positive_and_a_finite_loss():
    from yolo_backend.yolov7.assign import ota_assign

    model = _tiny(2)
    preds = model(torch.rand(2, 3, 64, 64))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [0, 0, 0.2, 0.2, 0.1, 0.1], [1, 0, 0.3, 0.6, 0.2, 0.5]])
    head = model.head
    assigned = ota_assign([p.detach() for p in preds], targets, head.anchors, head.stride.tolist(), 2)
    matched = torch.cat([t.target for t in assigned])
    assert set(matched.tolist()) == {0, 1, 2}
    cells = [(lv, *row) for lv, t in enumerate(assigned)
             for row in zip(t.image.tolist(), t.anchor.tolist(), t.gj.tolist(), t.gi.tolist())]
    assert len(cells) == len(set(cells))  # one box per prediction
    loss_fn = YoloLoss.for_model(model, LossGains(), 64, assigner="ota")
    total, parts = loss_fn(preds, targets)
    assert math.isfinite(total.item()) and parts[0] > 0
    total.backward()
    _, parts = loss_fn([p.detach() for p in preds], torch.zeros(0, 6))
    assert parts[0] == 0
