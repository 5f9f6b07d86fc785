"""The acceptance scenario "the whole loop with a real Label Studio 1.23.2", as a user would run it.

Label Studio in its default JWT-only mode (the API key is a personal access token); our backend started exactly
as the README says (`python -m yolo_backend serve --host 127.0.0.1 --port P`, embedded broker: no REDIS_URL);
a fire/smoke project with 50 uploaded photos and one large non-square photo given by URL. We connect,
retrieve predictions for every task, check that sorting by prediction score works without a manual step, turn on
"start training on annotation submission", submit a dozen annotations (fast saves), wait for a new version that
the project switches to and that new predictions carry, watch /health the whole time, and finally SIGTERM
`serve` and check that nothing is left behind.

Settings changed from the defaults: only IMAGE_CACHE_DIR and ONNX_CACHE_DIR, moved into the test's tmp folder
(defaults ./data/... under the repository root): the same behaviour (fresh caches, as on a first start), nothing
written into the checkout. Training runs on its defaults (TRAIN_EPOCHS 30, TRAIN_TIME_BUDGET_S 300, TRAIN_IMG_SIZE
320, TRAIN_BATCH_SIZE 8): on a dozen annotations the epoch limit ends a job in well under a minute on 2 cores, so
the CI time stays bounded without touching them. Inference too (IMG_SIZE unset: the reference checkpoint, which
records no training size, serves at 640 until the first training measures it, TORCH_THREADS auto), and gunicorn,
TRAINING_ACTIONS, FORCE_PUBLISH (off), POOL_SCORING (on: the worker also scores every task after each publish),
MIN_ANNOTATIONS_FIRST_TRAINING (10: requests before the tenth annotation end as "waiting").
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from yolo_backend.processes import descendants

from . import harness
from .test_ls_predict import ordered_scores
from .test_training_loop import yolo_result

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAVE_LIMIT_S = 1.5          # each annotation save, as the annotator waits for it
HEALTH_LIMIT_S = 1.0        # Label Studio's /health timeout
PUBLISH_TIMEOUT_S = 600     # the acceptance allows 15 minutes on 2 cores; generous but finite
SYNC_TIMEOUT_S = 90         # the project's model_version following the backend's
LARGE_SIZE = (2000, 1125)   # the non-square photo given by URL


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def acceptance_images(shared_data, tmp_path_factory):
    """40 train photos (37 with boxes, 3 without any), 10 valid photos to upload, and a 2000x1125 photo by URL.

    Returns (upload paths, served folder, served names, {file name: YOLO annotation result}).
    """
    import cv2

    root = shared_data / "fire-smoke"
    label_of = lambda split, photo: root / "labels" / split / (photo.stem + ".txt")  # noqa: E731
    train = sorted((root / "images" / "train").glob("*.jpg"))
    valid = sorted((root / "images" / "valid").glob("*.jpg"))
    positives = [p for p in train if label_of("train", p).is_file() and label_of("train", p).read_text().strip()]
    negatives = [p for p in train if label_of("train", p).is_file() and not label_of("train", p).read_text().strip()]
    assert len(positives) >= 37 and len(negatives) >= 3 and len(valid) >= 47, f"{root}: too few images"
    folder = tmp_path_factory.mktemp("acceptance-images")
    upload_dir, served = folder / "upload", folder / "served"
    upload_dir.mkdir()
    served.mkdir()
    every = min(18, len(positives) // 37)   # spread over the real set's 717 positives; the generated set has 100
    chosen = positives[::every][:37] + negatives[:3] + valid[0:40:4]
    results = {photo.name: yolo_result(label_of("train", photo)) for photo in chosen[:40]}
    upload = [Path(shutil.copy(photo, upload_dir / photo.name)) for photo in chosen]
    # A large non-square photo from a real one (not among the uploads): true size 2000x1125.
    image = cv2.imread(str(valid[46]))
    cv2.imwrite(str(served / "large_2000x1125.jpg"), cv2.resize(image, LARGE_SIZE, interpolation=cv2.INTER_CUBIC),
                [cv2.IMWRITE_JPEG_QUALITY, 90])
    return upload, served, ["large_2000x1125.jpg"], results


# ---------------------------------------------------------------------------------------------------------------
# watching the backend
# ---------------------------------------------------------------------------------------------------------------

class HealthWatch:
    """Poll GET /health from a thread, as Label Studio does (timeout 1 s), and remember every answer's time."""

    def __init__(self, url: str, interval: float = 0.5):
        self.url, self.interval = url, interval
        self.seconds: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = requests.get(f"{self.url}/health", timeout=10)
                if response.status_code != 200:
                    self.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except requests.RequestException as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.seconds.append(time.monotonic() - started)
            self._stop.wait(self.interval)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    def check(self) -> None:
        assert not self.failures, f"/health failed {len(self.failures)} time(s): {self.failures[:5]}"
        slow = [round(s, 2) for s in self.seconds if s >= HEALTH_LIMIT_S]
        assert not slow, f"{len(slow)} of {len(self.seconds)} /health answers took >= {HEALTH_LIMIT_S} s: {slow[:20]}"


