"""Which predictions must learn which targets: ratio matching with neighbour cells (the loss's default), and the
``LevelTargets`` record both assigners (this one and assign.py's OTA-style one) return per head level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

# Neighbour-cell offsets: own cell, then left, up, right, down (in grid units, times the 0.5 bias below).
_NEIGHBOURS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)
_CELL_BIAS = 0.5


@dataclass
class LevelTargets:
    """The predictions one level must make: which (image, anchor, cell) and what."""

    image: torch.Tensor     # (m,) long
    anchor: torch.Tensor    # (m,) long
    gj: torch.Tensor        # (m,) long, cell row
    gi: torch.Tensor        # (m,) long, cell column
    box: torch.Tensor       # (m, 4) target [x offset from the cell, y offset, w, h] in grid units
    cls: torch.Tensor       # (m,) long
    anchor_wh: torch.Tensor  # (m, 2) matched anchor in grid units
    target: torch.Tensor    # (m,) long, row of the target in the input targets


def match_targets(targets: torch.Tensor, anchors: torch.Tensor, grid_hw: Sequence[Sequence[int]],
                  anchor_t: float = 4.0) -> List[LevelTargets]:
    """Ratio matching with neighbour cells, per level.

    targets: (n, 6) [image, class, cx, cy, w, h] normalised; anchors: (nl, na, 2) in grid units;
    grid_hw: (ny, nx) of each level.
    """
    device = targets.device
    nl, na = anchors.shape[:2]
    n = targets.shape[0]
    anchor_index = torch.arange(na, device=device, dtype=targets.dtype).view(na, 1).expand(na, n)
    target_index = torch.arange(n, device=device, dtype=targets.dtype).view(1, n).expand(na, n)
    # (na, n, 8): every target paired with every anchor index, and its own row number
    paired = torch.cat((targets.unsqueeze(0).expand(na, n, 6), anchor_index.unsqueeze(2),
                        target_index.unsqueeze(2)), 2)
    offsets_all = _NEIGHBOURS.to(device=device, dtype=targets.dtype) * _CELL_BIAS
    out: List[LevelTargets] = []
    for level in range(nl):
        ny, nx = grid_hw[level]
        scale = torch.tensor([1, 1, nx, ny, nx, ny, 1, 1], device=device, dtype=targets.dtype)
        level_anchors = anchors[level]
        t = paired * scale
        if n:
            ratio = t[:, :, 4:6] / level_anchors[:, None]
            keep = torch.max(ratio, 1 / ratio).max(2).values < anchor_t
            t = t[keep]
            xy = t[:, 2:4]
            xy_inverse = torch.tensor([nx, ny], device=device, dtype=targets.dtype) - xy
            left_up = ((xy % 1 < _CELL_BIAS) & (xy > 1)).T
            right_down = ((xy_inverse % 1 < _CELL_BIAS) & (xy_inverse > 1)).T
            use = torch.stack((torch.ones_like(left_up[0]), left_up[0], left_up[1],
                               right_down[0], right_down[1]))
            t = t.repeat((5, 1, 1))[use]
            offsets = (torch.zeros_like(xy)[None] + offsets_all[:, None])[use]
        else:
            t = paired.reshape(-1, 8)[:0]
            offsets = torch.zeros((0, 2), device=device, dtype=targets.dtype)
        image, cls = t[:, 0].long(), t[:, 1].long()
        xy, wh = t[:, 2:4], t[:, 4:6]
        cell = (xy - offsets).long()
        gi = cell[:, 0].clamp(0, nx - 1)
        gj = cell[:, 1].clamp(0, ny - 1)
        anchor = t[:, 6].long()
        box = torch.cat((xy - torch.stack((gi, gj), 1).to(xy.dtype), wh), 1)
        out.append(LevelTargets(image, anchor, gj, gi, box, cls, level_anchors[anchor], t[:, 7].long()))
    return out
