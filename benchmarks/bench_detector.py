"""Detector speed: median latency at batch 1 (640² and 320²) and throughput at batch 8 (640²).

Measures the module ``load_model`` returns (raw forward on a random tensor) and the full ``Detector`` pipeline
(letterbox, forward, decode, NMS, scale-back on a real photo when ../shared is there), on the CPU and on CUDA when
present. Fair measurement: warm-up runs first, ``torch.inference_mode``, CUDA synchronised, the median reported.

    python benchmarks/bench_detector.py --weights ../shared/data/yolov7-checkpoints/yolov7-tiny_fire-smoke_ref-trained.pt

The comparison column is the reference implementation (fused fp32, torch eager) on the project's 2-core machine,
as given in the issue: yolov7-tiny 236 ms and yolov7 954 ms at 640², batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from yolo_backend.yolov7.checkpoint import load_model  # noqa: E402
from yolo_backend.yolov7.detect import Detector  # noqa: E402
from yolo_backend.yolov7.device import configure_threads, select_device  # noqa: E402
from yolo_backend.yolov7.preprocess import read_image  # noqa: E402

# Reference implementation, 640², batch 1, on the 2-core CPU machine (from the issue).
REFERENCE_CPU_MS = {"yolov7-tiny": 236.0, "yolov7": 954.0}
SAMPLE_IMAGE = REPO.parent / "shared/data/fire-smoke/images/valid"


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    def run() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(repeats))


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


def bench_device(weights: Path, device: torch.device, repeats: int, warmup: int, half: bool) -> list[dict]:
    model = load_model(weights, device=str(device))
    dtype = torch.float16 if half and device.type == "cuda" else torch.float32
    if dtype == torch.float16:
        model = model.half()
    rows = []

    def raw(batch: int, size: int) -> Callable[[], object]:
        x = torch.rand(batch, 3, size, size, device=device, dtype=dtype)

        def forward():
            with torch.inference_mode():
                return model(x)
        return forward

    rows.append({
        "what": "load_model module (raw forward)",
        "b1_640": median_seconds(raw(1, 640), repeats, warmup, device),
        "b1_320": median_seconds(raw(1, 320), repeats, warmup, device),
        "b8_640": median_seconds(raw(8, 640), max(3, repeats // 3), max(1, warmup // 2), device),
    })

    def pipeline(batch: int, size: int) -> Callable[[], object]:
        detector = Detector(model, img_size=size, conf=0.25, iou=0.45, half=half, device=device, batch_size=8)
        images = [sample_image(size)] * batch
        return lambda: detector.detect(images)

    rows.append({
        "what": "Detector pipeline (letterbox..NMS)",
        "b1_640": median_seconds(pipeline(1, 640), repeats, warmup, device),
        "b1_320": median_seconds(pipeline(1, 320), repeats, warmup, device),
        "b8_640": median_seconds(pipeline(8, 640), max(3, repeats // 3), max(1, warmup // 2), device),
    })
    for row in rows:
        row["device"] = f"{device.type}" + (" fp16" if dtype == torch.float16 else "")
    family = graph_family(model, weights)
    if device.type == "cpu" and family in REFERENCE_CPU_MS:
        for row in rows:
            row["reference_ms"] = REFERENCE_CPU_MS[family]
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'device':<9} {'what':<36} {'640² b1 ms':>10} {'320² b1 ms':>10} {'640² b8 img/s':>13} "
              f"{'ref 640² b1 ms':>14} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ms640 = row["b1_640"] * 1000
        ref = row.get("reference_ms")
        ref_text = f"{ref:14.0f}" if ref else f"{'-':>14}"
        ratio_text = f"{ms640 / ref:6.2f}" if ref else f"{'-':>6}"
        print(f"{row['device']:<9} {row['what']:<36} {ms640:10.1f} {row['b1_320'] * 1000:10.1f} "
              f"{8 / row['b8_640']:13.1f} {ref_text} {ratio_text}")


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
    print("reference column: the reference implementation on the project's 2-core CPU machine (from the issue); "
          "ratio = ours / reference, goal <= 0.5 for the load_model module.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