def served_version(url: str, project_id: int) -> str:
    return requests.get(f"{url}/versions", params={"project": project_id}, timeout=10).json()["model_version"]


def check_predictions(api, tasks: dict[int, Path], sizes: dict[int, tuple[int, int]], version: str) -> int:
    """One prediction per task with `version`, finite scores, well-formed regions on the true image size."""
    regions = 0
    for task_id, path in tasks.items():
        predictions = api.predictions(task_id)
        assert len(predictions) == 1, f"task {task_id} ({path.name}): {len(predictions)} predictions stored"
        prediction = predictions[0]
        assert prediction["model_version"] == version, (path.name, prediction["model_version"], version)
        assert isinstance(prediction["score"], float) and math.isfinite(prediction["score"]), prediction
        width, height = sizes[task_id]
        for region in prediction["result"]:
            assert (region["from_name"], region["to_name"], region["type"]) == ("label", "image",
                                                                                 "rectanglelabels"), region
            assert (region["original_width"], region["original_height"]) == (width, height), (path.name, region)
            value = region["value"]
            assert value["rectanglelabels"] in (["fire"], ["smoke"]), region
            assert math.isfinite(region["score"]) and 0 <= region["score"] <= 1, region
            for key in ("x", "y", "width", "height"):
                assert math.isfinite(value[key]) and 0 <= value[key] <= 100, region
            assert value["width"] > 0 and value["height"] > 0, region
            assert value["x"] + value["width"] <= 100 + 1e-6 and value["y"] + value["height"] <= 100 + 1e-6, region
        regions += len(prediction["result"])
    return regions


def sorted_scores(api, project_id: int, task_ids) -> list | None:
    """The scores of `task_ids` in the Data Manager's ascending prediction-score order, if all non-null."""
    wanted = set(task_ids)
    listed = [(t, s) for t, s in ordered_scores(api, project_id) if t in wanted]
    scores = [s for _, s in listed]
    if len(listed) != len(wanted) or any(s is None for s in scores):
        return None
    return scores


def process_table(pids: list[int]) -> dict[int, str]:
    """{pid: command line} of the processes in `pids` that exist now (zombies count as gone)."""
    table = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if state != b"Z":
            table[pid] = cmdline
    return table


