"""The YOLOv7 detector: our own implementation of the reference graphs, safe checkpoint loading and the
detection pipeline. Knows nothing of Label Studio.

Public API (imported lazily so that ``yolo_backend.yolov7.detections`` stays free of torch):
  load_model(path, device="cpu") -> torch.nn.Module with .names and .stride
  Detector(model, ...).detect(images) -> list[Detections]

Modules, each with one job (no import cycles among them; see [tool.importlinter] in pyproject.toml):
  the network        graphs, layers, model
  checkpoints        checkpoint (read, identify, save), safe_pickle (the unpickling allow-list), untrained
  where it runs      device, inference_backends, ort_runtime, export
  detection          image_files, preprocess, boxes, detect, detections
  training           yolo_format (the YOLO dataset format, torch-free), dataset, augment, matching, assign, loss,
                     ema, metrics, evaluation, transfer, train
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_model": "yolo_backend.yolov7.checkpoint",
    "CheckpointError": "yolo_backend.yolov7.checkpoint",
    "load_checkpoint": "yolo_backend.yolov7.checkpoint",
    "describe": "yolo_backend.yolov7.checkpoint",
    "build_model": "yolo_backend.yolov7.model",
    "Detector": "yolo_backend.yolov7.detect",
    "Detections": "yolo_backend.yolov7.detections",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
