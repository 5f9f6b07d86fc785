"""The steps of benchmarks/gpu_check.py, one per process: ``python benchmarks/gpu_check_steps.py STEP PLAN.json``.

Each step reads the plan (and the data ``prepare`` found or made, work/assets.json), does its checks and writes its
rows to work/rows-STEP.json; what it prints goes to the run's log.txt. The device side is ``plan.device`` (cuda, or
cpu in the dry run, where it runs torch against the CPU's default ONNX Runtime). Bounds, and why:

* fp32 parity: the engine's own bounds (tests/test_model_parity.py): boxes within 1e-3 px, probabilities within
  1e-5, i.e. float32 rounding. On CUDA the row "as served" keeps torch's defaults (cuDNN may run fp32 convolutions
  in TF32, 10-bit mantissa); the row "TF32 off" runs them in IEEE fp32, so a failure says which it is.
* fp16 parity: boxes within 2 px, probabilities within 0.01. fp16 keeps 11 significant bits: the output's own
  rounding is up to 0.125 px at 256-512 px, and ~50 layers of relative rounding 2^-11 add up like a random walk to
  about 0.35 % (1.4 px at 416 px); probabilities (at most 1) stay within a few 1e-3. Measured with fp16 on the CPU
  (the same arithmetic width): 0.47 px and 1.6e-3 on the shared yolov7-tiny checkpoints. 0.01 is a third of the
  0.03 score tolerance of detection-level parity, so fp16 still finds the same boxes (the detect step checks that).
* detect: the shared README's detection-level parity: same label, IoU >= 0.9, score within 0.03, for >= 95 % of
  the boxes both ways.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from gpu_check import Plan, Row, Sizes, Status  # noqa: E402

FP32_BOX_PX, FP32_PROB = 1e-3, 1e-5
FP16_BOX_PX, FP16_PROB = 2.0, 0.01
MATCH_IOU, MATCH_SCORE, MATCH_SHARE = 0.9, 0.03, 0.95
# The paper's figure (YOLOv7, Table 2; WongKinYiu/yolov7): YOLOv7-tiny-SiLU at 640, batch 1, on a V100.
PAPER_TINY = "paper: 286 img/s (YOLOv7-tiny-SiLU, 640, batch 1, V100)"
NAMES = ["fire", "smoke"]
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                '<Label value="fire"/><Label value="smoke"/></RectangleLabels></View>')


class Recorder:
    """The rows of one step, written after each one so that a step killed by its time limit keeps them."""

    def __init__(self, step: str, work: Path):
        self.step, self.path, self.rows = step, work / f"rows-{step}.json", []

    def add(self, check: str, ok: Optional[bool], value: str = "", bound: str = "") -> bool:
        status = Status.SKIP if ok is None else Status.PASS if ok else Status.FAIL
        self.rows.append(Row(self.step, check, status, value, bound))
        print(f"[{self.step}] {status.value.upper()}: {check}: {value}" + (f" (bound {bound})" if bound else ""),
              flush=True)
        self.path.write_text(json.dumps([dict(r.__dict__, status=r.status.value) for r in self.rows], indent=1))
        return bool(ok)


@contextlib.contextmanager
def check(rec: Recorder, name: str):
    """A check whose unexpected error is its failed row (the step goes on with the next check)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any error is this check's failure, reported in the table
        import traceback

        traceback.print_exc()
        rec.add(name, False, f"{type(exc).__name__}: {str(exc)[:300]}")


def add_facts(work: Path, **items: str) -> None:
    path = work / "facts.json"
    facts = json.loads(path.read_text()) if path.is_file() else {}
    facts.update(items)
    path.write_text(json.dumps(facts, indent=1))


def device_label(plan: Plan) -> str:
    return "CUDA" if plan.device == "cuda" else "CPU (torch)"


# --- env --------------------------------------------------------------------------------------------------------

