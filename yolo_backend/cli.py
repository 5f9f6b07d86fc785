"""Command line: ``python -m yolo_backend <command> ...``.

Each command is two small functions: ``_add_<name>(subparsers)`` declares its arguments and points
``handler`` at ``_run_<name>(args) -> int``. To add a command, write both and list the adder in ``COMMANDS``.
Heavy imports (torch, the model) happen inside handlers so ``--help`` and light commands stay fast.

Errors a user can fix (bad checkpoint, missing file, bad setting) print one line on stderr and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .logs import configure_logging
from .yolov7.graphs import DEFAULT_GRAPH, GRAPH_NAMES  # plain data: no torch

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the user can fix; its message is printed as is."""


# --- shared helpers ---------------------------------------------------------------------------------------------

def _settings():
    from .settings import Settings

    return Settings.from_env()


def _pick(value, default):
    return default if value is None else value


def _image_paths(source: str) -> list[Path]:
    """A single image file, or the image files of a folder (any depth), sorted by path."""
    from .yolov7.image_files import IMAGE_SUFFIXES, list_images

    path = Path(source)
    if path.is_dir():
        paths = list_images(path)
        if not paths:
            raise CliError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    if path.is_file():
        return [path]
    raise CliError(f"{path}: no such file or folder")


def _require_file(weights: str) -> None:
    if not Path(weights).is_file():
        raise CliError(f"{weights}: no such checkpoint file")


# --- detect -----------------------------------------------------------------------------------------------------

def _add_detect(subparsers) -> None:
    from .settings import INFERENCE_BACKENDS

    p = subparsers.add_parser("detect", help="run a checkpoint on an image or a folder of images",
                              description="Detect objects in an image or a folder of images. Defaults come from "
                                          "the settings (IMG_SIZE, MODEL_SCORE_THRESHOLD, IOU_THRESHOLD, "
                                          "MAX_DETECTIONS, DEVICE, HALF, TORCH_THREADS, PREDICT_BATCH_SIZE).")
    p.add_argument("--weights", required=True, help="checkpoint (.pt), official YOLOv7 or ours")
    p.add_argument("--source", required=True, help="an image file or a folder of images")
    p.add_argument("--img-size", type=int,
                   help="inference size, long side (default: IMG_SIZE, else the size the checkpoint was trained at "
                        "when it records one, else 640)")
    p.add_argument("--conf", type=float, help="confidence threshold (default 0.25)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default 0.45)")
    p.add_argument("--max-det", type=int, help="most boxes per image (default 300)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--half", action="store_true", default=None, help="fp16 inference on CUDA")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 8)")
    p.add_argument("--threads", type=int, help="CPU threads, 0 = auto (default)")
    p.add_argument("--backend", choices=INFERENCE_BACKENDS,
                   help="inference backend (default: INFERENCE_BACKEND, auto = ONNX Runtime on the CPU)")
    p.add_argument("--json", metavar="OUT", help="write the detections as JSON to this file ('-' for stdout)")
    p.set_defaults(handler=_run_detect)


def _run_detect(args) -> int:
    settings = _settings()
    from .detector_settings import detector_from_settings

    _require_file(args.weights)
    paths = _image_paths(args.source)
    detector = detector_from_settings(
        args.weights, settings, conf=_pick(args.conf, settings.model_score_threshold), device=args.device,
        threads=args.threads, backend=args.backend, img_size=args.img_size,
        img_size_setting="--img-size" if args.img_size is not None else None, iou=args.iou, max_det=args.max_det,
        half=args.half, batch_size=args.batch_size)
    records = []
    for path, det in detector.iter_files(paths):
        record = {
            "file": path.name,  # as in the reference detections JSON; "path" has the full path
            "path": str(path),
            "width": det.width,
            "height": det.height,
            "boxes": [{"xyxy": [float(v) for v in box], "label": det.names[int(c)], "class_id": int(c),
                       "score": float(s)} for box, s, c in zip(det.boxes, det.scores, det.labels)],
        }
        records.append(record)
        if args.json is None:
            _print_summary(record)
    if args.json == "-":
        json.dump(records, sys.stdout, indent=1)
        print()
    elif args.json is not None:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1))
        total = sum(len(r["boxes"]) for r in records)
        print(f"{len(records)} image(s), {total} box(es) -> {out}", file=sys.stderr)
    return 0


