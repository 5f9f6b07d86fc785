"""Detector speed: median latency at batch 1 (640² and 320²) and throughput at batch 8 (640²).

Measures the module ``load_model`` returns by default (raw forward on a random tensor) and, on the CPU, each
inference backend beside it (ONNX Runtime, torch channels_last, torch plain NCHW eager), plus the full ``Detector``
pipeline (letterbox, forward, decode, NMS, scale-back on a real photo when ../shared is there) for the default
module; on CUDA too when present. Fair measurement on a shared machine: warm-up runs first, the candidates timed
round-robin in one process (one call each per round), ``torch.inference_mode``, CUDA synchronised, medians.
The default backend follows INFERENCE_BACKEND (auto: ONNX Runtime on the CPU).

    .venv/bin/python benchmarks/bench_detector.py --weights path/to/best.pt

The comparison column is the reference implementation (WongKinYiu/yolov7, fused fp32, torch eager) measured on a
2-core CPU machine: yolov7-tiny 236 ms and yolov7 954 ms at 640², batch 1. On other machines compare with the
"vs eager" column instead (plain torch eager of the same graph, measured in the same run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from yolo_backend.yolov7.checkpoint import load_model  # noqa: E402
from yolo_backend.yolov7.detect import Detector  # noqa: E402
from yolo_backend.yolov7.device import configure_threads, select_device  # noqa: E402
from yolo_backend.yolov7.preprocess import read_image  # noqa: E402

# The reference implementation, 640², batch 1, measured on a 2-core CPU machine.
REFERENCE_CPU_MS = {"yolov7-tiny": 236.0, "yolov7": 954.0}
SAMPLE_IMAGE = REPO.parent / "shared/data/fire-smoke/images/valid"


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                        device: torch.device) -> Dict[str, float]:
    """Median seconds per candidate, timed round-robin (one call of each per round) so that load from other
    processes on a shared machine hits every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            _timed(fn, device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def graph_family(model: torch.nn.Module, weights: Path) -> Optional[str]:
    """'yolov7-tiny' or 'yolov7' (for the reference column), from the model's graph name or the file name."""
    name = str(getattr(model, "graph_name", "") or weights.name).lower()
    if "tiny" in name:
        return "yolov7-tiny"
    if name.startswith("yolov7") and not any(tag in name for tag in ("w6", "e6", "d6", "x")):
        return "yolov7"
    return None


def sample_image(size: int) -> np.ndarray:
    """A real photo resized to size x size when the shared data is there, else deterministic noise."""
    import cv2

    photos = sorted(SAMPLE_IMAGE.glob("*.jpg")) if SAMPLE_IMAGE.is_dir() else []
    if photos:
        return cv2.resize(read_image(photos[0]), (size, size), interpolation=cv2.INTER_LINEAR)
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def candidate_models(weights: Path, device: torch.device, half: bool) -> Dict[str, torch.nn.Module]:
    """What is compared: the module ``load_model`` returns by default, and each backend explicitly.

    On the CPU: ONNX Runtime, torch (channels_last, what backend="torch" gives) and torch in the plain NCHW
    layout (the eager baseline). On CUDA: torch only (fp16 with --half).
    """
    models: Dict[str, torch.nn.Module] = {}
    default = load_model(weights, device=str(device))
    models[f"load_model() default [{getattr(default, 'backend', 'torch')}]"] = default
    if device.type == "cpu":
        if getattr(default, "backend", "torch") != "onnxruntime":
            ort_model = load_model(weights, device="cpu", backend="onnxruntime")
            if getattr(ort_model, "backend", "torch") == "onnxruntime":
                models["onnxruntime"] = ort_model
        models["torch (channels_last)"] = load_model(weights, device="cpu", backend="torch")
        models["torch (NCHW eager)"] = load_model(weights, device="cpu", backend="torch").to(
            memory_format=torch.contiguous_format)
    elif half:
        models = {name + " fp16": model.half() for name, model in models.items()}
    return models


def bench_device(weights: Path, device: torch.device, repeats: int, warmup: int, half: bool) -> list[dict]:
    models = candidate_models(weights, device, half)
    dtype = torch.float16 if half and device.type == "cuda" else torch.float32

    def raw(model: torch.nn.Module, batch: int, size: int) -> Callable[[], object]:
        x = torch.rand(batch, 3, size, size, device=device, dtype=dtype)

        def forward():
            with torch.inference_mode():
                return model(x)
        return forward

    def pipeline(model: torch.nn.Module, batch: int, size: int) -> Callable[[], object]:
        detector = Detector(model, img_size=size, conf=0.25, iou=0.45, half=half, device=device, batch_size=8)
        images = [sample_image(size)] * batch
        return lambda: detector.detect(images)

    default_name, default_model = next(iter(models.items()))
    # name -> (what, function maker) ; the full pipeline only for the default module
    candidates = [(f"{name}: raw forward", model, raw) for name, model in models.items()]
    candidates.append((f"{default_name}: Detector pipeline", default_model, pipeline))
    few = max(3, repeats // 3)
    b1_640 = interleaved_medians({n: make(m, 1, 640) for n, m, make in candidates}, repeats, warmup, device)
    b1_320 = interleaved_medians({n: make(m, 1, 320) for n, m, make in candidates}, repeats, warmup, device)
    b8_640 = interleaved_medians({n: make(m, 8, 640) for n, m, make in candidates}, few, 1, device)

    family = graph_family(default_model, weights)
    rows = []
    for name, _, _ in candidates:
        row = {"what": name, "b1_640": b1_640[name], "b1_320": b1_320[name], "b8_640": b8_640[name],
               "device": f"{device.type}" + (" fp16" if dtype == torch.float16 else "")}
        if device.type == "cpu" and family in REFERENCE_CPU_MS:
            row["reference_ms"] = REFERENCE_CPU_MS[family]
        rows.append(row)
    return rows


EAGER_BASELINE = "torch (NCHW eager): raw forward"


def print_table(rows: list[dict]) -> None:
    """One line per candidate. ``ratio`` divides by the reference's published latency (another run, another load);
    ``vs eager`` divides by the plain NCHW torch eager forward of the same graph timed in this run: the same
    computation as the reference's fused fp32 eager forward, so it estimates the side-by-side ratio."""
    width = max(36, max(len(row["what"]) for row in rows))
    eager = {row["device"]: row for row in rows if row["what"] == EAGER_BASELINE}
    header = (f"{'device':<9} {'what':<{width}} {'640² b1 ms':>10} {'320² b1 ms':>10} {'640² b8 img/s':>13} "
              f"{'ref 640² b1 ms':>14} {'ratio':>6} {'vs eager':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ms640 = row["b1_640"] * 1000
        ref = row.get("reference_ms")
        ref_text = f"{ref:14.0f}" if ref else f"{'-':>14}"
        ratio_text = f"{ms640 / ref:6.2f}" if ref else f"{'-':>6}"
        base = eager.get(row["device"])
        eager_text = f"{row['b1_640'] / base['b1_640']:8.2f}" if base else f"{'-':>8}"
        print(f"{row['device']:<9} {row['what']:<{width}} {ms640:10.1f} {row['b1_320'] * 1000:10.1f} "
              f"{8 / row['b8_640']:13.1f} {ref_text} {ratio_text} {eager_text}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (CPU, plus CUDA when present)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = auto")
    parser.add_argument("--half", action="store_true", help="fp16 on CUDA")
    args = parser.parse_args(argv)

    threads = configure_threads(args.threads)
    if args.device == "auto":
        devices = [torch.device("cpu")] + ([select_device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [select_device(args.device)]
    print(f"weights: {args.weights}  torch {torch.__version__}  CPU threads: {threads}  "
          f"repeats: {args.repeats} (median)  warm-up: {args.warmup}")
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name(0)}")
    rows = []
    for device in devices:
        rows += bench_device(args.weights, device, args.repeats, args.warmup, args.half)
    print_table(rows)
    print("ref column: the reference implementation measured on a 2-core CPU machine; ratio = ours / that "
          "(meaningful on such a machine only). vs eager = ours / plain torch eager of the same graph in this run "
          "(the reference's computation), comparable on any machine and under load.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