def step_env(plan: Plan, sizes: Sizes, assets: dict, rec: Recorder) -> None:
    import torch

    cuda_build = torch.version.cuda
    rec.add("torch build", bool(cuda_build) or plan.device == "cpu",
            f"torch {torch.__version__}" + (f", CUDA {cuda_build}" if cuda_build else ", no CUDA (CPU build)"),
            "a CUDA build (bootstrap.sh with nvidia-smi present)" if plan.device == "cuda" else "")
    add_facts(Path(plan.work), torch=f"{torch.__version__} (CUDA {cuda_build or 'none'}), "
                                     f"Python {sys.version.split()[0]}")
    if plan.device == "cpu":
        rec.add("CUDA device", None, "dry run on the CPU")
        add_facts(Path(plan.work), device="CPU (dry run)")
        return
    if not rec.add("CUDA device", torch.cuda.is_available(), _cuda_description(torch, Path(plan.work)),
                   "one visible CUDA device"):
        return
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    rec.add("cuDNN", torch.backends.cudnn.is_available(),
            f"cuDNN {torch.backends.cudnn.version()}; fp32 convolutions: "
            f"{conv or ('tf32' if torch.backends.cudnn.allow_tf32 else 'ieee')} (torch's default, as served)")


def _cuda_description(torch, work: Path) -> str:
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False" + ("" if shutil.which("nvidia-smi") else "; no nvidia-smi")
    props = torch.cuda.get_device_properties(0)
    name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor}"
    driver = _nvidia_smi("driver_version")
    add_facts(work, device=name, driver=driver or "?")
    return name + (f", driver {driver}" if driver else "")


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


# --- prepare ----------------------------------------------------------------------------------------------------

def step_prepare(plan: Plan, sizes: Sizes, assets: dict, rec: Recorder) -> None:
    """Find the data under plan.data, build what is missing, write work/assets.json."""
    work, data = Path(plan.work), Path(plan.data) if plan.data else None
    ckpt_dir = data / "yolov7-checkpoints" if data and (data / "yolov7-checkpoints").is_dir() else None
    smoke = data / "fire-smoke" if data and (data / "fire-smoke" / "images").is_dir() else None
    found = {"checkpoints": [], "generated": []}
    if ckpt_dir:
        for ref in sorted(ckpt_dir.glob("*.ref_out.npy")):
            pt = ckpt_dir / (ref.name[:-len(".ref_out.npy")] + ".pt")
            if pt.is_file():
                found["checkpoints"].append({"name": pt.stem, "path": str(pt), "ref_out": str(ref)})
    ref_input = ckpt_dir / "ref_input_1x3x320x416.npy" if ckpt_dir else None
    found["ref_input"] = str(ref_input) if ref_input and ref_input.is_file() else _random_input(work)
    trained = ckpt_dir / "yolov7-tiny_fire-smoke_ref-trained.pt" if ckpt_dir else None
    found["trained_detector"] = bool(trained and trained.is_file())
    _generate_missing_graphs(work, found)
    found["detector"] = str(trained) if found["trained_detector"] else found["generated_tiny"]
    if smoke:
        found.update(_real_images(work, smoke, sizes))
    else:
        found.update(_generated_images(work, sizes))
    (work / "assets.json").write_text(json.dumps(found, indent=1))
    shared = len(found["checkpoints"]) - len(found["generated"])
    what = (f"{shared} shared checkpoint(s) with reference outputs" if shared else "no shared checkpoints") + \
        (f", random {' and '.join(found['generated'])} built here" if found["generated"] else "") + \
        f"; detector: {Path(found['detector']).name}; images: {found['images_source']}"
    add_facts(work, data=f"{plan.data or 'generated'} ({what})")
    rec.add("data", bool(found["checkpoints"] or found["generated"]), what)


def _random_input(work: Path) -> str:
    import numpy as np

    path = work / "input_1x3x320x416.npy"
    np.save(path, np.random.default_rng(0).random((1, 3, 320, 416), dtype=np.float32))
    return str(path)