def _print_summary(record: dict) -> None:
    boxes = record["boxes"]
    print(f"{record['path']} ({record['width']}x{record['height']}): {len(boxes)} box(es)")
    for box in boxes:
        x1, y1, x2, y2 = box["xyxy"]
        print(f"  {box['label']:<12} {box['score']:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")


# --- info -------------------------------------------------------------------------------------------------------

def _add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a checkpoint (graph, head, classes, anchors, strides, the "
                                           "size it was trained at and serves at)")
    p.add_argument("--weights", required=True, help="checkpoint (.pt), official YOLOv7 or ours")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(handler=_run_info)


def _run_info(args) -> int:
    _require_file(args.weights)
    settings = _settings()
    from .detector_settings import serving_size
    from .yolov7.checkpoint import describe, load_checkpoint, model_from_checkpoint, trained_img_size

    ckpt = load_checkpoint(args.weights)
    # Describe the training-form graph: its parameter count is the one users know (fusing folds BN away).
    info = describe(model_from_checkpoint(ckpt, device="cpu", fuse=False))
    info["trained_img_size"] = trained_img_size(ckpt)  # None: not recorded (official YOLOv7 checkpoints)
    # The server's rule: IMG_SIZE, else what a training measured (MODEL_DIR), else the training size, else 640.
    size = serving_size(ckpt, settings)
    info["serve_img_size"], info["serve_img_size_reason"], info["serve_img_size_guess"] = \
        size.size, size.reason, size.guess
    info["serve_img_size_measured"] = size.measured.to_json() if size.measured else None
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"file:       {args.weights}")
    for key, value in info.items():
        if key == "parameters" and isinstance(value, int):
            value = f"{value:,}"
        elif key == "names" and isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        elif key == "strides" and isinstance(value, (list, tuple)):
            value = ", ".join(f"{float(s):g}" for s in value)
        elif key == "anchors" and isinstance(value, (list, tuple)):
            value = _format_anchors(value, info.get("strides"))
        elif key == "trained_img_size":
            key, value = "trained at", value if value is not None else "not recorded"
        elif key == "serve_img_size":
            key, value = "serves at", f"{value} ({info['serve_img_size_reason']})"
        elif key in ("serve_img_size_reason", "serve_img_size_guess", "serve_img_size_measured"):
            continue
        print(f"{key + ':':<11} {value}")
    return 0


def _format_anchors(anchors, strides) -> str:
    """[[[10, 13], [16, 30], ...], ...] -> 'P3/8: 10x13 16x30 33x23 | P4/16: ...' (width x height, pixels)."""
    levels = []
    for i, level in enumerate(anchors):
        try:
            stride = float(strides[i])
            name = f"P{round(math.log2(stride))}/{stride:g}: "
        except (TypeError, IndexError, ValueError):
            name = ""
        levels.append(name + " ".join(f"{float(w):g}x{float(h):g}" for w, h in level))
    return " | ".join(levels)


# --- serve ------------------------------------------------------------------------------------------------------

def _add_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the ML backend HTTP server (gunicorn)",
                              description="Run the Label Studio ML backend server on its settings (environment).")
    p.add_argument("--host", default=None, help="address to bind (default: HOST, else 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port (default: PORT, else 9090)")
    p.set_defaults(handler=_run_serve)


def _run_serve(args) -> int:
    from .serve import ModelCheckFailed, serve

    settings = _settings()
    try:
        return serve(_pick(args.host, settings.host), _pick(args.port, settings.port))
    except ModelCheckFailed as exc:  # the loader's message says what is wrong with which file
        raise CliError(str(exc)) from None


# --- worker -----------------------------------------------------------------------------------------------------

def _add_worker(subparsers) -> None:
    p = subparsers.add_parser("worker", help="run the RQ worker that trains models (training jobs)",
                              description="Run an RQ worker on RQ_QUEUE_NAME at REDIS_URL (or REDIS_HOST/PORT).")
    p.add_argument("--url", help="Redis URL (default: REDIS_URL, else redis://REDIS_HOST:REDIS_PORT/0)")
    p.add_argument("--queue", help="queue name (default: RQ_QUEUE_NAME)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--simple", action="store_true", help="run jobs in this process instead of a forked one")
    p.add_argument("--name", help="worker name (default: generated)")
    p.set_defaults(handler=_run_worker)


