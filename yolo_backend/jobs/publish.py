"""Which model a run starts from, whether its result is published, and which old versions go."""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

from ..registry import Registry
from ..settings import Settings
from . import TrainingError

log = logging.getLogger(__name__)

MIN_VALIDATION_IMAGES = 4         # fewer: the comparison with the current model is noise, publish "not compared"


def current_model(settings: Settings, project_id: int) -> tuple[Optional[str], Optional[str]]:
    """(checkpoint path, version name) of the model the project is served with now, MODEL_VERSION aside (the
    server's rule, ``model_holder.resolve_source``); (None, None) when there is none."""
    from ..model_holder import NoModelError, resolve_source

    try:
        source = resolve_source(settings, project_id, use_pin=False)
    except NoModelError as exc:
        raise TrainingError(f"{exc}, or unset it to train from an untrained yolov7-tiny") from None
    return (str(source.path), source.version) if source else (None, None)


def fitness(metrics: Optional[dict]) -> float:
    """The engine's model-selection number (yolov7.metrics.fitness: 0.1 mAP@.5 + 0.9 mAP@.5:.95)."""
    from ..yolov7.metrics import fitness as engine_fitness

    return engine_fitness(metrics)


class Decision(NamedTuple):
    """Whether a trained model is published, why (for the log and the version's meta), and whether it was compared
    with the model it replaces at all (False: too few validation images, or nothing to compare with; such a
    version is marked "not compared" wherever it is shown)."""

    publish: bool
    why: str
    compared: bool


def publish_decision(settings: Settings, metrics: Optional[dict], baseline: Optional[dict], val_images: int,
                     fitness_se: Optional[float] = None) -> Decision:
    """Publish unless the new model is worse than the current one on the job's validation split by more than
    PUBLISH_TOLERANCE_SE standard errors of the difference (``fitness_se``, a paired bootstrap over those images;
    None: no tolerance). With fewer than MIN_VALIDATION_IMAGES validation images, or no current model to compare
    with, it is published not compared."""
    if val_images < MIN_VALIDATION_IMAGES:
        why = f"not compared: only {val_images} validation image(s), too few to compare (need {MIN_VALIDATION_IMAGES})"
        return Decision(True, f"{why}; FORCE_PUBLISH is on" if settings.force_publish else why, False)
    if baseline is None:
        why = "not compared: no current model with these labels to compare with"
        return Decision(True, f"{why}; FORCE_PUBLISH is on" if settings.force_publish else why, False)
    new, old = fitness(metrics), fitness(baseline)
    if settings.force_publish:
        return Decision(True, f"FORCE_PUBLISH is on (validation fitness {new:.4f}, current {old:.4f})", True)
    if new >= old:
        return Decision(True, f"validation fitness {new:.4f} >= current {old:.4f}", True)
    margin = settings.publish_tolerance_se * (fitness_se or 0.0)
    noise = f"{settings.publish_tolerance_se:g} x SE {fitness_se:.4f} on {val_images} images" \
        if fitness_se is not None else "no SE"
    if new >= old - margin:
        return Decision(True, f"validation fitness {new:.4f} < current {old:.4f}, within the noise ({noise})", True)
    return Decision(False, f"validation fitness {new:.4f} < current {old:.4f} by more than the noise ({noise}; raise "
                           f"PUBLISH_TOLERANCE_SE or set FORCE_PUBLISH=true to publish anyway)", True)


def prune_versions(registry: Registry, keep: int, protect: set[str]) -> list[str]:
    """Delete the oldest versions beyond ``keep`` (never the newest or a protected one). Returns their names."""
    return registry.prune(keep, protect)


