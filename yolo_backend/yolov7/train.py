"""Fine-tuning: one ``TrainConfig`` holding every setting, plain ``train_one_epoch`` / ``evaluate`` functions and
``fine_tune(config, callback) -> TrainResult`` (head transfer: transfer.py; evaluation: evaluation.py).

The recipe is the reference's (yolov7-tiny scratch hyper-parameters, facts only, written for this project):
SGD with Nesterov momentum in three parameter groups (weight decay on conv weights only; BatchNorm weights,
implicit parameters and biases without), warmup then a cosine (or linear) decay to ``lr0 * lrf``, gradients
accumulated to a nominal batch of 64, EMA weights evaluated and saved, AMP on CUDA only.

What differs for small data sets: the warmup is ``max(warmup_epochs x iterations per epoch, warmup_min_iters)``
but at most half of the run (the reference's fixed minimum of 1000 iterations would be the whole job), the EMA
ramp constant is a setting, and a time budget bounds a job: after each epoch the schedule is re-planned to the
number of epochs that fit, so the learning rate still decays to its end value within the budget.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
from torch import nn

from . import graphs
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .dataset import (AugmentConfig, DataSpec, DatasetError, EvalSet, Sample, TrainingSet, check_classes, collate,
                      load_data)
from .device import configure_threads, select_device
from .ema import ModelEMA
from .evaluation import evaluate, evaluate_images  # noqa: F401  (evaluate: used by callers of this module)
from .layers import ImplicitA, ImplicitM
from .loss import LossGains, YoloLoss
from .metrics import DetectionMetrics, fitness
from .model import YOLOv7, build_model
from .transfer import same_names, transfer_weights

log = logging.getLogger(__name__)

Callback = Callable[[Dict[str, Any]], None]


@dataclass
class TrainConfig(AugmentConfig):
    """Every setting of a fine-tuning run. Defaults: the reference's yolov7-tiny scratch recipe.

    The augmentation settings (hsv_h/s/v, degrees, translate, scale, shear, flipud, fliplr, mosaic, mixup) are
    inherited from ``AugmentConfig`` and the loss gains take ``LossGains``' defaults, so each default is written
    in one place.
    """

    # --- what to train on and from ---
    data: Optional[str] = None            # data.yaml or dataset folder (or give train_samples/val_samples)
    weights: Optional[str] = None         # start checkpoint (ours or reference); None = random init of `graph`
    graph: str = graphs.DEFAULT_GRAPH     # graph for random init
    width: float = 1.0                    # channel width multiplier for random init (small test graphs)
    out: Optional[str] = None             # checkpoint to write (atomically); None = do not save
    export_onnx: bool = False             # also write <out>.onnx
    parent_version: Optional[str] = None  # recorded in the checkpoint's metadata
    # --- run size ---
    epochs: int = 30
    img_size: int = 640
    batch_size: int = 16
    nominal_batch: int = 64               # gradients are accumulated up to this many images per step
    workers: int = 0
    device: str = "auto"
    threads: int = 0                      # CPU threads; 0 = leave torch's setting as it is
    seed: int = 0
    time_budget: Optional[float] = None   # seconds for the whole run (training, evaluation, saving)
    cache: bool = True                    # keep decoded, resized images in RAM
    # --- optimiser and schedule ---
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_min_iters: int = 50
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    schedule: str = "cosine"              # cosine | linear
    amp: bool = True                      # mixed precision, CUDA only
    # --- loss ---
    box: float = LossGains.box
    obj: float = LossGains.obj
    cls: float = LossGains.cls
    obj_pw: float = LossGains.obj_pw
    cls_pw: float = LossGains.cls_pw
    anchor_t: float = LossGains.anchor_t
    label_smoothing: float = LossGains.label_smoothing
    iou_ratio: float = LossGains.iou_ratio
    assigner: str = "ratio"               # ratio (reference ComputeLoss) | ota (OTA-style dynamic-k)
    # --- EMA ---
    ema: bool = True
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    # --- evaluation ---
    eval_interval: int = 1                # evaluate every N epochs (and always after the last)
    eval_conf: float = 0.001
    eval_iou: float = 0.65
    eval_batch_size: int = 8
    eval_pad: float = 0.5                 # reference test loader: input = image at img_size + 0.5 stride, rounded up
    serve_conf: float = 0.25              # precision/recall are reported at this threshold
    val_fraction: float = 0.0             # with no validation split: hold out this fraction of train
    progress: str = "auto"                # auto (bar on a terminal, log lines otherwise) | bar | log | none
    # --- in-memory data (not saved in the checkpoint's settings) ---
    names: Optional[List[str]] = None
    train_samples: Optional[List[Sample]] = field(default=None, repr=False)
    val_samples: Optional[List[Sample]] = field(default=None, repr=False)

    def augment_config(self) -> AugmentConfig:
        return AugmentConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AugmentConfig)})

    def loss_gains(self) -> LossGains:
        return LossGains(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossGains)})

    def settings(self) -> Dict[str, Any]:
        """The plain settings (for the checkpoint's metadata and logs)."""
        skip = {"train_samples", "val_samples"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.img_size < 32 or self.img_size % 32:
            raise ValueError("epochs and batch_size must be >= 1 and img_size a positive multiple of 32 "
                             f"(got {self.epochs}, {self.batch_size}, {self.img_size})")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule {self.schedule!r}: use cosine or linear")
        if self.assigner not in ("ratio", "ota"):
            raise ValueError(f"assigner {self.assigner!r}: use ratio or ota")
        if self.progress not in ("auto", "bar", "log", "none"):
            raise ValueError(f"progress {self.progress!r}: use auto, bar, log or none")
        if self.data is None and not self.train_samples:
            raise ValueError("nothing to train on: set data (a data.yaml or folder) or train_samples")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be positive seconds, got {self.time_budget}")


@dataclass
class TrainResult:
    path: Optional[Path]                   # checkpoint written (None when config.out is None)
    onnx_path: Optional[Path]
    metrics: Optional[Dict[str, Any]]      # of the kept (best) weights; None without validation data
    best_epoch: int
    epochs_run: int
    stopped_by_budget: bool
    seconds: float
    history: List[Dict[str, Any]]
    names: List[str]
    model: YOLOv7 = field(repr=False)      # the kept weights, unfused, eval mode, on CPU
    val_images: Optional[DetectionMetrics] = field(default=None, repr=False)  # the kept weights' per-image matches


# --------------------------------------------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------------------------------------------

def scale_graph_width(graph: Dict[str, Any], factor: float, divisor: int = 8) -> Dict[str, Any]:
    """A copy of ``graph`` with every conv's output channels times ``factor`` (rounded up to ``divisor``)."""
    if factor == 1.0:
        return copy.deepcopy(graph)
    scaled = copy.deepcopy(graph)
    for layer in scaled["layers"]:
        if layer[1] in ("conv", "repconv", "sppcspc"):
            layer[2] = max(divisor, int(math.ceil(layer[2] * factor / divisor) * divisor))
    scaled["name"] = f"{graph['name']}-w{factor:g}"
    return scaled


def prepare_model(config: TrainConfig, names: Sequence[str]) -> Tuple[YOLOv7, Dict[str, Any]]:
    """The training-form model to start from, and a description of where it came from (for the metadata).

    * no weights: random init of ``config.graph`` (width-scaled by ``config.width``);
    * a training-graph checkpoint with the same classes: loaded as is;
    * otherwise (deploy graph, other classes): ``transfer.transfer_weights`` into the training graph.
    """
    nc = len(names)
    if not config.weights:
        graph = scale_graph_width(graphs.get_graph(config.graph), config.width)
        model = build_model(graph, nc, names=names)
        log.info("starting from random init of %s (%d classes)", graph["name"], nc)
        return model, {"start": "random", "graph": graph["name"]}
    ckpt = load_checkpoint(config.weights)
    origin = {"start": "checkpoint", "weights": str(config.weights), "source": ckpt.source,
              "graph": ckpt.graph_name, "head": ckpt.head_type, "names": list(ckpt.names)}
    if ckpt.source == "yolo-backend" and ckpt.metadata.get("name"):
        origin["version"] = ckpt.metadata["name"]
    if same_names(ckpt.names, names) and ckpt.head_type == "IDetect":
        model = model_from_checkpoint(ckpt, device="cpu", fuse=False)
        model.names = list(names)
        log.info("starting from %s (%s, same classes)", config.weights, ckpt.graph_name)
        return model, origin
    model, transfer = transfer_weights(ckpt, names)
    origin.update(transfer)
    return model, origin


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD, Nesterov, three groups: 0 = BN weights and implicit parameters (no decay), 1 = other weights
    (decay), 2 = biases (no decay; they get the warmup bias learning rate)."""
    modules = dict(model.named_modules())
    no_decay, decay, biases = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = modules.get(name.rsplit(".", 1)[0]) if "." in name else model
        if name.endswith(".bias"):
            biases.append(param)
        elif isinstance(owner, (nn.BatchNorm2d, ImplicitA, ImplicitM)):
            no_decay.append(param)
        else:
            decay.append(param)
    optimizer = torch.optim.SGD(no_decay, lr=lr, momentum=momentum, nesterov=True)
    optimizer.add_param_group({"params": decay, "weight_decay": weight_decay})
    optimizer.add_param_group({"params": biases})
    return optimizer


# --------------------------------------------------------------------------------------------------------------
# Loop state, schedule, progress
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LoopState:
    """What the loop carries between iterations and epochs."""

    iterations_per_epoch: int
    warmup_iterations: int
    accumulate: int              # batches per optimiser step now (ramps up during warmup)
    full_accumulate: int         # ... and after warmup: nominal_batch / batch_size
    planned_epochs: int
    iteration: int = 0           # global, over all epochs
    last_step: int = -1
    deadline: Optional[float] = None  # time.monotonic() after which the epoch stops early
    stopped: bool = False


def lr_factor(epoch: float, epochs: int, lrf: float, schedule: str) -> float:
    """Multiplier of lr0 at ``epoch`` of ``epochs``: 1 -> lrf, cosine or linear."""
    x = min(max(epoch / max(epochs, 1), 0.0), 1.0)
    if schedule == "linear":
        return (1 - x) * (1.0 - lrf) + lrf
    return ((1 - math.cos(x * math.pi)) / 2) * (lrf - 1) + 1


def warmup_iterations(config: TrainConfig, iterations_per_epoch: int) -> int:
    """max(warmup_epochs x iterations/epoch, warmup_min_iters), at most half the planned iterations."""
    if config.warmup_epochs <= 0:
        return 0
    wanted = max(round(config.warmup_epochs * iterations_per_epoch), config.warmup_min_iters)
    return int(min(wanted, max(1, config.epochs * iterations_per_epoch // 2)))


def _set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, state: LoopState, epoch: int) -> None:
    """Epoch learning rate, and during warmup the ramps (bias lr down from warmup_bias_lr, others up from 0,
    momentum up from warmup_momentum, accumulation up from 1 to the nominal batch)."""
    target = config.lr0 * lr_factor(epoch, state.planned_epochs, config.lrf, config.schedule)
    i, nw = state.iteration, state.warmup_iterations
    if i < nw:
        state.accumulate = max(1, int(np.interp(i, [0, nw], [1, state.full_accumulate]).round()))
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(np.interp(i, [0, nw], [config.warmup_bias_lr if j == 2 else 0.0, target]))
            group["momentum"] = float(np.interp(i, [0, nw], [config.warmup_momentum, config.momentum]))
    else:
        state.accumulate = state.full_accumulate
        for group in optimizer.param_groups:
            group["lr"] = target
            group["momentum"] = config.momentum


class Progress:
    """tqdm bar on a terminal, else a log line every ~10% of an epoch; always the callback."""

    def __init__(self, mode: str, callback: Optional[Callback]):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.callback = mode, callback
        self.bar = None

    def emit(self, event: Dict[str, Any]) -> None:
        if self.callback is not None:
            try:
                self.callback(dict(event))
            except Exception:  # noqa: BLE001 - a reporting failure must not kill training
                log.exception("training callback failed")

    def start_epoch(self, epoch: int, epochs: int, total: int) -> None:
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr)

    def step(self, event: Dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{event['loss']:.3f}", lr=f"{event['lr']:.4f}", refresh=False)
            self.bar.update(1)
        elif self.mode == "log":
            every = max(1, event["iterations"] // 10)
            if (event["iteration"] + 1) % every == 0 or event["iteration"] + 1 == event["iterations"]:
                log.info("train epoch=%d/%d iter=%d/%d loss=%.4f box=%.4f obj=%.4f cls=%.4f lr=%.5f elapsed=%.1fs",
                         event["epoch"] + 1, event["epochs"], event["iteration"] + 1, event["iterations"],
                         event["loss"], event["box"], event["obj"], event["cls"], event["lr"], event["elapsed"])
        self.emit(event)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------------------------------------------
# One epoch (evaluation: evaluation.py)
# --------------------------------------------------------------------------------------------------------------

def train_one_epoch(model: YOLOv7, loader, optimizer: torch.optim.Optimizer, loss_fn: YoloLoss,
                    config: TrainConfig, state: LoopState, epoch: int, device: torch.device,
                    ema: Optional[ModelEMA] = None, scaler: Optional[torch.amp.GradScaler] = None,
                    progress: Optional[Progress] = None, started: Optional[float] = None) -> Dict[str, float]:
    """Train for one pass over ``loader``; returns the mean losses {"box", "obj", "cls", "loss"}."""
    model.train()
    use_amp = scaler is not None and scaler.is_enabled()
    sums = torch.zeros(4)
    seen = 0
    started = time.monotonic() if started is None else started
    if progress is not None:
        progress.start_epoch(epoch, state.planned_epochs, state.iterations_per_epoch)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(loader):
        _set_lr(optimizer, config, state, epoch)
        images = images.to(device, non_blocking=True).float() / 255.0
        with torch.autocast(device_type=device.type, enabled=use_amp):
            predictions = model(images)
        loss, parts = loss_fn(predictions, targets.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, iteration {i + 1}; "
                                     "lower lr0 or check the labels")
        if use_amp and scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if state.iteration - state.last_step >= state.accumulate:
            if use_amp and scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            state.last_step = state.iteration
        state.iteration += 1
        sums += parts.cpu()
        seen += 1
        if progress is not None:
            means = (sums / seen).tolist()
            progress.step({"phase": "train", "epoch": epoch, "epochs": state.planned_epochs, "iteration": i,
                           "iterations": state.iterations_per_epoch, "box": means[0], "obj": means[1],
                           "cls": means[2], "loss": means[3], "lr": optimizer.param_groups[1]["lr"],
                           "elapsed": time.monotonic() - started})
        if state.deadline is not None and time.monotonic() > state.deadline:
            state.stopped = True
            break
    if progress is not None:
        progress.end_epoch()
    means = (sums / max(seen, 1)).tolist()
    return {"box": means[0], "obj": means[1], "cls": means[2], "loss": means[3]}


# --------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _data(config: TrainConfig) -> DataSpec:
    if config.train_samples:
        names = config.names
        if not names:
            top = max((int(s.classes.max()) for s in config.train_samples if len(s.classes)), default=0)
            names = [f"class{i}" for i in range(top + 1)]
        spec = DataSpec(list(names), list(config.train_samples), list(config.val_samples or []))
    else:
        assert config.data is not None  # TrainConfig asks for data or train_samples
        spec = load_data(config.data)
        if config.names:
            if len(config.names) != len(spec.names):
                raise DatasetError(f"{config.data}: {len(spec.names)} classes but names gives {len(config.names)}")
            spec.names = list(config.names)
    if not spec.train:
        raise DatasetError(f"{spec.source}: no training images")
    check_classes(spec.train, len(spec.names), f"{spec.source} (train)")
    check_classes(spec.val, len(spec.names), f"{spec.source} (val)")
    if not spec.val and config.val_fraction > 0 and len(spec.train) > 1:
        order = np.random.default_rng(config.seed).permutation(len(spec.train))
        n_val = max(1, int(round(len(spec.train) * config.val_fraction)))
        spec.val = [spec.train[i] for i in sorted(order[:n_val])]
        spec.train = [spec.train[i] for i in sorted(order[n_val:])]
    return spec


@dataclass
class _Run:
    """One fine-tuning run's parts, made by ``_setup``."""

    config: TrainConfig
    started: float
    device: torch.device
    progress: "Progress"
    spec: DataSpec
    names: List[str]
    origin: Any
    model: YOLOv7
    train_set: TrainingSet
    eval_set: Optional[EvalSet]
    loader: Any
    loss_fn: YoloLoss
    optimizer: torch.optim.Optimizer
    ema: Optional[ModelEMA]
    scaler: Any
    state: LoopState

    @property
    def kept_model(self) -> YOLOv7:
        """The weights kept: the EMA's when there is one."""
        return cast(YOLOv7, self.ema.ema) if self.ema is not None else self.model  # the EMA copies the model


@dataclass
class _Best:
    """The best epoch so far by validation fitness (its weights on the CPU; None: keep the last weights)."""

    fitness: float = -1.0
    state: Optional[Dict[str, torch.Tensor]] = None
    metrics: Optional[Dict[str, Any]] = None
    epoch: int = -1
    images: Any = None


def fine_tune(config: TrainConfig, callback: Optional[Callback] = None) -> TrainResult:
    """Train ``config.weights`` (or a random init) on ``config``'s data; keep the best EMA weights by validation
    fitness (the last ones without validation data); write them to ``config.out`` when set.

    ``callback(dict)`` receives progress events: phase "setup", "train" (per iteration: epoch, iteration,
    loss parts, lr), "eval" (epoch, metrics), "done" (metrics, path).
    """
    run = _setup(config, callback)
    history, best = _train_epochs(run)
    return _finish(run, history, best)


def _setup(config: TrainConfig, callback: Optional[Callback]) -> _Run:
    """Seed, threads, device, data, model, loader, loss, optimiser, EMA, AMP and the loop's state."""
    started = time.monotonic()
    config.validate()
    seed_everything(config.seed)
    if config.threads > 0:
        configure_threads(config.threads)
    device = select_device(config.device)
    progress = Progress(config.progress, callback)
    progress.emit({"phase": "setup", "message": "reading data"})
    spec = _data(config)
    names = list(spec.names)
    model, origin = prepare_model(config, names)
    model = model.to(device).train()
    train_set = TrainingSet(spec.train, config.img_size, config.augment_config(), config.seed, config.cache)
    eval_set = EvalSet(spec.val, config.img_size, config.cache) if spec.val else None
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, num_workers=config.workers, collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed), persistent_workers=config.workers > 0,
        pin_memory=device.type == "cuda")
    accumulate = max(round(config.nominal_batch / config.batch_size), 1)
    weight_decay = config.weight_decay * config.batch_size * accumulate / config.nominal_batch
    use_amp = config.amp and device.type == "cuda"
    state = LoopState(iterations_per_epoch=len(loader), warmup_iterations=warmup_iterations(config, len(loader)),
                      accumulate=accumulate, full_accumulate=accumulate, planned_epochs=config.epochs)
    log.info("training %d images (%d negatives), validating on %d, %d classes (%s), img %d, batch %d "
             "(accumulate %d), %d iterations/epoch, warmup %d iterations, device %s", len(spec.train),
             sum(1 for s in spec.train if len(s.classes) == 0), len(spec.val), len(names), ", ".join(names),
             config.img_size, config.batch_size, accumulate, len(loader), state.warmup_iterations, device)
    return _Run(config, started, device, progress, spec, names, origin, model, train_set, eval_set, loader,
                YoloLoss.for_model(model, config.loss_gains(), config.img_size, config.assigner),
                build_optimizer(model, config.lr0, config.momentum, weight_decay),
                ModelEMA(model, config.ema_decay, config.ema_tau) if config.ema else None,
                torch.amp.GradScaler(device.type, enabled=use_amp) if use_amp else None, state)