def _generate_missing_graphs(work: Path, found: dict) -> None:
    """A random checkpoint (BatchNorm statistics randomised too, so fusing has work) for each graph the shared
    files do not cover: yolov7-tiny is always built (the detector when no trained one is given)."""
    import torch

    from yolo_backend.yolov7 import graphs
    from yolo_backend.yolov7.checkpoint import load_checkpoint, save_checkpoint
    from yolo_backend.yolov7.model import build_model

    covered = {load_checkpoint(c["path"]).graph_name for c in found["checkpoints"]}
    for graph in ("yolov7-tiny", "yolov7"):
        if graph in covered and (graph == "yolov7" or found["trained_detector"]):
            continue
        torch.manual_seed(0)
        model = build_model(graphs.get_graph(graph, head="IDetect"), len(NAMES), names=NAMES)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
        # A fixed date: the same bytes every run, so an ONNX export cached under the file's hash is reused.
        path = save_checkpoint(work / f"generated-{graph}.pt", model.eval(), NAMES,
                               {"name": f"generated-{graph}", "saved_at": "2026-01-01T00:00:00+00:00"})
        found["generated_tiny" if graph == "yolov7-tiny" else "generated_big"] = str(path)
        if graph not in covered:
            found["checkpoints"].append({"name": f"generated-{graph}", "path": str(path), "ref_out": None})
            found["generated"].append(graph)


def _real_images(work: Path, smoke: Path, sizes: Sizes) -> dict:
    """The fire-smoke valid images (detect, serve, pool) and training images with labels (fine-tune)."""
    valid = sorted((smoke / "images" / "valid").glob("*.jpg"))
    train = sorted((smoke / "images" / "train").glob("*.jpg"))
    folder = work / "detect-images"
    folder.mkdir(exist_ok=True)
    for image in valid[:sizes.detect_images]:
        shutil.copyfile(image, folder / image.name)
    return {"images_source": f"fire-smoke ({len(valid)} valid, {len(train)} train images)",
            "detect_dir": str(folder), "pool_dir": str(smoke / "images" / "valid"), "dataset": str(smoke),
            "serve_images": [str(p) for p in valid[:sizes.serve_tasks]]}


def _generated_images(work: Path, sizes: Sizes) -> dict:
    """Orange ellipses (fire) and grey blobs (smoke) on noise, 320x240, with YOLO labels in train/ and valid/."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    root = work / "generated"
    counts = {"train": max(sizes.train_images, 8), "valid": max(sizes.val_images, sizes.detect_images, 4)}
    for split, count in counts.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.integers(40, 120, (240, 320, 3), dtype=np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 3))):
                cls = int(rng.integers(0, 2))
                w, h = int(rng.integers(40, 120)), int(rng.integers(30, 100))
                x, y = int(rng.integers(0, 320 - w)), int(rng.integers(0, 240 - h))
                colour = (30, 120, 250) if cls == 0 else (190, 190, 190)  # BGR
                cv2.ellipse(image, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, colour, -1)
                lines.append(f"{cls} {(x + w / 2) / 320:.6f} {(y + h / 2) / 240:.6f} {w / 320:.6f} {h / 240:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{i:03d}.jpg"), image)
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    valid = sorted((root / "images" / "valid").glob("*.jpg"))
    return {"images_source": "generated (no fire-smoke folder)", "detect_dir": str(root / "images" / "valid"),
            "pool_dir": str(root / "images" / "valid"), "dataset": str(root),
            "serve_images": [str(p) for p in valid[:sizes.serve_tasks]]}


# --- parity -----------------------------------------------------------------------------------------------------

def _max_diffs(a, b) -> tuple[float, float]:
    diff = (a.double() - b.double()).abs()
    return float(diff[..., :4].max()), float(diff[..., 4:].max())


@contextlib.contextmanager
def ieee_fp32_convolutions():
    """cuDNN convolutions in IEEE fp32 (TF32 off) for the duration; torch's setting comes back after."""
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        before = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = before
    else:
        before = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = before


