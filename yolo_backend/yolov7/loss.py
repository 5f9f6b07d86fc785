"""The YOLOv7 training loss, written for this project from the reference recipe's facts.

Targets arrive as one (n, 6) tensor ``[image index, class, cx, cy, w, h]`` with box coordinates normalised to
the input image (0..1). For every head level:

* a target is matched to each anchor (matching.py) whose width/height ratio to it is within ``anchor_t`` (both ways);
* besides the cell holding its centre, the two neighbouring cells whose side the centre is nearest to
  (fractional part < 0.5, left/up or right/down) also predict it: the decode ``xy = 2*sigmoid - 0.5`` reaches
  from -0.5 to 1.5 cells, so those cells can;
* box loss: 1 - CIoU of the decoded box and the target (in grid units);
* objectness: BCE against a target of the (detached, clamped >= 0) IoU at matched cells, 0 elsewhere,
  weighted per level by ``balance`` (4, 1, 0.4 for P3, P4, P5);
* classes: BCE with one-hot targets, skipped when there is a single class.

The three parts are weighted by the gains (``LossGains``), which the caller rescales for the number of
levels, classes and image size (``LossGains.scaled``), and the total is multiplied by the batch size.
An OTA-style assigner (assign.py) can replace the ratio matching: ``YoloLoss(..., assigner="ota")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Sequence

import torch
from torch import nn

from .assign import ota_assign
from .matching import match_targets

# Objectness weight per level, P3 (small objects, many cells) weighted most.
LEVEL_BALANCE = {3: [4.0, 1.0, 0.4], 4: [4.0, 1.0, 0.25, 0.06], 5: [4.0, 1.0, 0.25, 0.06, 0.02]}


@dataclass(frozen=True)
class LossGains:
    """Weights of the loss parts, as in the reference's hyp.scratch.tiny (before rescaling)."""

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    obj_pw: float = 1.0      # BCE positive weight, objectness
    cls_pw: float = 1.0      # BCE positive weight, classes
    anchor_t: float = 4.0    # most width/height ratio between a target and a matched anchor
    label_smoothing: float = 0.0
    iou_ratio: float = 1.0   # "gr": objectness target = (1 - gr) + gr * IoU

    def scaled(self, nl: int, nc: int, img_size: int) -> "LossGains":
        """The gains rescaled as the reference train.py does: box x 3/nl, cls x nc/80 x 3/nl,
        obj x (img/640)^2 x 3/nl — so the recipe's numbers (tuned for 3 levels, 80 classes, 640²) carry over."""
        level = 3.0 / nl
        return replace(self, box=self.box * level, cls=self.cls * nc / 80.0 * level,
                       obj=self.obj * (img_size / 640.0) ** 2 * level)


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of matching rows of two (n, 4) [cx, cy, w, h] box sets -> (n,).

    CIoU = IoU - centre distance² / enclosing diagonal² - alpha * v, with v measuring the aspect-ratio mismatch.
    """
    b1_x1, b1_x2 = box1[:, 0] - box1[:, 2] / 2, box1[:, 0] + box1[:, 2] / 2
    b1_y1, b1_y2 = box1[:, 1] - box1[:, 3] / 2, box1[:, 1] + box1[:, 3] / 2
    b2_x1, b2_x2 = box2[:, 0] - box2[:, 2] / 2, box2[:, 0] + box2[:, 2] / 2
    b2_y1, b2_y2 = box2[:, 1] - box2[:, 3] / 2, box2[:, 1] + box2[:, 3] / 2
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * \
            (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(0)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    diagonal2 = cw ** 2 + ch ** 2 + eps
    centre2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre2 / diagonal2 + v * alpha)


class YoloLoss(nn.Module):
    """YOLOv7 loss for a model whose head has ``anchors`` (nl, na, 2) in grid units and ``nc`` classes.

    ``loss(predictions, targets)`` with the training-mode output (list of (B, na, ny, nx, 5+nc)) returns
    ``(total * batch size, tensor[box, obj, cls, total])``; the second is detached, for logging.
    """

    anchors: torch.Tensor  # a buffer (register_buffer), declared for the type checker

    def __init__(self, anchors: torch.Tensor, nc: int, gains: LossGains, strides: Sequence[float] = (8, 16, 32),
                 assigner: str = "ratio"):
        super().__init__()
        if assigner not in ("ratio", "ota"):
            raise ValueError(f"unknown assigner {assigner!r}; use 'ratio' or 'ota'")
        self.register_buffer("anchors", anchors.detach().clone().float(), persistent=False)
        self.nc = nc
        self.nl = anchors.shape[0]
        self.gains = gains
        self.balance = LEVEL_BALANCE.get(self.nl, [1.0] * self.nl)
        self.strides = [float(s) for s in strides]
        self.assigner = assigner
        self.bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([gains.cls_pw]))
        self.bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([gains.obj_pw]))
        # Label smoothing: positive and negative class targets.
        self.cls_pos = 1.0 - 0.5 * gains.label_smoothing
        self.cls_neg = 0.5 * gains.label_smoothing

    @classmethod
    def for_model(cls, model, gains: LossGains, img_size: int, assigner: str = "ratio") -> "YoloLoss":
        """Loss for a YOLOv7 module, the gains rescaled for its levels, classes and ``img_size``."""
        head = model.head
        scaled = gains.scaled(head.nl, head.nc, img_size)
        loss = cls(head.anchors, head.nc, scaled, strides=head.stride.tolist(), assigner=assigner)
        return loss.to(head.anchors.device)

    def forward(self, predictions: List[torch.Tensor], targets: torch.Tensor):
        device = predictions[0].device
        targets = targets.to(device=device, dtype=torch.float32)
        predictions = [p.float() for p in predictions]  # the loss in fp32 also under autocast
        if self.assigner == "ota":
            matched = ota_assign(predictions, targets, self.anchors, self.strides, self.nc, self.gains.anchor_t)
        else:
            matched = match_targets(targets, self.anchors, [p.shape[2:4] for p in predictions], self.gains.anchor_t)
        zero = torch.zeros((), device=device)
        box_loss, obj_loss, cls_loss = zero.clone(), zero.clone(), zero.clone()
        for level, (pred, t) in enumerate(zip(predictions, matched)):
            obj_target = torch.zeros_like(pred[..., 4])
            if t.image.numel():
                picked = pred[t.image, t.anchor, t.gj, t.gi]  # (m, 5+nc)
                pxy = picked[:, :2].sigmoid() * 2 - 0.5
                pwh = (picked[:, 2:4].sigmoid() * 2) ** 2 * t.anchor_wh
                iou = bbox_ciou(torch.cat((pxy, pwh), 1), t.box)
                box_loss = box_loss + (1.0 - iou).mean()
                ratio = self.gains.iou_ratio
                obj_target[t.image, t.anchor, t.gj, t.gi] = \
                    (1.0 - ratio) + ratio * iou.detach().clamp(0).to(obj_target.dtype)
                if self.nc > 1:
                    cls_target = torch.full_like(picked[:, 5:], self.cls_neg)
                    cls_target[torch.arange(t.cls.numel(), device=device), t.cls] = self.cls_pos
                    cls_loss = cls_loss + self.bce_cls(picked[:, 5:], cls_target)
            obj_loss = obj_loss + self.bce_obj(pred[..., 4], obj_target) * self.balance[level]
        box_loss = box_loss * self.gains.box
        obj_loss = obj_loss * self.gains.obj
        cls_loss = cls_loss * self.gains.cls
        batch = predictions[0].shape[0]
        total = box_loss + obj_loss + cls_loss
        return total * batch, torch.stack((box_loss, obj_loss, cls_loss, total)).detach()
