"""Issue 23 item 7, end to end: a real Label Studio 1.23 video project trains our model from annotated clips.

Two clips made here (``test_ls_video.write_pan``: a camera panning over a fire photo, one way, then the other) are
uploaded and the backend connected with "start training on annotation submission" on; each clip gets an annotation
with ``videorectangle`` keyframes on the photo, posted through Label Studio's API in the shape its editor stores
(sequence of {frame, enabled, x, y, width, height, rotation, time}, ``labels``, ``framesCount``, ``duration``).
Label Studio's START_TRAINING webhook queues a job that a real RQ worker (``python -m yolo_backend worker``, a real
Redis-protocol server) runs: it downloads the clips from Label Studio, trains on their sampled frames, publishes; the
project's model_version switches to the new version and Retrieve Predictions stores predictions that carry it.
"""
from __future__ import annotations

import time

import cv2
import pytest
import requests

from . import harness
from .test_ls_video import FRAME_RATE, FRAMES, PAN_PX, VIDEO_CONFIG, upload_videos, write_pan

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PUBLISH_TIMEOUT_S = 600
FRAMES_PER_CLIP = 6


def photo_track(direction: int) -> list[dict]:
    """The photo's box in ``write_pan``'s clip (400x400 frames; the photo 200x200 at x = 100 + direction * PAN_PX *
    index, y = 100), as a ``videorectangle`` region: keyframes on the first and last frame, the last one ending
    the track (``enabled: false``, as the editor stores a track's end)."""
    def key(frame: int, enabled: bool) -> dict:
        x = (100 + direction * PAN_PX * (frame - 1)) / 400 * 100
        return {"frame": frame, "enabled": enabled, "rotation": 0, "x": x, "y": 25.0, "width": 50.0, "height": 50.0,
                "time": frame / FRAME_RATE}

    return [{"id": f"fire{direction:+d}", "from_name": "box", "to_name": "video", "type": "videorectangle",
             "origin": "manual",
             "value": {"labels": ["fire"], "framesCount": FRAMES, "duration": FRAMES / FRAME_RATE,
                       "sequence": [key(1, True), key(FRAMES, False)]}}]


@pytest.mark.parametrize("label_studio", ["legacy"], indirect=True)
def test_annotated_clips_train_publish_and_new_predictions_carry_the_version(label_studio, redis_server,
                                                                             valid_images, detector_checkpoint,
                                                                             tmp_path_factory):
    from yolo_backend.registry import Registry

    folder = tmp_path_factory.mktemp("video-training")
    photo = cv2.imread(str(sorted(valid_images.glob("*.jpg"))[0]))
    clips = [write_pan(folder / "pan-right.mp4", photo, +1), write_pan(folder / "pan-left.mp4", photo, -1)]
    api = label_studio.api
    project_id = api.create_project("fire video training e2e", VIDEO_CONFIG)["id"]
    tasks = upload_videos(api, project_id, clips)
    assert len(tasks) == 2

    env = {
        "MODEL_PATH": str(detector_checkpoint), "MODEL_DIR": str(folder / "models"),
        "IMAGE_CACHE_DIR": str(folder / "image-cache"), "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.api_key, "REDIS_URL": redis_server.url,
        "RQ_QUEUE_NAME": "e2e-video-training", "IMG_SIZE": "320", "TORCH_THREADS": "1", "LOG_LEVEL": "INFO",
        "TRAIN_IMG_SIZE": "320", "TRAIN_EPOCHS": "2", "TRAIN_TIME_BUDGET_S": "30", "TRAIN_BATCH_SIZE": "4",
        "VIDEO_TRAIN_FRAMES_PER_CLIP": str(FRAMES_PER_CLIP), "MIN_ANNOTATIONS_FIRST_TRAINING": "2",
        # the loop's mechanics, not the model's quality: a few frames of two clips need not beat the start model
        "FORCE_PUBLISH": "true",
    }
    backend, url = harness.start_backend(folder, env)
    worker = harness.start_worker(folder, env)
    try:
        first_version = harness.connect_and_predict(api, project_id, url, "yolov7 video training e2e", list(tasks))

        for task_id, clip in tasks.items():
            api.create_annotation(task_id, photo_track(+1 if "right" in clip.name else -1))
        stored = api.task(next(iter(tasks)))["annotations"][0]["result"][0]
        assert stored["type"] == "videorectangle" and len(stored["value"]["sequence"]) == 2, stored

        registry = Registry.for_project(env["MODEL_DIR"], project_id)
        started = time.monotonic()
        published = harness.wait_for_version(worker, registry, lambda meta: meta.get("video_tasks") == 2,
                                             PUBLISH_TIMEOUT_S, "a version trained on both annotated clips")
        version, meta = published.name, published.meta()
        print(f"\npublished {version} {time.monotonic() - started:.0f} s after the last save: {meta['video_frames']}"
              f" frames of {meta['video_tasks']} clips, train {meta['train_images']} / val {meta['val_images']}")
        assert meta["labels"] == ["fire", "smoke"] and meta["parent"] == first_version, meta
        assert 2 <= meta["video_frames"] <= 2 * FRAMES_PER_CLIP and meta["annotations"] == meta["video_tasks"] == 2
        assert "video not available" not in worker.log_tail(400)

        harness.wait_until(lambda: api.project(project_id)["model_version"] == version, 120,
                           message=f"project model_version == {version}")
        harness.wait_until(lambda: requests.get(f"{url}/versions", params={"project": project_id},
                                                timeout=10).json()["model_version"] == version, 30,
                           message="the server to serve the new version")
        api.retrieve_predictions(project_id, list(tasks))
        for task_id, clip in tasks.items():
            predictions = [p for p in api.predictions(task_id) if p["model_version"] == version]
            assert predictions, (clip.name, [p["model_version"] for p in api.predictions(task_id)])
            assert all(r["type"] == "videorectangle" for p in predictions for r in p["result"]), predictions
        harness.wait_for_idle_queue(url, project_id)
    finally:
        worker.stop()
        backend.stop()