def step_parity(plan: Plan, sizes: Sizes, assets: dict, rec: Recorder) -> None:
    import numpy as np
    import torch

    x = torch.from_numpy(np.load(assets["ref_input"]))
    for item in assets["checkpoints"]:
        with check(rec, f"{item['name']}: fp32"):
            _parity_one(plan, item, x, rec)
    if plan.device == "cpu":
        rec.add("fp16 parity", None, "fp16 runs on CUDA only", f"boxes {FP16_BOX_PX:g} px, probabilities "
                                                                f"{FP16_PROB:g}")


def _parity_one(plan: Plan, item: dict, x, rec: Recorder) -> None:
    import numpy as np
    import torch

    from yolo_backend.yolov7.checkpoint import load_model

    bound = f"boxes {FP32_BOX_PX:g} px, probabilities {FP32_PROB:g}"
    with torch.inference_mode():
        cpu = load_model(item["path"], device="cpu")(x).float()
        model = load_model(item["path"], device=plan.device, backend="torch")
        ours = model(x.to(plan.device)).float().cpu()
        strict = None
        if plan.device == "cuda":
            with ieee_fp32_convolutions():
                strict = model(x.to(plan.device)).float().cpu()
    box, prob = _max_diffs(ours, cpu)
    value = f"max |diff| {box:.1e} px, {prob:.1e}"
    if item.get("ref_out"):
        ref = torch.from_numpy(np.load(item["ref_out"]))
        rbox, rprob = _max_diffs(ours, ref)
        value += f" (against the reference: {rbox:.1e} px, {rprob:.1e})"
        box, prob = max(box, rbox), max(prob, rprob)
    rec.add(f"{item['name']}: fp32 {device_label(plan)} as served vs CPU", box < FP32_BOX_PX and prob < FP32_PROB,
            value, bound)
    if strict is not None:
        sbox, sprob = _max_diffs(strict, cpu)
        rec.add(f"{item['name']}: fp32 CUDA, cuDNN TF32 off, vs CPU", sbox < FP32_BOX_PX and sprob < FP32_PROB,
                f"max |diff| {sbox:.1e} px, {sprob:.1e}", bound)
        with torch.inference_mode():
            half = copy.deepcopy(model).half()(x.to(plan.device).half()).float().cpu()
        hbox, hprob = _max_diffs(half, cpu)
        rec.add(f"{item['name']}: fp16 CUDA vs CPU fp32", hbox < FP16_BOX_PX and hprob < FP16_PROB,
                f"max |diff| {hbox:.2f} px, {hprob:.1e}", f"boxes {FP16_BOX_PX:g} px, probabilities {FP16_PROB:g}")


# --- detect -----------------------------------------------------------------------------------------------------

def _detect_cli(plan: Plan, assets: dict, out: Path, *options: str) -> tuple[list[dict], float]:
    """`python -m yolo_backend detect` as a user runs it; its records and the seconds it took."""
    cmd = [sys.executable, "-m", "yolo_backend", "detect", "--weights", assets["detector"], "--source",
           assets["detect_dir"], "--json", str(out), *options]
    if not assets["trained_detector"]:  # a random detector: a low threshold, so that there are boxes to compare
        cmd += ["--conf", "0.01", "--max-det", "30"]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(result.stdout[-2000:] + result.stderr[-4000:], flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"detect {' '.join(options)} exited {result.returncode}: "
                           f"{result.stderr.strip().splitlines()[-1:] or ''}")
    return json.loads(out.read_text()), time.monotonic() - started


def _iou(a: list, b: list) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def found_share(ours: list[dict], theirs: list[dict]) -> tuple[int, int]:
    """(boxes of ``theirs`` with a counterpart in ``ours``, boxes of ``theirs``), image by image: same label,
    IoU >= 0.9, score within 0.03."""
    found = total = 0
    for mine, other in zip(ours, theirs):
        for box in other["boxes"]:
            total += 1
            found += any(o["label"] == box["label"] and abs(o["score"] - box["score"]) <= MATCH_SCORE
                         and _iou(o["xyxy"], box["xyxy"]) >= MATCH_IOU for o in mine["boxes"])
    return found, total


