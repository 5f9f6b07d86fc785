"""A ``Detector`` built from the settings: the one place that says which setting feeds which detector option.

The server (``model_holder.load_detector``), ``cli detect`` and the converter (``convert.load_checkpoint_detector``)
all build their detector here, so a setting means the same in each. Neutral ground: ``yolov7`` never reads the
settings, and this module imports the detector only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from .settings import Settings


def detector_options(settings: Settings) -> dict[str, Any]:
    """``Detector.from_checkpoint`` keyword arguments from ``settings`` (``conf`` is SCORE_FLOOR: the server keeps
    every detection that feeds the task score and shows those at MODEL_SCORE_THRESHOLD). ``img_size`` is IMG_SIZE,
    None when unset: the detector then runs at the checkpoint's training size (see ``img_size_for``)."""
    return {"device": settings.device, "threads": settings.torch_threads, "backend": settings.inference_backend,
            "cache_dir": settings.onnx_cache_dir, "img_size": settings.img_size, "img_size_setting": "IMG_SIZE",
            "conf": settings.score_floor, "iou": settings.iou_threshold, "max_det": settings.max_detections,
            "half": settings.half, "batch_size": settings.predict_batch_size}


def img_size_for(checkpoint: Any, settings: Settings, img_size: Optional[int] = None,
                 setting: str = "--img-size") -> tuple[int, str]:
    """(size, why) a detector built here runs ``checkpoint`` (a path or a ``LoadedCheckpoint``) at: ``img_size``
    (an override named ``setting``), else IMG_SIZE, else the size the checkpoint was trained at when it records
    one, else 640. For callers that run the model themselves (``cli val``); ``detector_from_settings`` applies the
    same rule (``yolov7.checkpoint.serving_img_size``). Reads the file when it is a path and no size is set."""
    from .yolov7.checkpoint import serving_img_size

    if img_size is not None:
        return serving_img_size(checkpoint, img_size, setting)
    return serving_img_size(checkpoint, settings.img_size, "IMG_SIZE")


def detector_from_settings(path: Union[str, Path], settings: Settings, **overrides: Any):
    """The detector for checkpoint ``path`` configured by ``settings``; ``overrides`` (``Detector.from_checkpoint``'s
    keyword names, e.g. ``conf=0.25``) win where they are not None. Its ``img_size_reason`` says why it runs at
    its ``img_size`` ("trained at 320", "IMG_SIZE=640", "official checkpoint: 640")."""
    from .yolov7 import Detector

    options = detector_options(settings)
    unknown = set(overrides) - set(options)
    if unknown:
        raise TypeError(f"not a detector option: {', '.join(sorted(unknown))}")
    if overrides.get("img_size") is not None and overrides.get("img_size_setting") is None:
        overrides = {**overrides, "img_size_setting": "img_size"}  # not IMG_SIZE: the caller chose it
    options.update({name: value for name, value in overrides.items() if value is not None})
    return Detector.from_checkpoint(path, **options)
