"""A ``Detector`` built from the settings: the one place that says which setting feeds which detector option.

The server (``model_holder.load_detector``), ``cli detect`` and the converter (``convert.load_checkpoint_detector``)
all build their detector here, so a setting means the same in each. Neutral ground: ``yolov7`` never reads the
settings, and this module imports the detector only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from .settings import Settings


def detector_options(settings: Settings) -> dict[str, Any]:
    """``Detector.from_checkpoint`` keyword arguments from ``settings`` (``conf`` is SCORE_FLOOR: the server keeps
    every detection that feeds the task score and shows those at MODEL_SCORE_THRESHOLD)."""
    return {"device": settings.device, "threads": settings.torch_threads, "backend": settings.inference_backend,
            "cache_dir": settings.onnx_cache_dir, "img_size": settings.img_size, "conf": settings.score_floor,
            "iou": settings.iou_threshold, "max_det": settings.max_detections, "half": settings.half,
            "batch_size": settings.predict_batch_size}


def detector_from_settings(path: Union[str, Path], settings: Settings, **overrides: Any):
    """The detector for checkpoint ``path`` configured by ``settings``; ``overrides`` (``Detector.from_checkpoint``'s
    keyword names, e.g. ``conf=0.25``) win where they are not None."""
    from .yolov7 import Detector

    options = detector_options(settings)
    unknown = set(overrides) - set(options)
    if unknown:
        raise TypeError(f"not a detector option: {', '.join(sorted(unknown))}")
    options.update({name: value for name, value in overrides.items() if value is not None})
    return Detector.from_checkpoint(path, **options)
