"""What each MODEL_SCORE_THRESHOLD would cost an annotator on a labelled set: the evidence behind its default.

One checkpoint predicts every image of a labelled split once, as the server does (``SCORE_FLOOR``, NMS, the serving
size); then, for each threshold, the boxes at or above it are what the annotator is shown, and the rule that measures
real annotations (``labelstudio.effort.match_boxes``) counts what the annotator does to reach the ground truth:
accept (IoU >= 0.9), adjust (0.5-0.9), delete (a shown box left over), draw (a true box left over). The simulator's
cost model (``annotation_cost.CostModel``, sources in docs/active-learning.md) turns the counts into minutes, against
drawing every box from scratch. No training: it prices one model's pre-annotations, so it answers "which threshold
for a model of this quality", not "which strategy" (that is ``simulate --effort-thresholds``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_threshold_effort.py \\
        [--data ../shared/data/fire-smoke] [--split val] [--weights W] [--img-size 320] [--thresholds 0.1,0.25,...] \\
        [--draw-s 7 --adjust-s 3.5 --delete-s 1 --accept-s 1.6 --image-s 3]

Ground-truth class ids are read as the model's classes (the YOLO convention: the same ids), so a dataset without
class names works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from yolo_backend.settings import Settings  # noqa: E402
from yolo_backend.annotation_cost import add_cost_arguments, cost_from_args  # noqa: E402
from yolo_backend.simulate.effort import effort_at_thresholds, truth_boxes  # noqa: E402
from yolo_backend.simulate.scoring import score_images, serving_detector  # noqa: E402
from yolo_backend.yolov7.dataset import load_data  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
WEIGHTS = SHARED / "yolov7-checkpoints" / "yolov7-tiny_fire-smoke_ref-trained.pt"
DATA = SHARED / "fire-smoke"
THRESHOLDS = "0.05,0.1,0.15,0.25,0.35,0.45,0.55,0.7"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA), help="data.yaml or dataset folder")
    parser.add_argument("--split", choices=("val", "train", "test"), default="val")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--img-size", type=int, default=320, help="serving size (IMG_SIZE)")
    parser.add_argument("--thresholds", default=THRESHOLDS, help=f"comma-separated (default {THRESHOLDS})")
    add_cost_arguments(parser.add_argument_group("cost model"))
    args = parser.parse_args()
    if not Path(args.weights).is_file() or not Path(args.data).exists():
        sys.exit(f"needs {args.weights} and {args.data} (../shared/data)")
    settings = Settings.from_env(img_size=args.img_size, device="cpu")
    thresholds = sorted(float(t) for t in args.thresholds.split(","))
    if thresholds[0] < settings.score_floor:
        sys.exit(f"thresholds below SCORE_FLOOR ({settings.score_floor:g}) see no boxes the server keeps")
    samples = getattr(load_data(args.data), args.split)
    detector = serving_detector(args.weights, settings)
    detections, _ = score_images(detector, [s.load_image for s in samples])
    names = list(detections[0].names) if detections else []
    truth = [truth_boxes(s.boxes, s.classes, names, d.width, d.height) for s, d in zip(samples, detections)]
    cost = cost_from_args(args)
    counted = effort_at_thresholds(detections, truth, thresholds)
    scratch = cost.scratch_seconds(next(iter(counted.values())))
    boxes = sum(len(t) for t in truth)
    print(f"{args.data} ({args.split}): {len(samples)} images, {boxes} true boxes; {Path(args.weights).name} at "
          f"{args.img_size}; cost model (s): draw {cost.draw_s:g}, adjust {cost.adjust_s:g}, delete "
          f"{cost.delete_s:g}, accept {cost.accept_s:g}, per image {cost.image_s:g}. From scratch: "
          f"{scratch / 60:.1f} min\n")
    print("| threshold | shown / image | accepted | adjusted | deleted | drawn | minutes | × from scratch |")
    print("|---|---|---|---|---|---|---|---|")
    for threshold, effort in counted.items():
        shown = effort.accepted + effort.adjusted + effort.deleted
        seconds = cost.seconds(effort)
        print(f"| {threshold:g} | {shown / max(len(samples), 1):.2f} | {effort.accepted} | {effort.adjusted} | "
              f"{effort.deleted} | {effort.drawn} | {seconds / 60:.1f} | {seconds / scratch:.2f} |")


if __name__ == "__main__":
    main()
