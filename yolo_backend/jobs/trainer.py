"""The trainer seam: ``trainer(data: TrainingData, callback) -> dict``. The default is the fine-tuning engine
(``yolo_backend.yolov7.train``), which also evaluates the current model on the same validation set, at that
model's own serving size (``TrainingData.start_img_size``: jobs/sizing.py). ``train_project(trainer=...)`` takes
another; the tests' workers put a fast fake in its place (tests/fake_worker.py).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from .dataset import DEFAULT_GRAPH, TrainerOutcome, TrainingData, class_map, example_eval_set

log = logging.getLogger(__name__)

JOB_EMA_TAU = 100.0  # EMA decay ramps to its 0.9999 over about this many optimizer steps

def fine_tune_trainer(data: TrainingData, callback: Callable[[dict], None]) -> TrainerOutcome:
    """Fine-tune with ``yolo_backend.yolov7.train`` and evaluate the current model on the same validation set."""
    from ..yolov7.dataset import Sample
    from ..yolov7.train import TrainConfig, fine_tune

    settings = data.settings

    def samples(examples):
        return [Sample(e.image, e.boxes, e.classes, name=f"task-{e.task_id}") for e in examples]

    train, val = samples(data.train), samples(data.val)
    batch = max(1, min(settings.train_batch_size, len(train)))
    # Step after every batch unless TRAIN_NOMINAL_BATCH asks for accumulation: a CPU job sees each image a few
    # times, and every optimizer step counts.
    nominal = max(batch, settings.train_nominal_batch)
    config = TrainConfig(
        weights=data.start_checkpoint, graph=DEFAULT_GRAPH, out=str(data.out_path),
        parent_version=data.parent_version, epochs=max(1, settings.train_epochs), img_size=settings.train_img_size,
        batch_size=batch, nominal_batch=nominal, warmup_epochs=settings.train_warmup_epochs, lr0=settings.train_lr,
        # A job makes a few hundred steps: the reference's EMA ramp (tau 2000 steps) would average nothing.
        ema_tau=JOB_EMA_TAU,
        # The start model is trained: no high bias learning rate at the start to jolt it (the reference's 0.1
        # suits a random init).
        warmup_bias_lr=settings.train_lr if data.start_checkpoint else TrainConfig.warmup_bias_lr,
        device=settings.device, threads=settings.torch_threads, time_budget=settings.train_time_budget_s,
        progress="log", names=list(data.names), train_samples=train, val_samples=val or None,
        serve_conf=settings.model_score_threshold, seed=int(data.extra.get("seed", 0)))
    result = fine_tune(config, callback)
    baseline, fitness_se = evaluate_start_model(data, result.val_images, callback) if val and data.start_checkpoint \
        else (None, None)
    return TrainerOutcome(str(result.path), result.metrics, baseline, fitness_se, result.epochs_run,
                          result.best_epoch, result.stopped_by_budget, round(result.seconds, 1))


def evaluate_start_model(data: TrainingData, new_images, callback: Callable[[dict], None]) \
        -> tuple[Optional[dict], Optional[float]]:
    """(metrics of the start model on the validation split at ``data.start_img_size``, the paired SE of the new
    model's fitness minus its, from ``new_images``: the new model's per-image matches); (None, None) when the two
    cannot be compared (other classes, an unreadable file). Images are read again at full size where the size is
    larger than they are kept (``example_eval_set``)."""
    from ..yolov7.checkpoint import load_checkpoint, model_from_checkpoint
    from ..yolov7.metrics import paired_fitness_se
    from ..yolov7.train import evaluate_images

    settings = data.settings
    size = data.start_img_size or settings.train_img_size
    callback({"phase": "evaluating", "message": f"evaluating the current model on the validation set at {size}"})
    assert data.start_checkpoint is not None  # called only for a run that starts from a checkpoint
    try:
        current = model_from_checkpoint(load_checkpoint(data.start_checkpoint), device="cpu", fuse=True)
        mapping = class_map(list(current.names), list(data.names))
        if mapping is None:
            log.info("the current model's classes (%s) differ from the label config's (%s): not compared",
                     ", ".join(current.names), ", ".join(data.names))
            return None, None
        matched = evaluate_images(current, example_eval_set(data.val, size, mapping), list(current.names),
                                  img_size=size, serve_conf=settings.model_score_threshold)
        fitness_se = paired_fitness_se(new_images, matched) if new_images is not None else None
        return matched.compute(), fitness_se
    except Exception as exc:  # the comparison is advisory; training succeeded
        log.warning("could not evaluate the current model %s: %s", data.start_checkpoint, exc)
        return None, None
