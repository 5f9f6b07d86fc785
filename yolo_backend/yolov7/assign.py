"""OTA-style target assignment (a dynamic-k, SimOTA-like matching), written for this project.

Candidates are the ratio matcher's (anchor shape within ``anchor_t``, own cell and two neighbours, all levels).
Per image, every ground-truth box is then given its ``k`` cheapest candidates, with
``cost = class BCE (on sqrt(class prob x objectness)) + 3 x -log(IoU)`` and ``k = sum of its 10 best IoUs``
(at least 1); a candidate claimed by several boxes goes to the cheapest. Everything runs on the predictions'
device.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .boxes import box_iou, xywh_to_xyxy
from .matching import LevelTargets, match_targets

TOP_IOUS = 10
IOU_COST_WEIGHT = 3.0


def _empty(device: torch.device) -> LevelTargets:
    """A level with no targets."""
    def none(*shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    return LevelTargets(none(0, dtype=torch.long), none(0, dtype=torch.long), none(0, dtype=torch.long),
                        none(0, dtype=torch.long), none(0, 4), none(0, dtype=torch.long), none(0, 2),
                        none(0, dtype=torch.long))


@torch.no_grad()
def ota_assign(predictions: List[torch.Tensor], targets: torch.Tensor, anchors: torch.Tensor,
               strides: Sequence[float], nc: int, anchor_t: float = 4.0) -> List[LevelTargets]:
    device = predictions[0].device
    nl = len(predictions)
    grids = [p.shape[2:4] for p in predictions]
    if targets.shape[0] == 0:
        return [_empty(device) for _ in range(nl)]
    candidates = match_targets(targets, anchors, grids, anchor_t)
    height = grids[0][0] * strides[0]
    width = grids[0][1] * strides[0]
    gt_xyxy = xywh_to_xyxy(targets[:, 2:6] * torch.tensor([width, height, width, height], device=device))

    # All candidates of all levels in one list: level, image, anchor, gj, gi (duplicates removed).
    rows = [torch.stack((torch.full_like(c.image, level), c.image, c.anchor, c.gj, c.gi), 1)
            for level, c in enumerate(candidates)]
    cand = torch.unique(torch.cat(rows, 0), dim=0)

    chosen: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {level: [] for level in range(nl)}
    for b in cand[:, 1].unique():
        gt_rows = (targets[:, 0] == b).nonzero(as_tuple=True)[0]
        cb = cand[cand[:, 1] == b]
        if gt_rows.numel() == 0 or cb.numel() == 0:
            continue
        iou, cost = _costs(predictions, cb, targets[gt_rows, 1], gt_xyxy[gt_rows], anchors, strides, nc)
        matching = _dynamic_k(iou, cost)
        fg = matching.any(0)
        gt_of = matching[:, fg].float().argmax(0)
        for row, g in zip(cb[fg], gt_rows[gt_of]):
            chosen[int(row[0])].append((row, g))
    return [_level_targets(chosen[level], targets, anchors[level], grids[level], device) for level in range(nl)]


def _costs(predictions: List[torch.Tensor], cb: torch.Tensor, gt_cls: torch.Tensor, gt_xyxy: torch.Tensor,
           anchors: torch.Tensor, strides: Sequence[float], nc: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """IoU and matching cost, (boxes, candidates), of one image's boxes against its candidates ``cb``."""
    device = predictions[0].device
    raw = torch.empty(len(cb), predictions[0].shape[-1], device=device, dtype=predictions[0].dtype)
    for level, pred in enumerate(predictions):
        at = cb[:, 0] == level
        if at.any():
            raw[at] = pred[cb[at, 1], cb[at, 2], cb[at, 3], cb[at, 4]]
    level_stride = torch.tensor([float(s) for s in strides], device=device)[cb[:, 0]]
    anchor_px = anchors[cb[:, 0], cb[:, 2]] * level_stride[:, None]
    p = raw.float().sigmoid()
    xy = (p[:, :2] * 2 - 0.5 + torch.stack((cb[:, 4], cb[:, 3]), 1).float()) * level_stride[:, None]
    wh = (p[:, 2:4] * 2) ** 2 * anchor_px
    iou = box_iou(gt_xyxy, xywh_to_xyxy(torch.cat((xy, wh), 1)))          # (g, c)
    g = len(gt_cls)
    if nc > 1:
        score = (p[:, 5:] * p[:, 4:5]).sqrt().clamp(1e-6, 1 - 1e-6)     # (c, nc)
        onehot = F.one_hot(gt_cls.long(), nc).float()                    # (g, nc)
        cls_cost = F.binary_cross_entropy(score[None].expand(g, -1, -1),
                                          onehot[:, None].expand(-1, len(cb), -1), reduction="none").sum(-1)
    else:
        cls_cost = F.binary_cross_entropy(p[:, 4].clamp(1e-6, 1 - 1e-6)[None].expand(g, -1),
                                          torch.ones(g, len(cb), device=device), reduction="none")
    return iou, cls_cost + IOU_COST_WEIGHT * -torch.log(iou + 1e-8)


def _dynamic_k(iou: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """(boxes, candidates) bool: each box's k cheapest candidates, k = its best IoUs' sum; a candidate claimed by
    several boxes goes to the cheapest."""
    k = iou.topk(min(TOP_IOUS, iou.shape[1]), dim=1).values.sum(1).int().clamp(min=1)
    matching = torch.zeros_like(cost, dtype=torch.bool)
    for g in range(len(cost)):
        matching[g, cost[g].topk(min(int(k[g]), cost.shape[1]), largest=False).indices] = True
    claimed = matching.sum(0) > 1
    if claimed.any():
        cheapest = cost[:, claimed].argmin(0)
        matching[:, claimed] = False
        matching[cheapest, claimed.nonzero(as_tuple=True)[0]] = True
    return matching


def _level_targets(chosen: List[Tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor,
                   level_anchors: torch.Tensor, grid: Sequence[int], device: torch.device) -> LevelTargets:
    """One level's targets from its chosen (candidate row, box index) pairs."""
    if not chosen:
        return _empty(device)
    rows_l = torch.stack([r for r, _ in chosen])
    gts = torch.stack([g for _, g in chosen])
    ny, nx = grid
    t = targets[gts]
    gxy = t[:, 2:4] * torch.tensor([nx, ny], device=device, dtype=t.dtype)
    gwh = t[:, 4:6] * torch.tensor([nx, ny], device=device, dtype=t.dtype)
    cell = torch.stack((rows_l[:, 4], rows_l[:, 3]), 1).to(t.dtype)
    return LevelTargets(rows_l[:, 1], rows_l[:, 2], rows_l[:, 3], rows_l[:, 4], torch.cat((gxy - cell, gwh), 1),
                        t[:, 1].long(), level_anchors[rows_l[:, 2]], gts)
