"""Pool-scoring speed: tasks/s of the pool-scoring path against the bare detector's images/s on the same images.

The pool path is what a pool-scoring chunk job does for each task apart from storing the prediction in Label
Studio: download the task's image over HTTP (a loopback server here), decode, detect with the backend's detector
settings, keep the embedding from the same forward pass, build the regions and the task score, and assign the
image to a cluster (centroids fitted on the first 1000 embeddings, as a run does). Images are streamed a few
batches at a time; the table shows the peak memory of the process too. The bare detector runs
``Detector.detect`` on images already decoded in memory (batch PREDICT_BATCH_SIZE).

    .venv/bin/python benchmarks/bench_pool.py --tasks 10000 --img-size 640

Storing the predictions (one POST per task, 4 at a time: Label Studio keeps ``cluster`` only through
``/api/predictions``) is measured by the end-to-end test against a real Label Studio and left out here.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_WEIGHTS = REPO.parent / "shared/data/yolov7-checkpoints/yolov7-tiny_fire-smoke_ref-trained.pt"
DEFAULT_IMAGES = REPO.parent / "shared/data/hot-fire/images/train"
LABEL_CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="fire"/><Label value="smoke"/></RectangleLabels></View>"""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve_folder(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="checkpoint (default: the shared yolov7-tiny)")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of images, used in turn as tasks")
    parser.add_argument("--tasks", type=int, default=10000, help="tasks to score (default 10000)")
    parser.add_argument("--img-size", type=int, default=640, help="inference size (default 640)")
    parser.add_argument("--bare-images", type=int, default=200, help="images for the bare detector (default 200)")
    args = parser.parse_args()

    from yolo_backend.clusters import ClusterModel, auto_cluster_count
    from yolo_backend.detector_settings import detector_from_settings
    from yolo_backend.jobs.pool import CLUSTER_SAMPLE, SLICE
    from yolo_backend.predictor import Predictor
    from yolo_backend.runtime import BackendContext
    from yolo_backend.settings import Settings
    from yolo_backend.yolov7.preprocess import read_image

    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        print(f"no images in {args.images}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    settings = Settings.from_env(model_path=args.weights, model_dir=str(work / "models"), img_size=args.img_size,
                                 image_cache_dir=str(work / "image-cache"))

    # The bare detector on decoded images.
    detector = detector_from_settings(args.weights, settings)
    decoded = [read_image(p) for p in images[:args.bare_images]]
    detector.detect(decoded[:settings.predict_batch_size])  # warm-up (and the ONNX export on a first run)
    started = time.perf_counter()
    detector.detect(decoded, conf=settings.score_floor)
    bare_rate = len(decoded) / (time.perf_counter() - started)
    del decoded

    # The pool path: HTTP download, decode, detect + embedding, regions and score, cluster.
    server, url = serve_folder(Path(args.images))
    context = BackendContext.from_settings(settings)
    predictor = Predictor(context)
    tasks = [{"id": i + 1, "data": {"image": f"{url}/{images[i % len(images)].name}?task={i + 1}"}}
             for i in range(args.tasks)]
    predictor.score(1, LABEL_CONFIG, tasks[:SLICE])  # load the model outside the timing, as a worker has it loaded
    rss_before = peak_rss_mb()
    model = None
    sample: list[np.ndarray] = []
    done = failed = 0
    started = time.perf_counter()
    for start in range(0, len(tasks), SLICE):
        _, scored = predictor.score(1, LABEL_CONFIG, tasks[start:start + SLICE])
        embeddings = [s.embedding for s in scored if s.embedding is not None]
        failed += sum(1 for s in scored if "result" not in s.item)
        done += len(scored)
        if model is None:
            sample += embeddings
            if len(sample) >= min(CLUSTER_SAMPLE, len(tasks)):
                model = ClusterModel.fit(np.stack(sample), "bench", k=auto_cluster_count(len(tasks)))
                sample = []
        elif embeddings:
            model.assign(np.stack(embeddings))
        if done % 1000 < SLICE:
            elapsed = time.perf_counter() - started
            print(f"  {done} tasks in {elapsed:.0f} s ({done / elapsed:.1f} tasks/s, peak RSS {peak_rss_mb():.0f} MB)",
                  flush=True)
    elapsed = time.perf_counter() - started
    server.shutdown()
    rate = done / elapsed
    print()
    print("| what | img size | tasks | seconds | tasks/s | vs bare detector | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| bare detector, decoded images, batch {settings.predict_batch_size} | {args.img_size} | "
          f"{args.bare_images} | {args.bare_images / bare_rate:.1f} | {bare_rate:.1f} | 1.00 | |")
    print(f"| pool scoring path (download, decode, detect + embedding, score, cluster) | {args.img_size} | {done} | "
          f"{elapsed:.0f} | {rate:.1f} | {rate / bare_rate:.2f} | {peak_rss_mb():.0f} (before: {rss_before:.0f}) |")
    print(f"\n{failed} task(s) failed; {os.cpu_count()} CPU(s); 10 000 tasks at this rate: "
          f"{10000 / rate / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