# ---------------------------------------------------------------------------------------------------------------
# the scenario
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_studio", ["jwt"], indirect=True)
def test_acceptance_whole_loop(label_studio, acceptance_images, detector_checkpoint, tmp_path_factory):
    import cv2

    upload, served, served_names, annotation_of = acceptance_images
    timings: dict[str, float] = {}
    api = label_studio.api
    assert not label_studio.legacy_tokens and label_studio.api_key == label_studio.personal_access_token

    with harness.StaticFileServer(served) as image_server:
        project = api.create_project("fire/smoke acceptance", harness.FIRE_SMOKE_LABEL_CONFIG)
        project_id = project["id"]
        tasks = harness.import_images(api, project_id, upload, image_server, served_names)
        assert len(tasks) == 51
        sizes = {}
        for task_id, path in tasks.items():
            image = cv2.imread(str(path))
            sizes[task_id] = (image.shape[1], image.shape[0])
        assert LARGE_SIZE in sizes.values()

        workdir = tmp_path_factory.mktemp("acceptance-backend")
        env = {
            "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.api_key,
            "MODEL_PATH": str(detector_checkpoint), "MODEL_DIR": str(workdir / "models"),
            "REDIS_URL": "", "REDIS_HOST": "",  # whatever our own environment says: the embedded broker
            "IMAGE_CACHE_DIR": str(workdir / "image-cache"), "ONNX_CACHE_DIR": str(workdir / "onnx-cache"),
        }
        argv = [sys.executable, "-m", "yolo_backend", "serve", "--host", "127.0.0.1", "--port", "{port}"]
        started = time.monotonic()
        backend, url = harness.start_backend(workdir, env, argv=argv, name="serve")
        timings["backend start"] = time.monotonic() - started
        try:
            with HealthWatch(url) as health:
                run_scenario(api, project_id, url, tasks, sizes, annotation_of, backend, timings)
            # What the loop left in the registry: the newest version learned from all 12 annotations.
            from yolo_backend.registry import Registry

            meta = Registry.for_project(env["MODEL_DIR"], project_id).latest().meta()
            assert (meta["annotations"], meta["negatives"], meta["labels"]) == (12, 3, ["fire", "smoke"]), meta
            health.check()
            timings["health answers max"] = max(health.seconds)
            timings["health answers"] = len(health.seconds)

            # SIGTERM `serve` (only it: its children run in their own sessions) and check nothing is left.
            tree = process_table(descendants(backend.pid))
            names = " ".join(tree.values())
            assert "valkey-server" in names and "gunicorn" in names and "yolo_backend worker" in names, tree
            started = time.monotonic()
            os.kill(backend.pid, signal.SIGTERM)
            code = backend.proc.wait(timeout=90)
            timings["stop"] = time.monotonic() - started
            assert code == 0, f"serve exited with {code} after SIGTERM\n{backend.log_tail(40)}"
            time.sleep(1)
            left = {pid: cmd for pid, cmd in process_table(list(tree)).items() if tree[pid] == cmd}
            assert not left, f"processes left behind after serve stopped: {left}"
        finally:
            backend.stop()
    print("\n[acceptance] " + ", ".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}"
                                        for k, v in timings.items()))