def _run_worker(args) -> int:
    from .jobs.worker import run_worker
    settings = _settings()
    configure_logging(settings.log_level)
    run_worker(settings, redis_url=args.url, queue_name=args.queue, burst=args.burst, simple=args.simple,
               name=args.name)
    return 0


# --- score-pool -------------------------------------------------------------------------------------------------

def _add_score_pool(subparsers) -> None:
    p = subparsers.add_parser(
        "score-pool", help="store a prediction of the serving version for every task of a project",
        description="Score every task of a Label Studio project with the version serving it and store one "
                    "prediction per task (regions, task score, image cluster), for sorting and uncertainty "
                    "sampling. Tasks that already have one of this version are skipped. Queues the run for the "
                    "workers (chunk jobs on RQ_QUEUE_NAME), or runs it here with --here.")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--here", action="store_true", help="score in this process instead of queueing for workers")
    p.set_defaults(handler=_run_score_pool)


def _run_score_pool(args) -> int:
    settings = _settings()
    configure_logging(settings.log_level)
    if args.here:
        from .jobs.pool import score_project

        summary = score_project(settings, args.project, "score-pool --here")
    else:
        from .jobs.queue import TrainingQueue

        summary = TrainingQueue.from_settings(settings).request_pool_scoring(args.project, "score-pool command")
        if not summary.get("job"):
            raise CliError(summary.get("message") or f"pool scoring not queued: {summary}")
    print(json.dumps(summary, indent=2, default=str))
    return 0


# --- train / val ----------------------------------------------------------------------------------------------

def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a checkpoint (or a random init) on a YOLO dataset",
                              description="Fine-tune on a YOLO-format dataset (data.yaml or a folder with images/ "
                                          "and labels/) and write our checkpoint format; the best EMA weights on "
                                          "the validation split are kept.")
    p.add_argument("--data", required=True, help="data.yaml or dataset folder")
    p.add_argument("--weights", default=None,
                   help="start checkpoint (ours or official YOLOv7); omit for a random init of --graph")
    p.add_argument("--graph", default=DEFAULT_GRAPH, help=f"graph for a random init (default {DEFAULT_GRAPH}; "
                   f"{', '.join(GRAPH_NAMES)})")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--img-size", type=int, default=640, help="training and validation size (multiple of 32)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--time-budget", type=float, default=None, help="most seconds for the whole run")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: DEVICE setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (0 = in process)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, 0 = auto (default: TORCH_THREADS)")
    p.add_argument("--assigner", choices=["ratio", "ota"], default="ratio", help="target assignment")
    p.add_argument("--no-mosaic", action="store_true", help="turn mosaic (and mixup) off")
    p.add_argument("--onnx", action="store_true", help="also export <out>.onnx")
    p.set_defaults(handler=_run_train)


def _run_train(args) -> int:
    settings = _settings()
    from .yolov7.device import configure_threads, select_device
    from .yolov7.metrics import format_table
    from .yolov7.train import TrainConfig, fine_tune

    if args.weights:
        _require_file(args.weights)
    device = select_device(_pick(args.device, settings.device))
    if device.type == "cpu":
        configure_threads(_pick(args.threads, settings.torch_threads))
    config = TrainConfig(data=args.data, weights=args.weights, graph=args.graph, epochs=args.epochs,
                         img_size=args.img_size, out=args.out, batch_size=args.batch_size,
                         time_budget=args.time_budget, device=str(device), seed=args.seed, workers=args.workers,
                         assigner=args.assigner, export_onnx=args.onnx)
    if args.no_mosaic:
        config.mosaic = config.mixup = 0.0
    try:
        config.validate()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    configure_logging()
    result = fine_tune(config)
    if result.metrics:
        print(format_table(result.metrics))
    print(f"best epoch {result.best_epoch + 1} of {result.epochs_run}, {result.seconds:.0f} s -> {result.path}"
          + (f" (+ {result.onnx_path})" if result.onnx_path else ""))
    return 0


