"""Issue 11, item 9, end to end: with Basic Auth on, /webhook and /train refuse anonymous callers, and a real
Label Studio 1.23 connected with the same user and password still triggers training when an annotation is
submitted (START_TRAINING goes through the ML connection, which carries the Basic Auth).

No worker listens on the queue: the proof is the training job waiting for the project.
"""
from __future__ import annotations

import pytest
import requests

from . import harness

pytestmark = [pytest.mark.e2e]

USER, PASSWORD = "ml-backend", "a long shared secret"


@pytest.mark.parametrize("label_studio", ["jwt"], indirect=True)
def test_training_triggers_through_basic_auth(label_studio, valid_images, detector_checkpoint, tmp_path_factory):
    from yolo_backend.jobs.redis_server import RedisServer

    api = label_studio.api
    project_id = api.create_project("basic auth e2e", harness.FIRE_SMOKE_LABEL_CONFIG)["id"]
    tasks = harness.import_images(api, project_id, sorted(valid_images.glob("*.jpg"))[:2])
    workdir = tmp_path_factory.mktemp("auth-backend")
    with RedisServer(workdir / "valkey") as redis_server:
        env = {
            "MODEL_PATH": str(detector_checkpoint), "MODEL_DIR": str(workdir / "models"),
            "IMAGE_CACHE_DIR": str(workdir / "image-cache"), "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.api_key, "REDIS_URL": redis_server.url,
            "RQ_QUEUE_NAME": "e2e-basic-auth", "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
            "IMG_SIZE": "320", "TORCH_THREADS": "1", "LOG_LEVEL": "INFO",
        }
        backend, url = harness.start_backend(workdir, env)
        try:
            anonymous = {"action": "START_TRAINING", "project": {"id": project_id}}
            assert requests.post(f"{url}/webhook", json=anonymous, timeout=10).status_code == 401
            assert requests.post(f"{url}/train", json={"project": str(project_id)}, timeout=10).status_code == 401
            assert requests.get(f"{url}/health", timeout=5).status_code == 200  # container health checks stay open

            api.connect_ml_backend(project_id, url, "yolov7 with auth", auth_method="BASIC_AUTH",
                                   basic_auth_user=USER, basic_auth_pass=PASSWORD)
            api.update_project(project_id, start_training_on_annotation_update=True)
            api.create_annotation(next(iter(tasks)), [])

            def waiting_job():
                status = requests.get(f"{url}/is_training", params={"project": project_id}, auth=(USER, PASSWORD),
                                      timeout=10).json()
                return status.get("waiting_job")

            job = harness.wait_until(waiting_job, 60, message="a training job queued by Label Studio's trigger")
            assert job.startswith(f"train-{project_id}-")
        finally:
            backend.stop()