def step_detect(plan: Plan, sizes: Sizes, assets: dict, rec: Recorder) -> None:
    work = Path(plan.work)
    cpu, cpu_s = _detect_cli(plan, assets, work / "detect-cpu.json", "--device", "cpu")
    runs = [("fp32", ["--device", "cuda"] if plan.device == "cuda" else ["--device", "cpu", "--backend", "torch"])]
    runs.append(("fp16", ["--device", "cuda", "--half"]) if plan.device == "cuda" else ("fp16", None))
    bound = f">= {MATCH_SHARE:.0%} both ways (same label, IoU >= {MATCH_IOU}, score within {MATCH_SCORE})"
    for precision, options in runs:
        name = f"detect {precision} on {device_label(plan)} finds the CPU's boxes"
        if options is None:
            rec.add(name, None, "fp16 runs on CUDA only", bound)
            continue
        with check(rec, name):
            ours, seconds = _detect_cli(plan, assets, work / f"detect-{precision}.json", *options)
            same_files = [r["file"] for r in ours] == [r["file"] for r in cpu]
            got, of = found_share(ours, cpu)
            back, back_of = found_share(cpu, ours)
            ok = same_files and of > 0 and got >= MATCH_SHARE * of and back >= MATCH_SHARE * back_of
            value = f"{len(ours)} images: {got}/{of} CPU boxes found, {back}/{back_of} of its boxes on the CPU " \
                    f"({seconds:.0f} s; CPU {cpu_s:.0f} s)"
            if not assets["trained_detector"]:  # a random detector's scores tie: which box NMS keeps is chance
                ok = None if same_files else False
                value = f"ran; not compared (a random detector: no trained checkpoint given); {value}"
            rec.add(name, ok, value, bound)


# --- throughput -------------------------------------------------------------------------------------------------