def run_scenario(api, project_id, url, tasks, sizes, annotation_of, backend, timings) -> None:
    # Connect the model in Label Studio, as in Settings -> Model -> Connect Model.
    ml = api.connect_ml_backend(project_id, url, "yolov7")
    first_version = served_version(url, project_id)
    assert first_version.startswith("yolov7-tiny_fire-smoke_ref-trained-"), first_version
    assert ml["model_version"] == first_version, ml

    # Data Manager -> select all (the header checkbox: "all", nothing excluded) -> Retrieve Predictions.
    started = time.monotonic()
    api.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
             json={"selectedItems": {"all": True, "excluded": []}})
    timings["predictions for 51 tasks"] = time.monotonic() - started
    regions = check_predictions(api, tasks, sizes, first_version)
    assert regions > 0, "the reference-trained checkpoint found nothing on the 51 fire/smoke photos"
    timings["regions"] = regions

    # Without any manual step, sorting by prediction score gives non-null ascending scores.
    started = time.monotonic()
    scores = harness.wait_until(lambda: sorted_scores(api, project_id, tasks), SYNC_TIMEOUT_S, interval=1,
                                message="non-null prediction scores when sorting by score (project model_version "
                                        f"{api.project(project_id)['model_version']!r}, backend {first_version!r})")
    assert scores == sorted(scores), scores
    assert api.project(project_id)["model_version"] == first_version
    timings["score sort usable after"] = time.monotonic() - started

    # Settings -> Model -> "Start model training on annotation submission".
    api.update_project(project_id, start_training_on_annotation_update=True)
    assert api.project(project_id)["start_training_on_annotation_update"] is True

    # A dozen annotations: 9 with boxes from the photos' YOLO labels, 3 empty (photos without fire or smoke).
    with_boxes = [t for t, p in tasks.items() if annotation_of.get(p.name)][:9]
    empty = [t for t, p in tasks.items() if p.name in annotation_of and not annotation_of[p.name]]
    assert len(with_boxes) == 9 and len(empty) == 3
    annotated = with_boxes[:3] + empty[:1] + with_boxes[3:6] + empty[1:2] + with_boxes[6:] + empty[2:]
    save_seconds = []
    for task_id in annotated:
        started = time.monotonic()
        api.create_annotation(task_id, annotation_of[tasks[task_id].name], lead_time=5.0)
        save_seconds.append(time.monotonic() - started)
    last_save = time.monotonic()
    timings["annotation save max"] = max(save_seconds)
    assert max(save_seconds) < SAVE_LIMIT_S, f"annotation saves took {[round(s, 2) for s in save_seconds]}"

    # A new version is published, the project switches to it.
    def new_version():
        assert backend.alive(), f"serve died\n{backend.log_tail(80)}"
        version = served_version(url, project_id)
        return version if version != first_version else None

    version = harness.wait_until(new_version, PUBLISH_TIMEOUT_S, interval=2, message="a new model version")
    timings["last annotation -> new version served"] = time.monotonic() - last_save
    harness.wait_until(lambda: api.project(project_id)["model_version"] == version, SYNC_TIMEOUT_S, interval=1,
                       message=f"the project's model_version == {version}")
    timings["last annotation -> project switched"] = time.monotonic() - last_save

    # Newly retrieved predictions carry it (Data Manager -> the unlabelled tasks -> Retrieve Predictions).
    unlabelled = [t for t in tasks if t not in annotated]
    started = time.monotonic()
    api.retrieve_predictions(project_id, unlabelled)
    timings["predictions for 39 unlabelled tasks"] = time.monotonic() - started
    for task_id in unlabelled:
        versions = [p["model_version"] for p in api.predictions(task_id)]
        assert version in versions, (task_id, versions)
    scores = harness.wait_until(lambda: sorted_scores(api, project_id, unlabelled), SYNC_TIMEOUT_S, interval=1,
                                message="non-null scores of the new version when sorting")
    assert scores == sorted(scores), scores

    # Label Studio's view of the model (Settings -> Model): connected, its versions list has the new one.
    state = api.get(f"/api/ml/{ml['id']}")
    assert state["state"] == "CO", state
    ls_versions = api.get(f"/api/ml/{ml['id']}/versions")
    assert version in str(ls_versions), ls_versions

    # Let a coalesced follow-up job (triggered by the later saves) finish, so SIGTERM meets an idle worker.
    def idle():
        status = requests.get(f"{url}/is_training", params={"project": project_id}, timeout=10).json()
        return not (status.get("is_training") or status.get("waiting_job")
                    or status.get("status") in ("queued", "started"))

    harness.wait_until(idle, PUBLISH_TIMEOUT_S, interval=2, message="the training queue to drain")
    timings["last annotation -> queue drained"] = time.monotonic() - last_save
    versions = requests.get(f"{url}/versions", params={"project": project_id}, timeout=10).json()
    timings["versions"] = ", ".join(versions["versions"])
