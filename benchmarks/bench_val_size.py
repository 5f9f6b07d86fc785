"""How far a validation mAP measured on n images can be from the same model's mAP on more images: the numbers
behind the dashboard's "too few to say" threshold (``server/status.py`` MIN_VAL_IMAGES).

A real detector (the reference-trained yolov7-tiny of ../shared) is evaluated once on a real validation split
(fire-smoke valid, 47 images, 48 boxes); then, for each n, many random n-image subsets of it are scored
(``DetectionMetrics.subset``: the same matched detections, no second forward pass) and the table prints how far
their mAP@0.5 lies from the mAP@0.5 of all the images: the spread a dashboard number on n images carries. The
whole split is itself a sample, so the real spread is somewhat larger than printed.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_val_size.py [--weights W] [--images DIR] [--draws 400]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from yolo_backend.yolov7.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from yolo_backend.yolov7.dataset import samples_from_folder  # noqa: E402
from yolo_backend.yolov7.evaluation import evaluate_images  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
WEIGHTS = SHARED / "yolov7-checkpoints" / "yolov7-tiny_fire-smoke_ref-trained.pt"
IMAGES = SHARED / "fire-smoke" / "images" / "valid"
SIZES = (1, 2, 3, 5, 8, 10, 15, 20, 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--images", default=str(IMAGES))
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--draws", type=int, default=400)
    args = parser.parse_args()
    if not Path(args.weights).is_file() or not Path(args.images).is_dir():
        sys.exit(f"needs {args.weights} and {args.images} (../shared/data)")
    model = model_from_checkpoint(load_checkpoint(args.weights), device="cpu", fuse=True)
    samples = samples_from_folder(Path(args.images))
    matched = evaluate_images(model, samples, list(model.names), img_size=args.img_size)
    whole = matched.compute()
    print(f"{len(samples)} images, {whole['instances']} boxes: mAP@0.5 {whole['map50']:.3f}, "
          f"mAP@0.5:0.95 {whole['map']:.3f} ({Path(args.weights).name} at {args.img_size})\n")
    print(f"{'n images':>8} {'SD':>7} {'median |dev|':>13} {'90% |dev|':>10} {'share 1.0':>10} {'share 0.0':>10}")
    rng = np.random.default_rng(0)
    for n in SIZES:
        if n >= len(samples):
            continue
        values = []
        for _ in range(args.draws):
            pick = rng.choice(len(samples), n, replace=False)
            values.append(matched.subset(pick).compute()["map50"])
        values = np.array(values)
        deviation = np.abs(values - whole["map50"])
        print(f"{n:>8} {values.std(ddof=1):>7.3f} {np.median(deviation):>13.3f} {np.quantile(deviation, 0.9):>10.3f} "
              f"{np.mean(values >= 0.9995):>10.0%} {np.mean(values <= 0.0005):>10.0%}")


if __name__ == "__main__":
    main()