def step_throughput(plan: Plan, sizes: Sizes, assets: dict, rec: Recorder) -> None:
    import torch

    from bench_detector import interleaved_medians
    from yolo_backend.yolov7.checkpoint import load_model

    device = torch.device(plan.device)
    size, repeats = sizes.bench_size, sizes.bench_repeats
    fp32 = load_model(assets["detector"], device=plan.device, backend="torch")
    for precision in ("fp32", "fp16"):
        for batch in sizes.bench_batches:
            name = f"raw forward {precision}, {size}, batch {batch} (img/s)"
            reference = PAPER_TINY if batch == 1 else ""
            if precision == "fp16" and plan.device != "cuda":
                rec.add(name, None, "fp16 runs on CUDA only", reference)
                continue
            with check(rec, name):
                model = fp32 if precision == "fp32" else copy.deepcopy(fp32).half()
                dtype = torch.float32 if precision == "fp32" else torch.float16
                x = torch.rand(batch, 3, size, size, device=device, dtype=dtype)

                def forward(model=model, x=x):
                    with torch.inference_mode():
                        return model(x)
                seconds = interleaved_medians({"f": forward}, repeats, max(2, repeats // 5), device)["f"]
                rec.add(name, seconds > 0, f"{batch / seconds:.1f} ({seconds * 1000:.2f} ms per batch, median "
                                           f"of {repeats})", reference)
    with check(rec, "Detector pipeline"):
        _pipeline_rate(plan, sizes, assets, fp32, rec)


def _pipeline_rate(plan: Plan, sizes: Sizes, assets: dict, model, rec: Recorder) -> None:
    """The whole Detector (letterbox, forward, decode, NMS) on real images at the largest batch."""
    from yolo_backend.yolov7.detect import Detector
    from yolo_backend.yolov7.preprocess import read_image

    batch = max(sizes.bench_batches)
    paths = sorted(Path(assets["detect_dir"]).glob("*.jpg"))
    images = [read_image(paths[i % len(paths)]) for i in range(batch)]
    for half in ((False, True) if plan.device == "cuda" else (False,)):
        detector = Detector(model if not half else copy.deepcopy(model), img_size=sizes.bench_size, half=half,
                            batch_size=batch)
        detector.detect(images)  # warm-up
        started = time.perf_counter()
        rounds = max(2, sizes.bench_repeats // 5)
        for _ in range(rounds):
            detector.detect(images)
        rate = rounds * batch / (time.perf_counter() - started)
        rec.add(f"Detector.detect {'fp16' if half else 'fp32'}, {sizes.bench_size}, batch {batch} (img/s)", rate > 0,
                f"{rate:.1f} (decoded images: letterbox, forward, decode, NMS)")


# --- finetune ---------------------------------------------------------------------------------------------------

def step_finetune(plan: Plan, sizes: Sizes, assets: dict, rec: Recorder) -> None:
    import torch

    from yolo_backend.yolov7.checkpoint import load_model
    from yolo_backend.yolov7.dataset import AugmentConfig, load_data
    from yolo_backend.yolov7.train import TrainConfig, fine_tune

    spec = load_data(assets["dataset"])
    real = assets["trained_detector"]
    # No augmentation: the same images every epoch, so the loss of a working loop falls from epoch to epoch.
    config = TrainConfig(
        train_samples=spec.train[:sizes.train_images], val_samples=spec.val[:sizes.val_images], names=NAMES,
        weights=assets["detector"] if real else None, width=1.0 if real else 0.25, img_size=sizes.train_size,
        epochs=sizes.train_epochs, batch_size=sizes.train_batch, nominal_batch=sizes.train_batch,
        device=plan.device, out=str(Path(plan.work) / "finetuned.pt"), progress="none", seed=0,
        lr0=0.005 if real else 0.01, warmup_epochs=1.0, warmup_min_iters=0, eval_interval=sizes.train_epochs,
        **asdict(AugmentConfig.none()))  # validated once, after the last epoch
    conv_dtypes: set = set()

    def note_dtype(module, _inputs, output):
        if module.training and isinstance(module, torch.nn.Conv2d) and torch.is_tensor(output):
            conv_dtypes.add(str(output.dtype).replace("torch.", ""))
    hook = torch.nn.modules.module.register_module_forward_hook(note_dtype)
    try:
        result = fine_tune(config)
    finally:
        hook.remove()
    losses = [h["loss"] for h in result.history]
    per_epoch = sum(h["seconds"] for h in result.history) / max(len(result.history), 1)
    rec.add(f"loss falls ({'from the trained checkpoint' if real else 'from random init'}, "
            f"{len(config.train_samples)} images at {sizes.train_size})",
            len(losses) >= 2 and all(map(math.isfinite, losses)) and losses[-1] < losses[0],
            " -> ".join(f"{v:.4f}" for v in losses) + f" over {len(losses)} epochs ({per_epoch:.1f} s/epoch)",
            "last epoch's loss below the first's")
    amp = "float16" in conv_dtypes
    rec.add("AMP: training convolutions ran in fp16", amp if plan.device == "cuda" else None,
            f"convolution outputs in training: {', '.join(sorted(conv_dtypes))}"
            + ("" if plan.device == "cuda" else "; AMP is CUDA only"))
    with check(rec, "the checkpoint loads back"):
        model = load_model(result.path, device=plan.device, backend="torch")
        with torch.inference_mode():
            out = model(torch.rand(1, 3, sizes.train_size, sizes.train_size, device=plan.device))
        m = result.metrics or {}
        rec.add("the checkpoint loads back", list(model.names) == NAMES and out.shape[-1] == 5 + len(NAMES),
                f"{Path(result.path).name}, {Path(result.path).stat().st_size / 2**20:.1f} MiB, classes "
                f"{', '.join(model.names)}; val mAP@0.5 {m.get('map50', float('nan')):.3f}")


# --- serve ------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: Optional[dict] = None, timeout: float = 60.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read()[:300].decode(errors="replace")}


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Server:
    """`python -m yolo_backend serve` on loopback with DEVICE=auto, its output in a file."""

    def __init__(self, plan: Plan, assets: dict):
        self.folder = Path(plan.work) / "serve"
        self.folder.mkdir(exist_ok=True)
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "LABEL_STUDIO_", "MODEL_"))}
        env.update(MODEL_PATH=assets["detector"], MODEL_DIR=str(self.folder / "models"), DEVICE="auto",
                   GUNICORN_ACCESS_LOG="", LOG_LEVEL="INFO", IMAGE_CACHE_DIR=str(self.folder / "cache"))
        self.log_path = self.folder / "serve.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "yolo_backend", "serve", "--host", "127.0.0.1", "--port",
                                      self.url.rsplit(":", 1)[1]], cwd=self.folder, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode} before answering /health")
            with contextlib.suppress(OSError):
                if _http(f"{self.url}/health", timeout=2)[0] == 200:
                    return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(f"no /health answer within {timeout:.0f} s")

    def gunicorn(self) -> tuple[Optional[int], list[int]]:
        """(the gunicorn master's pid, its workers' pids)."""
        from yolo_backend.processes import children_of

        master = next((pid for pid in children_of(self.proc.pid) if "gunicorn" in _cmdline(pid)), None)
        return master, (children_of(master) if master else [])

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        """SIGTERM, as a supervisor stops it; the exit code (None: it had to be killed)."""
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            code = self.proc.returncode
        self._log.close()
        print("----- serve's log (last 150 lines) -----\n"
              + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-150:]), flush=True)
        return code


