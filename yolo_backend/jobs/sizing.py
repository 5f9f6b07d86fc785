"""The size the start model of a training run is compared at, measured when its checkpoint records none.

A run compares its new model (at TRAIN_IMG_SIZE, the size it will serve at) with the model it replaces at that
model's best size: IMG_SIZE when set (it wins for every checkpoint); else the size the checkpoint was trained at
when it records one (ours do); else the size measured for it before (``serving_size.py``); else it is measured now:
the start model is evaluated at each candidate size (TRAIN_IMG_SIZE and 640) on the project's annotated images,
all of them (the start model never trained on them; at most SIZE_PROBE_IMAGES, spread over the task ids), and the
size with the higher fitness is written to MODEL_DIR/serving-sizes.json, so every server serves that checkpoint at
it from then on. A measurement on fewer than ``serving_size.MIN_EVIDENCE_IMAGES`` images is made again next time;
a tie (e.g. a model that finds nothing at either size) decides nothing and the size stays the 640 guess.

Measuring is advisory: when it cannot be done (the checkpoint's classes are not the label config's, the file
cannot be read) the run goes on with the guess, and says so.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..serving_size import MeasuredSize, SizeScore, best_size, measured_size, record_size
from ..settings import Settings
from .dataset import Example, class_map, example_eval_set
from .states import JobPhase

log = logging.getLogger(__name__)

GUESS_SIZE = 640          # yolov7.checkpoint.DEFAULT_IMG_SIZE (not imported: that module imports torch)
# Most annotated images a measurement evaluates. The reference-trained yolov7-tiny on the 47 fire-smoke validation
# images: mAP@0.5 0.747 at 320 against 0.181 at 640 (0.868 against 0.282 on 12 of them), so a wrong size shows on
# a few dozen images; those 47 took 10 s at 320 and 21 s at 640 on 2 CPU cores, once per checkpoint.
SIZE_PROBE_IMAGES = 50

# (checkpoint, examples, label names, size) -> metrics with map50 and map: the start model at one size
SizeEvaluator = Callable[[str, list[Example], list[str], int], dict]


@dataclass(frozen=True)
class StartSize:
    """The size to compare the start model at, why, and the measurement behind it."""

    size: int
    reason: str
    guess: bool = False
    measured: Optional[MeasuredSize] = None
    measured_now: bool = False

    def meta(self) -> dict:
        """For the new version's meta.json and the run's history line."""
        fields = {"size": self.size, "reason": self.reason, "guess": self.guess, "measured_now": self.measured_now}
        if self.measured is not None:
            fields["measured"] = self.measured.to_json()
        return fields


def candidate_sizes(settings: Settings) -> list[int]:
    return sorted({settings.train_img_size, GUESS_SIZE})


def start_model_size(settings: Settings, checkpoint: str, version: Optional[str], examples: list[Example],
                     names: list[str], project_id: Optional[int] = None, job_id: Optional[str] = None,
                     report: Optional[Callable[[dict], None]] = None,
                     evaluate: Optional[SizeEvaluator] = None) -> StartSize:
    """The size ``checkpoint`` (the start model, version name ``version``) is compared at, measuring it on
    ``examples`` when nothing records it (the rule in this module's docstring)."""
    from ..serving_size import GUESS_HINT

    if settings.img_size is not None:
        return StartSize(settings.img_size, f"IMG_SIZE={settings.img_size}")
    known = measured_size(settings.model_dir, checkpoint)
    if known is not None and known.settled:
        return StartSize(known.size, known.reason, measured=known)
    try:
        from ..yolov7.checkpoint import SIZE_GUESS, is_size_guess, load_checkpoint, serving_img_size

        ckpt = load_checkpoint(checkpoint)
        size, why = serving_img_size(ckpt, None, "IMG_SIZE")
    except Exception as exc:  # the trainer reads it too and says what is wrong
        log.warning("could not read the start model %s to find its size: %s", checkpoint, exc)
        return StartSize(GUESS_SIZE, f"a guess: the start model could not be read ({exc})", guess=True)
    if ckpt.metadata.get("untrained"):  # predicts nothing at any size: compared where it costs least
        return StartSize(settings.train_img_size, f"untrained: compared at TRAIN_IMG_SIZE={settings.train_img_size}")
    if not is_size_guess(why):
        return StartSize(size, why)
    # Measured before on too few images, that measurement; else the guess.
    fallback = StartSize(known.size, known.reason, measured=known) if known is not None else \
        StartSize(GUESS_SIZE, f"{SIZE_GUESS}; {GUESS_HINT}", guess=True)
    mapping = class_map(list(ckpt.names), list(names))
    if mapping is None:
        log.warning("start model %s has classes %s, the label config %s: its size cannot be measured on these "
                    "annotations; it serves at %d (%s)", version, ", ".join(ckpt.names), ", ".join(names),
                    fallback.size, fallback.reason)
        return fallback
    probe = spread(examples, SIZE_PROBE_IMAGES)
    sizes = candidate_sizes(settings)
    (report or (lambda event: None))({"phase": JobPhase.MEASURING, "message": (
        f"measuring the start model at {' and '.join(map(str, sizes))} on {len(probe)} annotated images (it "
        "records no training size)")})
    evaluate = evaluate or functools.partial(evaluate_checkpoint, device=settings.device,
                                             serve_conf=settings.model_score_threshold)
    started = time.monotonic()
    try:
        scores = [score_at(size, evaluate(checkpoint, probe, list(names), size)) for size in sizes]
    except Exception as exc:  # advisory: train anyway
        log.warning("could not measure the start model %s at %s: %s", version, sizes, exc)
        return fallback
    best = best_size(scores)
    if best is None:
        log.info("start model %s: mAP@0.5 %s on %d annotated images, a tie: it serves at %d (%s)", version,
                 ", ".join(f"{s.map50:.3f} at {s.size}" for s in scores), len(probe), fallback.size,
                 fallback.reason)
        return fallback
    measured = MeasuredSize(best.size, tuple(scores), len(probe), version or "", project_id, job_id)
    try:
        record_size(settings.model_dir, checkpoint, measured)
    except OSError as exc:  # compared at the measured size anyway; measured again next time
        log.warning("could not record the measured size of %s in %s: %s", version, settings.model_dir, exc)
    log.info("start model %s serves at %d from now on (%s; in %.0f s; it records no training size, and IMG_SIZE, "
             "when set, wins)", version, best.size, measured.reason, time.monotonic() - started)
    return StartSize(best.size, measured.reason, measured=measured, measured_now=True)


def score_at(size: int, metrics: dict) -> SizeScore:
    from .publish import fitness

    return SizeScore(size, round(float(metrics.get("map50") or 0.0), 4), round(float(metrics.get("map") or 0.0), 4),
                     round(fitness(metrics), 4))


def spread(examples: list[Example], limit: int) -> list[Example]:
    """At most ``limit`` of ``examples``, evenly spaced over their (task id) order: deterministic, not the first
    ones only (tasks imported together tend to look alike)."""
    if len(examples) <= limit:
        return list(examples)
    step = len(examples) / limit
    return [examples[int(i * step)] for i in range(limit)]


def evaluate_checkpoint(checkpoint: str, examples: list[Example], names: list[str], size: int,
                        device: str = "cpu", serve_conf: float = 0.25) -> dict:
    """The default ``SizeEvaluator``: the checkpoint's model evaluated as the engine evaluates (mAP at conf 0.001)
    on ``examples`` at long side ``size`` (images read again at full size where kept smaller), on ``device``
    (DEVICE: ``auto`` is CUDA when there is one)."""
    from ..yolov7.checkpoint import load_checkpoint, model_from_checkpoint
    from ..yolov7.device import select_device
    from ..yolov7.evaluation import evaluate_images

    model = model_from_checkpoint(load_checkpoint(checkpoint), device=str(select_device(device)), fuse=True)
    mapping = class_map(list(model.names), names)
    if mapping is None:
        raise ValueError(f"the checkpoint's classes ({', '.join(model.names)}) are not the labels ({', '.join(names)})")
    return evaluate_images(model, example_eval_set(examples, size, mapping), list(model.names), img_size=size,
                           serve_conf=serve_conf).compute()
