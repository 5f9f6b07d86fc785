"""Detections -> Label Studio prediction JSON.

Label Studio stores rectangles in percent of the image as the browser sees it (natural size, EXIF orientation
applied), top-left corner plus width/height, with the image size alongside:

    {"id": "...", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
     "original_width": 640, "original_height": 480, "image_rotation": 0,
     "value": {"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0, "rectanglelabels": ["fire"]},
     "score": 0.87}

A Choices control gets one image-level result: ``{"from_name": "fire_seen", "to_name": "image", "type": "choices",
"value": {"choices": ["fire"]}, "score": 0.87}``.

One prediction per task: {"result": [...regions], "score": task_score, "model_version": "..."}; a task whose
image could not be had gets an item without "result", which Label Studio skips (and asks for again later).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Optional

from .config import LabelMapping, RectangleTarget


def _percent(value: float, size: int) -> float:
    return float(min(100.0, max(0.0, value / size * 100.0)))


def region_id(model_version: str, task_key: Any, index: int) -> str:
    """A short region id, stable for the same model, task and region (Label Studio only needs it unique per
    prediction; stable ids make repeated predictions comparable)."""
    digest = hashlib.sha1(f"{model_version}:{task_key}:{index}".encode()).hexdigest()
    return digest[:10]


def detections_to_regions(detections, target: RectangleTarget, mapping: LabelMapping,
                          model_version: str = "", task_key: Any = "") -> list[dict]:
    """Regions for the detections (all of them: filter with ``detections.above(threshold)`` first).

    Detections of classes without a config label are left out.
    """
    width, height = int(detections.width), int(detections.height)
    regions = []
    for i in range(len(detections)):
        label = mapping.label_of(int(detections.labels[i]))
        if label is None:
            continue
        x1, y1, x2, y2 = (float(v) for v in detections.boxes[i])
        x, y = _percent(x1, width), _percent(y1, height)
        regions.append({
            "id": region_id(model_version, task_key, i),
            "from_name": target.from_name,
            "to_name": target.to_name,
            "type": "rectanglelabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "x": x,
                "y": y,
                "width": _percent(x2, width) - x,
                "height": _percent(y2, height) - y,
                "rotation": 0,
                "rectanglelabels": [label],
            },
            "score": float(detections.scores[i]),
        })
    return regions


def choices_region(from_name: str, to_name: str, choices: list[str], score: float, model_version: str = "",
                   task_key: Any = "") -> dict:
    """An image-level Choices result: ``{"from_name", "to_name", "type": "choices", "value": {"choices": [...]},
    "score"}``."""
    return {"id": region_id(model_version, task_key, 0), "from_name": from_name, "to_name": to_name,
            "type": "choices", "value": {"choices": list(choices)}, "score": float(score)}


def task_prediction(regions: list[dict], score: Optional[float], model_version: str) -> dict:
    """One task's prediction item. A non-finite score is sent as null (JSON has no NaN)."""
    if score is not None and not math.isfinite(score):
        score = None
    return {"result": regions, "score": None if score is None else float(score), "model_version": model_version}


def failed_task_prediction(model_version: str) -> dict:
    """What a task whose image could not be had (download failed, refused, not an image) gets: an item without
    ``result``.

    Label Studio skips such an item (it logs it and stores nothing), so it asks again the next time predictions are
    retrieved, instead of keeping an empty prediction of this version forever; the reason is in the backend's log.
    """
    return {"model_version": model_version}


def is_failed_prediction(item: dict) -> bool:
    return isinstance(item, dict) and "result" not in item