def _train_epochs(run: _Run) -> Tuple[List[Dict[str, Any]], _Best]:
    """The epochs, within the time budget (re-planned after each epoch from the last epochs' times); returns
    each epoch's record and the best one."""
    config, state = run.config, run.state
    history: List[Dict[str, Any]] = []
    best = _Best()
    epoch_seconds: List[float] = []
    eval_seconds = 0.0
    save_reserve = 5.0 + (10.0 if config.export_onnx else 0.0)
    for epoch in range(config.epochs):
        epoch_start = time.monotonic()
        if config.time_budget is not None:
            left = config.time_budget - (epoch_start - run.started) - save_reserve
            if epoch_seconds:
                fits = int(left // float(np.mean(epoch_seconds[-3:])))
                if fits < 1:
                    break
                # Re-plan the schedule so the learning rate reaches its end value within the budget.
                state.planned_epochs = min(config.epochs, epoch + fits)
            state.deadline = run.started + config.time_budget - save_reserve - eval_seconds
        run.train_set.set_epoch(epoch)
        losses = train_one_epoch(run.model, run.loader, run.optimizer, run.loss_fn, config, state, epoch, run.device,
                                 run.ema, run.scaler, run.progress, run.started)
        last = state.stopped or epoch + 1 >= state.planned_epochs
        record: Dict[str, Any] = {"epoch": epoch, **losses}
        if run.eval_set is not None and ((epoch + 1) % config.eval_interval == 0 or last):
            eval_start = time.monotonic()
            record["metrics"] = _evaluate_epoch(run, epoch, best)
            eval_seconds = time.monotonic() - eval_start
        elif run.eval_set is None:
            best.epoch, best.state = epoch, None  # the last weights are kept
        record["seconds"] = time.monotonic() - epoch_start
        epoch_seconds.append(record["seconds"])
        history.append(record)
        _say_epoch(run, epoch, record, losses)
        if last:
            break
    return history, best


def _evaluate_epoch(run: _Run, epoch: int, best: _Best) -> Dict[str, Any]:
    """Validation of the kept weights after ``epoch``; ``best`` takes them when their fitness is the best yet."""
    config = run.config
    assert run.eval_set is not None  # called only when there is a validation set
    run.progress.emit({"phase": "eval", "epoch": epoch, "epochs": run.state.planned_epochs, "message": "evaluating"})
    matched = evaluate_images(run.kept_model, run.eval_set, run.names, config.img_size, config.eval_conf,
                              config.eval_iou, batch_size=config.eval_batch_size, serve_conf=config.serve_conf,
                              pad=config.eval_pad)
    metrics = matched.compute()
    score = fitness(metrics)
    if score > best.fitness:
        best.fitness, best.metrics, best.epoch, best.images = score, metrics, epoch, matched
        best.state = {k: v.detach().to("cpu", copy=True) for k, v in run.kept_model.state_dict().items()}
    return metrics


def _say_epoch(run: _Run, epoch: int, record: Dict[str, Any], losses: Dict[str, float]) -> None:
    m = record.get("metrics")
    log.info("epoch %d/%d done in %.1fs: loss %.4f%s", epoch + 1, run.state.planned_epochs, record["seconds"],
             losses["loss"], f", mAP@.5 {m['map50']:.4f} mAP@.5:.95 {m['map']:.4f}" if m else "")
    run.progress.emit({"phase": "epoch", "epoch": epoch, "epochs": run.state.planned_epochs,
                       **{k: record[k] for k in ("box", "obj", "cls", "loss")}, "metrics": m,
                       "seconds": record["seconds"], "elapsed": time.monotonic() - run.started})


def _finish(run: _Run, history: List[Dict[str, Any]], best: _Best) -> TrainResult:
    """The kept weights (the best epoch's), saved with their metadata (and exported) when ``config.out`` is set."""
    config, state = run.config, run.state
    epochs_run = len(history)
    stopped = state.stopped or epochs_run < config.epochs
    final = copy.deepcopy(run.kept_model).cpu().eval()
    if best.state is not None:
        final.load_state_dict(best.state)
    path = onnx_path = None
    if config.out:
        metadata = {"kind": "fine-tuned", "metrics": best.metrics, "best_epoch": best.epoch,
                    "epochs_run": epochs_run, "stopped_by_budget": stopped,
                    "seconds": round(time.monotonic() - run.started, 1),
                    "parent": config.parent_version or run.origin, "origin": run.origin, "data": run.spec.source,
                    "train_images": len(run.spec.train), "val_images": len(run.spec.val),
                    "training": config.settings()}
        path = save_checkpoint(config.out, final, run.names, metadata,
                               weights="ema" if run.ema is not None else "model")
        log.info("saved %s", path)
        if config.export_onnx:
            onnx_path = export(final, Path(config.out).with_suffix(".onnx"), config.img_size)
    seconds = time.monotonic() - run.started
    run.progress.emit({"phase": "done", "metrics": best.metrics, "best_epoch": best.epoch, "epochs_run": epochs_run,
                       "path": str(path) if path else None, "elapsed": seconds})
    return TrainResult(path, onnx_path, best.metrics, best.epoch, epochs_run, stopped, seconds, history,
                       list(run.names), final, best.images)


def export(model: YOLOv7, path: Union[str, Path], img_size: int = 640) -> Optional[Path]:
    """ONNX export of a fused copy (export.py); None (logged) when the export fails (e.g. onnx not installed)."""
    from .export import export_onnx

    fused = copy.deepcopy(model).cpu().eval().fuse()
    try:
        return export_onnx(fused, path, img_size=(img_size, img_size))
    except Exception as exc:  # noqa: BLE001 - the checkpoint is the product; the ONNX file is a convenience
        log.warning("ONNX export failed: %s", exc)
        return None
