"""A ``Detector`` built from the settings: the one place that says which setting feeds which detector option.

The server (``model_holder.load_detector``), ``cli detect`` and the converter (``convert.load_checkpoint_detector``)
all build their detector here, so a setting means the same in each. Neutral ground: ``yolov7`` never reads the
settings, and this module imports the detector only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .serving_size import GUESS_HINT, MeasuredSize, measured_size
from .settings import Settings

if TYPE_CHECKING:
    from .yolov7 import Detector


def detector_options(settings: Settings) -> dict[str, Any]:
    """``Detector.from_checkpoint`` keyword arguments from ``settings`` (``conf`` is SCORE_FLOOR: the server keeps
    every detection that feeds the task score and shows those at MODEL_SCORE_THRESHOLD). ``img_size`` is IMG_SIZE,
    None when unset: the detector then runs at the size ``serving_size`` gives."""
    return {"device": settings.device, "threads": settings.torch_threads, "backend": settings.inference_backend,
            "cache_dir": settings.onnx_cache_dir, "img_size": settings.img_size, "img_size_setting": "IMG_SIZE",
            "conf": settings.score_floor, "iou": settings.iou_threshold, "max_det": settings.max_detections,
            "half": settings.half, "batch_size": settings.predict_batch_size}


@dataclass(frozen=True)
class ServingSize:
    """The size a detector built here runs a checkpoint at, why, and whether it is the 640 guess."""

    size: int
    reason: str
    guess: bool = False
    measured: Optional[MeasuredSize] = None   # the evidence, when a training measured it


def serving_size(checkpoint: Any, settings: Settings, img_size: Optional[int] = None,
                 setting: str = "--img-size") -> ServingSize:
    """The one rule for ``checkpoint`` (a path or a ``LoadedCheckpoint``): ``img_size`` (an override named
    ``setting``), else IMG_SIZE, else the size a training measured for the file (``serving_size.py``; made only
    for checkpoints that record no size), else the size it was trained at when it records one, else 640 as a
    guess (the reason says so and how to set it). Reads the file only when none of the first three applies."""
    from .yolov7.checkpoint import serving_img_size

    if img_size is not None:
        return ServingSize(*serving_img_size(checkpoint, img_size, setting))
    if settings.img_size is not None:
        return ServingSize(*serving_img_size(checkpoint, settings.img_size, "IMG_SIZE"))
    measured = measured_size(settings.model_dir, getattr(checkpoint, "path", checkpoint))
    if measured is not None:
        return ServingSize(measured.size, measured.reason, measured=measured)
    return _with_hint(*serving_img_size(checkpoint, None, "IMG_SIZE"))


def _with_hint(size: int, reason: str) -> ServingSize:
    from .yolov7.checkpoint import SIZE_GUESS, is_size_guess

    if is_size_guess(reason):
        return ServingSize(size, f"{SIZE_GUESS}; {GUESS_HINT}", guess=True)
    return ServingSize(size, reason)


def img_size_for(checkpoint: Any, settings: Settings, img_size: Optional[int] = None,
                 setting: str = "--img-size") -> tuple[int, str]:
    """(size, why) of ``serving_size``: for callers that run the model themselves (``cli val``, ``info``, the
    simulator); ``detector_from_settings`` applies the same rule."""
    found = serving_size(checkpoint, settings, img_size, setting)
    return found.size, found.reason


def detector_from_settings(path: Union[str, Path], settings: Settings, **overrides: Any) -> Detector:
    """The detector for checkpoint ``path`` configured by ``settings``; ``overrides`` (``Detector.from_checkpoint``'s
    keyword names, e.g. ``conf=0.25``) win where they are not None. Its ``img_size_reason`` says why it runs at
    its ``img_size`` ("trained at 320", "IMG_SIZE=640", "measured on 47 annotated images of project 3: ...",
    "a guess: ..."; the rule: ``serving_size``) and ``img_size_guess`` whether that size is the 640 guess."""
    from .yolov7 import Detector

    options = detector_options(settings)
    unknown = set(overrides) - set(options)
    if unknown:
        raise TypeError(f"not a detector option: {', '.join(sorted(unknown))}")
    if overrides.get("img_size") is not None and overrides.get("img_size_setting") is None:
        overrides = {**overrides, "img_size_setting": "img_size"}  # not IMG_SIZE: the caller chose it
    options.update({name: value for name, value in overrides.items() if value is not None})
    measured = measured_size(settings.model_dir, path) if options["img_size"] is None else None
    if measured is not None:  # known without reading the checkpoint twice
        options.update(img_size=measured.size, img_size_setting="measured img_size")
    detector = Detector.from_checkpoint(path, **options)
    size = getattr(detector, "img_size", None)
    if size is None:  # a stand-in without sizes (tests)
        return detector
    found = ServingSize(size, measured.reason, measured=measured) if measured is not None else \
        _with_hint(size, detector.img_size_reason)
    detector.img_size_reason, detector.img_size_guess = found.reason, found.guess
    return detector