def _data_uri(path: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _predict_with_health(server: Server, tasks: list[dict]) -> tuple[int, dict, float, list[float]]:
    """POST /predict in a thread and GET /health every 0.1 s while it runs: (status, body, seconds, health
    latencies; a failed /health counts as infinite)."""
    reply: dict = {}

    def predict():
        started = time.monotonic()
        reply["status"], reply["body"] = _http(f"{server.url}/predict", {
            "tasks": tasks, "project": "1.1700000000", "label_config": LABEL_CONFIG}, timeout=300)
        reply["seconds"] = time.monotonic() - started
    thread = threading.Thread(target=predict)
    thread.start()
    latencies = []
    while thread.is_alive():
        started = time.monotonic()
        try:
            ok = _http(f"{server.url}/health", timeout=10)[0] == 200
        except OSError:
            ok = False
        latencies.append(time.monotonic() - started if ok else math.inf)
        time.sleep(0.1)
    thread.join()
    return reply.get("status", 0), reply.get("body", {}), reply.get("seconds", 0.0), latencies


def step_serve(plan: Plan, sizes: Sizes, assets: dict, rec: Recorder) -> None:
    server = Server(plan, assets)
    try:
        seconds = server.wait_healthy(120)
        rec.add("serve answers /health", True, f"after {seconds:.1f} s (broker, worker, gunicorn, model check)")
        tasks = [{"id": i + 1, "data": {"image": _data_uri(p)}} for i, p in enumerate(assets["serve_images"])]
        status, body, took, latencies = _predict_with_health(server, tasks)
        results = body.get("results", []) if isinstance(body, dict) else []
        boxes = sum(len(r.get("result", [])) for r in results)
        rec.add(f"/predict, {len(tasks)} tasks (DEVICE=auto, model loaded by this call)",
                status == 200 and len(results) == len(tasks) and all("result" in r for r in results),
                f"HTTP {status}, {len(results)} predictions, {boxes} boxes, {took:.1f} s")
        worst = max(latencies, default=0.0)
        rec.add("/health during /predict", bool(latencies) and worst <= sizes.health_bound_s,
                f"{len(latencies)} answered, slowest {worst:.2f} s", f"<= {sizes.health_bound_s:g} s each")
        status, _, took, _ = _predict_with_health(server, tasks)
        rec.add("/predict again (model loaded)", status == 200, f"HTTP {status}, {took:.2f} s")
        _check_cuda_rule(plan, server, rec)
    finally:
        code = server.stop()
        rec.add("serve stops on SIGTERM", code == 0, f"exit {code}", "exit 0 within 60 s")


def _check_cuda_rule(plan: Plan, server: Server, rec: Recorder) -> None:
    """CUDA only after the fork: the gunicorn master (and serve itself) never map the CUDA driver (libcuda.so,
    which the first CUDA call loads and nothing unloads, and which a fork would copy into the workers), while the
    worker that answered /predict on a GPU does (the check can see it)."""
    master, workers = server.gunicorn()
    if master is None or not workers:
        rec.add("no CUDA in the gunicorn master", False, f"gunicorn master {master}, workers {workers} not found")
        return
    master_maps, serve_maps = _maps(master), _maps(server.proc.pid)
    clean = bool(master_maps) and "libcuda.so" not in master_maps and "libcuda.so" not in serve_maps
    torch_note = "torch loaded" if "libtorch" in master_maps else "no torch"
    rec.add("no CUDA in the gunicorn master (so none before the fork)", clean,
            f"/proc/{master}/maps: {'no libcuda' if 'libcuda.so' not in master_maps else 'libcuda MAPPED'}, "
            f"{torch_note}; serve (pid {server.proc.pid}): "
            f"{'no libcuda' if 'libcuda.so' not in serve_maps else 'libcuda MAPPED'}", "libcuda.so not mapped")
    in_worker = [pid for pid in workers if "libcuda.so" in _maps(pid)]
    rec.add("CUDA in the gunicorn worker (after the fork)", bool(in_worker) if plan.device == "cuda" else None,
            f"workers {workers}: libcuda mapped in {in_worker or 'none'}"
            + ("" if plan.device == "cuda" else " (dry run: CPU)"), "libcuda.so mapped in the worker")


# --- pool -------------------------------------------------------------------------------------------------------

def step_pool(plan: Plan, sizes: Sizes, assets: dict, rec: Recorder) -> None:
    """benchmarks/bench_pool.py: what a pool-scoring chunk does per task but the POST to Label Studio (HTTP
    download from a loopback server, decode, detect with the embedding, regions, score, cluster)."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_pool.py"), "--weights", assets["detector"],
           "--images", assets["pool_dir"], "--tasks", str(sizes.pool_tasks), "--img-size", str(sizes.pool_size),
           "--bare-images", str(sizes.pool_bare)]
    env = dict(os.environ, DEVICE="auto" if plan.device == "cuda" else "cpu")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    print(result.stdout[-6000:] + result.stderr[-6000:], flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"bench_pool.py exited {result.returncode}")
    pool = re.search(r"\| pool scoring path[^|]*\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
                     result.stdout)
    bare = re.search(r"\| bare detector[^|]*\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", result.stdout)
    failed = re.search(r"(\d+) task\(s\) failed", result.stdout)
    if not (pool and bare and failed):
        raise RuntimeError("bench_pool.py printed no table")
    tasks, rate, fails = int(pool.group(2)), float(pool.group(4)), int(failed.group(1))
    rec.add(f"pool scoring, {sizes.pool_tasks} tasks at {sizes.pool_size} on {plan.device.upper()} (tasks/s)",
            tasks == sizes.pool_tasks and fails == 0 and rate > 0,
            f"{rate:.1f} ({tasks} tasks in {float(pool.group(3)):.0f} s, {fails} failed; bare detector "
            f"{float(bare.group(4)):.1f} img/s at batch 8)", "every task scored")


# --- entry point ------------------------------------------------------------------------------------------------

STEP_FUNCTIONS: dict[str, Callable] = {"env": step_env, "prepare": step_prepare, "parity": step_parity,
                                       "detect": step_detect, "throughput": step_throughput,
                                       "finetune": step_finetune, "serve": step_serve, "pool": step_pool}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in STEP_FUNCTIONS:
        print(f"usage: gpu_check_steps.py {{{','.join(STEP_FUNCTIONS)}}} PLAN.json", file=sys.stderr)
        return 2
    name, plan_path = argv[0], Path(argv[1])
    plan = Plan(**json.loads(plan_path.read_text()))
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan.sizes.items()})
    assets_path = Path(plan.work) / "assets.json"
    assets = json.loads(assets_path.read_text()) if assets_path.is_file() else {}
    rec = Recorder(name, Path(plan.work))
    with check(rec, name):
        STEP_FUNCTIONS[name](plan, sizes, assets, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
