"""Evaluation as the reference test.py measures it: mAP@0.5, mAP@0.5:0.95 per class, precision and recall.

Images are letterboxed as the reference test loader does (``eval_letterbox``) and run through the detector's own
forward, decode and NMS, so the numbers describe the pipeline that serves.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .dataset import EvalSet, Sample
from .detect import Detector
from .metrics import DetectionMetrics
from .preprocess import Letterboxed, resize_and_pad

if TYPE_CHECKING:
    from .ort_runtime import InferenceModel


def eval_letterbox(image: np.ndarray, img_size: int, stride: int, pad: float) -> Letterboxed:
    """Letterbox as the reference test loader does: the input shape is the image's shape at long side
    ``img_size``, plus ``pad`` strides, rounded up to the stride (a 320 square becomes 352), the image
    centred in it without resizing up. ``pad=0`` gives the detect pipeline's minimal padding."""
    h, w = image.shape[:2]
    long_side = max(h, w)
    out_h = math.ceil(img_size * h / long_side / stride + pad) * stride
    out_w = math.ceil(img_size * w / long_side / stride + pad) * stride
    r = min(out_h / h, out_w / w, 1.0)
    new_w, new_h = round(w * r), round(h * r)
    return resize_and_pad(image, new_w, new_h, (out_w - new_w) / 2, (out_h - new_h) / 2)


def evaluate(model: InferenceModel, data: Union[EvalSet, Sequence[Sample]], names: Optional[Sequence[str]] = None,
             img_size: int = 640, conf: float = 0.001, iou: float = 0.65, max_det: int = 300,
             batch_size: int = 8, serve_conf: float = 0.25, multi_label: bool = True,
             method: str = "coco", pad: float = 0.5) -> Dict[str, Any]:
    """mAP@0.5, mAP@0.5:0.95 per class and precision/recall at ``serve_conf`` of ``model`` on ``data``
    (``evaluate_images(...).compute()``)."""
    return evaluate_images(model, data, names, img_size, conf, iou, max_det, batch_size, serve_conf, multi_label,
                           method, pad).compute()


@torch.no_grad()
def evaluate_images(model: InferenceModel, data: Union[EvalSet, Sequence[Sample]],
                    names: Optional[Sequence[str]] = None, img_size: int = 640, conf: float = 0.001,
                    iou: float = 0.65, max_det: int = 300,
                    batch_size: int = 8, serve_conf: float = 0.25, multi_label: bool = True,
                    method: str = "coco", pad: float = 0.5) -> DetectionMetrics:
    """``model``'s detections on ``data`` matched to the ground truth image by image, in ``data``'s order (a
    ``DetectionMetrics``: ``compute()`` gives the summary, ``subset()`` a resample).

    Inference as the reference test.py: images at long side ``img_size`` padded by ``pad`` strides
    (``eval_letterbox``), conf 0.001, class-aware NMS at IoU 0.65, every class above conf per box
    (``multi_label``). Uses the detector's forward, decode and NMS.
    The model is put in eval mode and returned to its previous mode.
    """
    eval_set = data if isinstance(data, EvalSet) else EvalSet(list(data), img_size)
    names = list(names) if names is not None else list(model.names)
    was_training = model.training
    detector = Detector(model, img_size=img_size, conf=conf, iou=iou, max_det=max_det, batch_size=batch_size)
    metrics = DetectionMetrics(names, serve_conf=serve_conf, method=method)
    pending: List[Tuple[Any, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        for indices in detector.batches([boxed for boxed, _, _ in pending]):
            predictions = detector.forward(np.stack([pending[k][0].image for k in indices]))
            for row, k in enumerate(indices):
                boxed, gt_boxes, gt_classes = pending[k]
                det = detector.decode(predictions[row], boxed, conf, multi_label=multi_label)
                metrics.add(det.boxes, det.scores, det.labels, gt_boxes, gt_classes)
        pending.clear()

    try:
        for image, gt_boxes, gt_classes in eval_set:
            pending.append((eval_letterbox(image, img_size, detector.stride, pad), gt_boxes, gt_classes))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        model.train(was_training)
    return metrics