def _add_val(subparsers) -> None:
    p = subparsers.add_parser("val", help="mAP of a checkpoint on a YOLO dataset's validation split",
                              description="Evaluate like the reference test.py (conf 0.001, NMS IoU 0.65): "
                                          "mAP@0.5 and mAP@0.5:0.95 per class, precision/recall at the serving "
                                          "threshold.")
    p.add_argument("--data", required=True, help="data.yaml, dataset folder, or a folder of images (labels beside)")
    p.add_argument("--weights", required=True, help="checkpoint (.pt), official YOLOv7 or ours")
    p.add_argument("--img-size", type=int, default=None,
                   help="evaluation size, long side (default: as detect and the server: IMG_SIZE, else the size the "
                        "checkpoint was trained at when it records one, else 640)")
    p.add_argument("--split", choices=["val", "train"], default="val",
                   help="which split of a dataset with both (a folder of images is used as is)")
    p.add_argument("--conf", type=float, default=0.001)
    p.add_argument("--iou", type=float, default=0.65,
                   help="NMS IoU (0.65: the reference test.py; 0.6: its train.py's per-epoch numbers)")
    p.add_argument("--serve-conf", type=float, default=None,
                   help="threshold for precision/recall (default: MODEL_SCORE_THRESHOLD, 0.25)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: DEVICE setting)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, 0 = auto (default: TORCH_THREADS)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=_run_val)


def _run_val(args) -> int:
    settings = _settings()
    from .yolov7.dataset import load_data
    from .yolov7.device import configure_threads, select_device
    from .yolov7.metrics import format_table
    from .yolov7.train import evaluate

    _require_file(args.weights)
    device = select_device(_pick(args.device, settings.device))
    if device.type == "cpu":
        configure_threads(_pick(args.threads, settings.torch_threads))
    spec = load_data(args.data)
    samples = spec.val if args.split == "val" and spec.val else spec.train
    if args.split == "val" and not spec.val:
        print(f"note: {args.data} has no validation split; evaluating its {len(samples)} images", file=sys.stderr)
    if not samples:
        raise CliError(f"{args.data}: no images to evaluate")
    from .detector_settings import img_size_for
    from .yolov7.checkpoint import inference_model, load_checkpoint

    ckpt = load_checkpoint(args.weights)
    img_size, why = img_size_for(ckpt, settings, args.img_size)
    print(f"evaluating at img_size {img_size} ({why})", file=sys.stderr)
    model = inference_model(ckpt, device=str(device), backend=settings.inference_backend,
                            cache_dir=settings.onnx_cache_dir)
    if len(spec.names) != model.nc:
        raise CliError(f"{args.data} has {len(spec.names)} classes but {args.weights} predicts {model.nc}")
    names = list(model.names) if all(n.startswith("class") for n in spec.names) else spec.names
    metrics = evaluate(model, samples, names, img_size, args.conf, args.iou, batch_size=args.batch_size,
                       serve_conf=_pick(args.serve_conf, settings.model_score_threshold))
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        print(format_table(metrics))
    return 0


# --- simulate ---------------------------------------------------------------------------------------------------

def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_simulate(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="active-learning simulation: label a pool round by round, compare selection strategies",
        description="Pool-based simulation of the training loop: each round trains as the worker does, scores "
                    "the unlabelled pool as the server does, labels the next images a strategy picks and "
                    "evaluates on a test split. Writes OUT/curves.csv, OUT/report.md, OUT/curves.png; a killed "
                    "run resumes from OUT. See docs/active-learning.md.")
    p.add_argument("--pool", required=True, help="data.yaml or dataset folder: its train split is the pool")
    p.add_argument("--test", required=True, help="data.yaml or dataset folder: its val split is the test set")
    p.add_argument("--weights", help="start checkpoint (default: MODEL_PATH; neither: an untrained yolov7-tiny)")
    p.add_argument("--strategies", default="random,default",
                   help="comma-separated: random, default (TASK_SCORE), kcenter, a TASK_SCORE strategy "
                        "(uncertainty, entropy_sum, ...) or one with +kcenter (default: random,default)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--initial", type=int, default=50, help="random labels before the first round (default 50)")
    p.add_argument("--step", type=int, default=50, help="labels added per round (default 50)")
    p.add_argument("--rounds", type=int, default=5, help="rounds after the initial one (default 5)")
    p.add_argument("--time-budget", type=float, help="training seconds per round (default TRAIN_TIME_BUDGET_S)")
    p.add_argument("--epochs", type=int, help="most epochs per round (default TRAIN_EPOCHS)")
    p.add_argument("--img-size", type=int, help="training size (default TRAIN_IMG_SIZE)")
    p.add_argument("--serve-img-size", type=int, help="scoring and test size (default: as the server, IMG_SIZE, "
                   "else the size the model was trained at)")
    p.add_argument("--clusters", choices=("none", "source", "kmeans"), default="none",
                   help="score strategies pick by Label Studio's cluster rule: source: the images of one Roboflow "
                        "source photo form a cluster; kmeans: k-means on the pool's embeddings each round "
                        "(default none)")
    p.add_argument("--cluster-count", type=int,
                   help="kmeans: the number of clusters (default round(sqrt(pool / 2)) within [2, 100])")
    p.add_argument("--progress", choices=("auto", "bar", "log"), default="auto",
                   help="auto: a bar in a terminal, log lines otherwise")
    p.add_argument("--out", required=True, help="output folder (state, models, curves.csv, report.md, curves.png)")
    p.add_argument("--effort-thresholds", default="", metavar="T,T,...",
                   help="also price the annotation effort as if boxes were shown at these confidence thresholds "
                        "(e.g. 0.1,0.25,0.4,0.55): the report's 'Pre-annotation threshold' table says which "
                        "MODEL_SCORE_THRESHOLD costs annotators least (default: none)")
    cost = p.add_argument_group("annotation cost model", "estimated annotator seconds per action, for the report's "
                                "annotation time (sources: docs/active-learning.md, 'Annotation effort')")
    from .annotation_cost import add_cost_arguments  # standard library only at import

    add_cost_arguments(cost)
    p.set_defaults(handler=_run_simulate)


def _run_simulate(args) -> int:
    settings = _settings()
    configure_logging()
    weights = args.weights or settings.model_path
    if weights:
        _require_file(weights)
    try:
        seeds = [int(s) for s in _csv_list(args.seeds)]
    except ValueError:
        raise CliError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if min(args.initial, args.step) < 1 or args.rounds < 0:
        raise CliError("--initial and --step must be at least 1, --rounds at least 0")
    if args.cluster_count is not None and (args.clusters != "kmeans" or args.cluster_count < 1):
        raise CliError("--cluster-count (at least 1) goes only with --clusters kmeans")
    try:
        thresholds = [float(t) for t in _csv_list(args.effort_thresholds)]
    except ValueError:
        raise CliError(f"--effort-thresholds {args.effort_thresholds!r}: expected comma-separated numbers") from None
    from .simulate import SimConfig, Simulation
    from .annotation_cost import cost_from_args

    try:
        cost = cost_from_args(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    config = SimConfig(pool=args.pool, test=args.test, weights=weights, out=args.out,
                       strategies=_csv_list(args.strategies), seeds=seeds, initial=args.initial, step=args.step,
                       rounds=args.rounds, epochs=args.epochs, time_budget=args.time_budget, img_size=args.img_size,
                       serve_img_size=args.serve_img_size, clusters=args.clusters,
                       cluster_count=args.cluster_count, progress=args.progress, cost=cost,
                       effort_thresholds=thresholds)
    try:
        simulation = Simulation(config, settings)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    simulation.run()
    print(f"wrote {Path(args.out) / 'curves.csv'}, {Path(args.out) / 'report.md'}, {Path(args.out) / 'curves.png'}")
    return 0


# --- entry point ------------------------------------------------------------------------------------------------

COMMANDS: list[Callable] = [_add_detect, _add_info, _add_serve, _add_worker, _add_score_pool, _add_train, _add_val,
                             _add_simulate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m yolo_backend",
                                     description="YOLOv7 Label Studio ML backend and detector tools.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message alone tells the user what to fix."""
    from .settings import SettingsError

    errors: list[type[BaseException]] = [CliError, SettingsError, FileNotFoundError, PermissionError]
    if "yolo_backend.yolov7.checkpoint" in sys.modules:
        errors.append(sys.modules["yolo_backend.yolov7.checkpoint"].CheckpointError)
    for name, attr in (("yolo_backend.yolov7.preprocess", "ImageReadError"),
                       ("yolo_backend.yolov7.device", "DeviceError"),
                       ("yolo_backend.yolov7.dataset", "DatasetError")):
        if name in sys.modules:
            errors.append(getattr(sys.modules[name], attr))
    return tuple(errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if args.debug:
            raise
        if isinstance(exc, _user_errors()):
            print(f"error: {exc}", file=sys.stderr)
        else:
            print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE
