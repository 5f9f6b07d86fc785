"""Issue 3, end to end: a real Label Studio 1.23 asks our ML backend for predictions and stores them.

Runs once per token mode (fixture `label_studio`): legacy tokens enabled, and the JWT-only default where the
backend's LABEL_STUDIO_API_KEY is a personal access token. Checks what Label Studio stored against our detector's
own output on the same image, and that ordering tasks by prediction score works without manual steps.
"""
from __future__ import annotations

import math
import time

import pytest
import requests

from . import harness

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COORD_TOLERANCE = 0.01   # percent of the image side (0.01 % -> 0.13 px on a 1280 px side)
SCORE_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def stored_predictions(api: harness.LabelStudioAPI, task_ids) -> dict[int, list[dict]]:
    return {task_id: api.predictions(task_id) for task_id in task_ids}


def ordered_scores(api: harness.LabelStudioAPI, project_id: int, descending: bool = False) -> list[tuple[int, object]]:
    """(task id, predictions_score) in the order the Data Manager lists tasks sorted by prediction score."""
    key = "-tasks:predictions_score" if descending else "tasks:predictions_score"
    return [(t["id"], t.get("predictions_score")) for t in api.tasks(project_id, query={"ordering": [key]})]


def assert_sorted_by_score(api, project_id: int, expected_scores: dict[int, float]) -> None:
    for descending in (False, True):
        listed = ordered_scores(api, project_id, descending)
        assert sorted(task_id for task_id, _ in listed) == sorted(expected_scores), listed
        scores = [score for _, score in listed]
        assert all(s is not None for s in scores), f"null prediction scores in the sorted task list: {listed}"
        assert scores == sorted(scores, reverse=descending), f"not sorted (descending={descending}): {listed}"
        for task_id, score in listed:
            assert score == pytest.approx(expected_scores[task_id], abs=1e-6), (task_id, score)


def setup_model_version(backend_url: str, project_id: int, label_config: str, hostname: str) -> str:
    """Ask our backend for its model_version the way Label Studio does (POST /setup)."""
    body = {"project": f"{project_id}.{int(time.time())}", "schema": label_config, "hostname": hostname,
            "access_token": "", "extra_params": None}
    response = requests.post(f"{backend_url}/setup", json=body, timeout=30)
    assert response.status_code == 200, response.text
    version = response.json()["model_version"]
    assert isinstance(version, str) and version, response.text
    return version


def match_regions(regions: list[dict], detections, width: int, height: int) -> None:
    """Every detection >= threshold appears once among the stored regions, same label, score and percent box."""
    expected = []
    for box, score, label in zip(detections.boxes, detections.scores, detections.labels):
        x1, y1, x2, y2 = (float(v) for v in box)
        expected.append({"label": detections.names[int(label)], "score": float(score),
                         "x": x1 / width * 100, "y": y1 / height * 100,
                         "width": (x2 - x1) / width * 100, "height": (y2 - y1) / height * 100})
    assert len(regions) == len(expected), (
        f"Label Studio stored {len(regions)} regions, the detector finds {len(expected)}:\n"
        f"stored={[(r['value'], r.get('score')) for r in regions]}\nexpected={expected}")
    unmatched = list(regions)
    for want in sorted(expected, key=lambda e: -e["score"]):
        def distance(region, want=want):
            v = region["value"]
            return max(abs(v[k] - want[k]) for k in ("x", "y", "width", "height"))
        candidates = [r for r in unmatched if r["value"]["rectanglelabels"] == [want["label"]]]
        assert candidates, f"no stored {want['label']} region left for {want}"
        best = min(candidates, key=distance)
        assert distance(best) <= COORD_TOLERANCE, f"closest stored region {best['value']} differs from {want}"
        assert best["score"] == pytest.approx(want["score"], abs=SCORE_TOLERANCE), (best, want)
        unmatched.remove(best)


# ---------------------------------------------------------------------------------------------------------------
# the harness itself, with a stub backend (no model): proves the Label Studio side of every check below
# ---------------------------------------------------------------------------------------------------------------

def test_label_studio_auth_mode(label_studio):
    """Legacy mode accepts `Token <legacy>`; JWT-only mode refuses it and accepts the PAT's access token."""
    legacy = requests.get(f"{label_studio.url}/api/projects",
                          headers={"Authorization": f"Token {label_studio.legacy_token}"}, timeout=30)
    settings = label_studio.api.get("/api/jwt/settings")
    if label_studio.legacy_tokens:
        assert legacy.status_code == 200, legacy.text
        assert settings["legacy_api_tokens_enabled"] is True
    else:
        assert legacy.status_code == 401, f"legacy token should be refused in JWT-only mode: {legacy.text}"
        assert settings["legacy_api_tokens_enabled"] is False and settings["api_tokens_enabled"] is True
        access = label_studio.api.refresh_access_token()
        bearer = requests.get(f"{label_studio.url}/api/projects",
                              headers={"Authorization": f"Bearer {access}"}, timeout=30)
        assert bearer.status_code == 200, bearer.text
        # A PAT is a refresh token: used directly as a bearer it is refused, it has to be exchanged first.
        raw = requests.get(f"{label_studio.url}/api/projects",
                           headers={"Authorization": f"Bearer {label_studio.personal_access_token}"}, timeout=30)
        assert raw.status_code == 401, raw.text


def test_harness_with_stub_backend(label_studio, fire_smoke_images, image_server):
    api = label_studio.api
    project = api.create_project("stub e2e", harness.FIRE_SMOKE_LABEL_CONFIG)
    tasks = harness.import_images(api, project["id"], fire_smoke_images.upload, image_server,
                                  fire_smoke_images.url_names)
    with harness.StubBackend() as stub:
        ml = api.connect_ml_backend(project["id"], stub.url, "stub")
        assert ml["model_version"] == stub.model_version, ml
        api.retrieve_predictions(project["id"], list(tasks))
        stored = stored_predictions(api, tasks)
    for task_id, predictions in stored.items():
        assert len(predictions) == 1, (task_id, predictions)
        assert predictions[0]["model_version"] == stub.model_version
        assert predictions[0]["score"] == pytest.approx(0.5 + task_id / 1000)
    predicted = [body for kind, body in stub.requests if kind == "predict"]
    assert sorted(t["id"] for body in predicted for t in body["tasks"]) == sorted(tasks)
    # Label Studio set the project's model_version to the backend's title; scores only count once it matches.
    assert api.project(project["id"])["model_version"] == "stub"
    assert all(score is None for _, score in ordered_scores(api, project["id"]))
    api.patch(f"/api/projects/{project['id']}", json={"model_version": stub.model_version})
    assert_sorted_by_score(api, project["id"], {t: 0.5 + t / 1000 for t in tasks})


# ---------------------------------------------------------------------------------------------------------------
# our backend
# ---------------------------------------------------------------------------------------------------------------

def test_predictions_from_our_backend(label_studio, yolo_backend, fire_smoke_images, image_server):
    import torch

    from yolo_backend.settings import Settings
    from yolo_backend.yolov7 import Detector, load_model
    from yolo_backend.yolov7.preprocess import read_image

    api = label_studio.api
    project = api.create_project(f"fire/smoke e2e ({'legacy' if label_studio.legacy_tokens else 'jwt'})",
                                 harness.FIRE_SMOKE_LABEL_CONFIG)
    project_id = project["id"]
    tasks = harness.import_images(api, project_id, fire_smoke_images.upload, image_server,
                                  fire_smoke_images.url_names)
    assert len(tasks) == 9

    ml = api.connect_ml_backend(project_id, yolo_backend.url, "yolov7 e2e")
    version = setup_model_version(yolo_backend.url, project_id, harness.FIRE_SMOKE_LABEL_CONFIG, label_studio.url)
    assert ml["model_version"] == version, ml

    started = time.monotonic()
    api.retrieve_predictions(project_id, list(tasks))
    retrieve_seconds = time.monotonic() - started
    stored = stored_predictions(api, tasks)

    # The detector directly, with the backend's settings, on the same files.
    settings = Settings.from_env(yolo_backend.env)
    torch.set_num_threads(1)
    detector = Detector(load_model(settings.model_path, device="cpu"), img_size=settings.img_size,
                        conf=settings.model_score_threshold, iou=settings.iou_threshold,
                        max_det=settings.max_detections)
    regions_total = 0
    for task_id, path in tasks.items():
        predictions = stored[task_id]
        assert len(predictions) == 1, f"task {task_id} ({path.name}): {len(predictions)} predictions stored"
        prediction = predictions[0]
        assert prediction["model_version"] == version, prediction
        assert isinstance(prediction["score"], float) and math.isfinite(prediction["score"]), prediction
        image = read_image(path)
        height, width = image.shape[:2]
        for region in prediction["result"]:
            assert region["from_name"] == "label" and region["to_name"] == "image", region
            assert region["type"] == "rectanglelabels", region
            assert (region["original_width"], region["original_height"]) == (width, height), (path.name, region)
            assert math.isfinite(region["score"]), region
        [detections] = detector.detect([image])
        assert (detections.width, detections.height) == (width, height)
        match_regions(prediction["result"], detections, width, height)
        regions_total += len(prediction["result"])
    assert regions_total > 0, "the reference-trained checkpoint found nothing on the fire/smoke photos"
    print(f"\n[{'legacy' if label_studio.legacy_tokens else 'jwt'}] {len(tasks)} tasks, {regions_total} regions, "
          f"retrieve took {retrieve_seconds:.1f} s, model_version {version}")

    # No manual step: the backend switches the project's model_version to its own, so sorting sees the scores.
    harness.wait_until(
        lambda: api.project(project_id)["model_version"] == version, timeout=30,
        message=f"project model_version == {version!r} (is {api.project(project_id)['model_version']!r})")
    assert_sorted_by_score(api, project_id, {t: stored[t][0]["score"] for t in tasks})
    assert requests.get(f"{yolo_backend.url}/health", timeout=10).status_code == 200
