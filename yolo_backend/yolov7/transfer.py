"""Starting a training model from a checkpoint of another form or with other classes: weight and head transfer.

The training graph (IDetect head) of the checkpoint's architecture is built and every tensor whose name and shape
fit is copied. Across a change of classes the head keeps, per anchor, its box/objectness rows and the rows of the
classes both have (by name), so adding a label keeps what the model knew of the others; the rest is
re-initialised. A Detect head's weights carry over with the implicit layers set to the identity.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Sequence, Set, Tuple

import torch

from . import graphs
from .checkpoint import LoadedCheckpoint
from .layers import ImplicitA, ImplicitM
from .model import YOLOv7, build_model

log = logging.getLogger(__name__)


def same_names(a: Sequence[str], b: Sequence[str]) -> bool:
    """The same classes in the same order (names compared case-insensitively)."""
    return len(a) == len(b) and all(x.strip().lower() == y.strip().lower() for x, y in zip(a, b))


def transfer_weights(ckpt: LoadedCheckpoint, names: Sequence[str]) -> Tuple[YOLOv7, Dict[str, Any]]:
    """The training-form model for ``names`` with what fits of ``ckpt``'s weights, and what was transferred
    (``transferred`` tensor count, ``reinitialised`` modules, ``head_classes_kept``)."""
    nc = len(names)
    graph = copy.deepcopy(ckpt.graph)
    graph["head"] = "IDetect"  # train the training graph; a Detect head's weights carry over (implicit = identity)
    model = build_model(graph, nc, anchors=ckpt.anchors, strides=ckpt.strides, names=names)
    target = model.state_dict()
    same_classes = same_names(ckpt.names, names)
    head_prefix = f"model.{graphs.head_index(graph)}."
    class_map = _class_index_map(ckpt.names, names)
    copied, skipped = 0, []
    kept_classes: Set[str] = set()
    with torch.no_grad():
        for key, value in target.items():
            source = ckpt.state_dict.get(key)
            new_head_conv = key.startswith(head_prefix + "m.") and not same_classes
            if source is not None and tuple(source.shape) == tuple(value.shape) and not new_head_conv:
                value.copy_(source)
                copied += 1
                continue
            per_output = key.startswith((head_prefix + "m.", head_prefix + "im."))
            if per_output and source is not None and class_map and \
                    _copy_head_rows(source, value, len(ckpt.names), nc, class_map, dim=1 if ".im." in key else 0):
                copied += 1
                kept_classes.update(names[new] for new in class_map.values())
            skipped.append(key)  # re-initialised, in part (classes the checkpoint does not have) or whole
        if ckpt.head_type == "Detect":
            # The IDetect implicit layers start as the identity so the transferred head computes as before.
            for module in model.head.modules():
                if isinstance(module, ImplicitA):
                    module.implicit.zero_()
                elif isinstance(module, ImplicitM):
                    module.implicit.fill_(1.0)
    model.load_state_dict(target)
    reinit = sorted({k.rsplit(".", 1)[0] for k in skipped})
    log.info("starting from %s (%s %s head, %d classes -> %d: %s): %d tensors transferred, re-initialised: %s%s",
             ckpt.path, ckpt.graph_name, ckpt.head_type, ckpt.nc, nc, ", ".join(names), copied,
             ", ".join(reinit) if reinit else "nothing",
             f" (head rows of {', '.join(sorted(kept_classes))} and the box/objectness rows kept)"
             if kept_classes else "")
    return model, {"transferred": copied, "reinitialised": reinit, "head_classes_kept": sorted(kept_classes)}


def _class_index_map(old_names: Sequence[str], new_names: Sequence[str]) -> Dict[int, int]:
    """old class index -> new class index for the classes both lists have (names compared case-insensitively)."""
    new_by_name = {str(n).lower(): i for i, n in enumerate(new_names)}
    return {i: new_by_name[str(n).lower()] for i, n in enumerate(old_names) if str(n).lower() in new_by_name}


def _copy_head_rows(source: torch.Tensor, target: torch.Tensor, old_nc: int, new_nc: int,
                    class_map: Dict[int, int], dim: int) -> bool:
    """Copy a head tensor's per-output rows across a change of classes: per anchor, the box and objectness rows
    and the rows of the classes both models have, so adding a label keeps what the model knew of the others
    (the new classes' rows keep their fresh initialisation). False when the layouts do not correspond."""
    old_per, new_per = 5 + old_nc, 5 + new_nc
    if source.dim() != target.dim() or source.shape[dim] % old_per or target.shape[dim] % new_per:
        return False
    anchors = source.shape[dim] // old_per
    if target.shape[dim] // new_per != anchors:
        return False
    other = [d for d in range(source.dim()) if d != dim]
    if any(source.shape[d] != target.shape[d] for d in other):
        return False
    for a in range(anchors):
        pairs = [(a * old_per + k, a * new_per + k) for k in range(5)]
        pairs += [(a * old_per + 5 + old, a * new_per + 5 + new) for old, new in class_map.items()]
        for src_row, dst_row in pairs:
            target.select(dim, dst_row).copy_(source.select(dim, src_row))
    return True
