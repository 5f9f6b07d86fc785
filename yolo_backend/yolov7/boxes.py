"""Box geometry and non-maximum suppression, in torch (works on CPU and CUDA tensors).

Our own NMS is the default: torchvision has no CPU wheel here. ``nms(..., backend="auto")`` uses
``torchvision.ops.batched_nms`` only when torchvision imports and works.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(n, 4) centre x, centre y, width, height -> x1, y1, x2, y2."""
    half_wh = boxes[..., 2:4] / 2
    return torch.cat((boxes[..., 0:2] - half_wh, boxes[..., 0:2] + half_wh), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of (n, 4) xyxy boxes; degenerate boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (n, 4) and (m, 4) xyxy boxes -> (n, m). Zero-area unions give IoU 0."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
               labels: Optional[torch.Tensor] = None, max_det: Optional[int] = None) -> torch.Tensor:
    """Greedy NMS, class-aware when ``labels`` is given: indices of the kept boxes, best score first.

    A box is dropped when it overlaps an already kept box of the same class with IoU > ``iou_threshold``.
    Equal scores keep the lower index first (stable sort), so the result is deterministic.

    Vectorised per kept box: each step compares the best remaining box with all remaining boxes at once,
    and the loop stops after ``max_det`` kept boxes, so the cost is O(kept x n) without an n x n matrix.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    labels = labels[order] if labels is not None else None
    limit = n if max_det is None else min(max_det, n)

    keep: list[torch.Tensor] = []
    remaining = torch.arange(n, device=boxes.device)
    while remaining.numel() > 0 and len(keep) < limit:
        best = remaining[0]
        keep.append(best)
        rest = remaining[1:]
        if rest.numel() == 0:
            break
        iou = box_iou(boxes[best].unsqueeze(0), boxes[rest])[0]
        suppressed = iou > iou_threshold
        if labels is not None:
            suppressed &= labels[rest] == labels[best]
        remaining = rest[~suppressed]
    return order[torch.stack(keep)]


@functools.lru_cache(maxsize=1)
def _torchvision_batched_nms() -> Optional[Callable]:
    """torchvision's batched_nms when torchvision imports and runs here; None otherwise."""
    try:
        from torchvision.ops import batched_nms  # type: ignore[import-not-found]

        probe = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        batched_nms(probe, torch.ones(1), torch.zeros(1, dtype=torch.long), 0.5)  # a CUDA-only build fails here
        return batched_nms
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return None


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        labels: Optional[torch.Tensor] = None, max_det: Optional[int] = None, backend: str = "ours") -> torch.Tensor:
    """Class-aware NMS (``labels`` given) or plain NMS: indices of kept boxes, best score first.

    backend: "ours" (default, always available) or "auto" (torchvision when it works, else ours).
    """
    if backend not in ("ours", "auto"):
        raise ValueError(f"unknown NMS backend {backend!r}; use 'ours' or 'auto'")
    if backend == "auto":
        batched_nms = _torchvision_batched_nms()
        if batched_nms is not None and boxes.shape[0] > 0:
            groups = labels if labels is not None else torch.zeros_like(scores, dtype=torch.long)
            keep = batched_nms(boxes.float(), scores.float(), groups, iou_threshold)
            return keep if max_det is None else keep[:max_det]
    return greedy_nms(boxes, scores, iou_threshold, labels=labels, max_det=max_det)
