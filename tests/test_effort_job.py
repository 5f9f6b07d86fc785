"""What the model saves annotators, end to end in one process: a training job (the real job code, the fast fake
trainer of tests/test_jobs.py) reads tasks from the fake Label Studio whose annotations carry parent_prediction,
region origins and lead_time, records the numbers per version in the run history, and /status, the dashboard
page and /prometheus show them without calling Label Studio."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_backend import YOLOv7Backend
from tests.support import FAKE_BACKEND_URL, LEGACY as TOKEN, FakeLabelStudio
from tests.test_jobs import box, fake_loader, fake_train

V1, V2 = "v1-20260101T000000", "v2-20260103T000000"
JAN = "2026-01-0{}T00:00:00Z"


def region(x, y, w, h, label="fire", origin=None):
    found = box(x, y, w, h, label)
    if origin:
        found["origin"] = origin
    return found


def task(i, predictions, final, parent=None, lead=None, cancelled=False):
    annotation = {"id": 1000 + i, "result": final, "was_cancelled": cancelled, "created_at": JAN.format(4),
                  "lead_time": lead, "parent_prediction": parent}
    return {"id": i, "data": {"image": f"/data/upload/1/img{i}.png"}, "annotations": [annotation],
            "predictions": predictions}


def prediction(pid, version, result, day=1):
    return {"id": pid, "model_version": version, "created_at": JAN.format(day), "result": result}


def make_tasks() -> list[dict]:
    """v1 (12 tasks, named by parent_prediction): 6 boxes accepted, 3 adjusted with a smoke box drawn beside each,
    1 deleted, 2 negatives both sides; v2 (3 tasks, found by time: a v1 and a newer v2 prediction, no parent): a
    label changed fire -> smoke; 1 task without any prediction (a box drawn); 1 only skipped (not counted)."""
    fire = region(10, 20, 30, 40)
    tasks = []
    for i in range(1, 13):
        predicted = [] if i > 10 else [dict(fire)]
        final = ([region(10, 20, 30, 40, origin="prediction")] if i <= 6 else
                 [region(10, 20, 30, 30, origin="prediction-changed"),
                  region(60, 10, 20, 20, "smoke", origin="manual")] if i <= 9 else [])
        lead = 10.0 if i <= 6 else 30.0 if i <= 9 else 5.0 if i == 10 else 2.0
        tasks.append(task(i, [prediction(100 + i, V1, predicted)], final, parent=100 + i, lead=lead))
    for i in range(13, 16):
        tasks.append(task(i, [prediction(100 + i, V1, [dict(fire)]), prediction(200 + i, V2, [dict(fire)], day=3)],
                          [region(10, 20, 30, 40, "smoke")], lead=8.0))
    tasks.append(task(16, [], [region(50, 50, 10, 10, origin="manual")], lead=40.0))
    tasks.append(task(17, [prediction(117, V1, [dict(fire)])], [], parent=117, cancelled=True))
    return tasks


def settings_env(monkeypatch, tmp_path, label_studio, start_checkpoint):
    for key, value in {"MODEL_DIR": str(tmp_path / "models"), "MODEL_PATH": str(start_checkpoint),
                       "IMG_SIZE": "128", "TRAIN_IMG_SIZE": "160", "IMAGE_CACHE_DIR": str(tmp_path / "cache"),
                       "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN,
                       "BACKEND_URL": FAKE_BACKEND_URL, "POOL_SCORING": "false"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("yolo_backend.jobs.training.fine_tune_trainer", fake_train)


def train() -> dict:
    from yolo_backend.jobs.job import run_training_job

    result = run_training_job(1, "START_TRAINING", {}, {"settle_s": 0})
    assert result["trained"] is True
    return result


@pytest.fixture
def trained_project(tmp_path, monkeypatch, start_checkpoint):
    with FakeLabelStudio(make_tasks()) as label_studio:
        settings_env(monkeypatch, tmp_path, label_studio, start_checkpoint)
        result = train()
        # The export listed the predictions by id (as 1.23 does): the job read them in full, once.
        assert label_studio.hits.get("/api/predictions/?project=1") == 1
        label_studio.close()  # from here on the numbers come from disk only
        yield tmp_path / "models", result


def test_numbers_stay_when_pool_scoring_deletes_the_predictions_annotators_started_from(tmp_path, monkeypatch,
                                                                                        start_checkpoint):
    """After a new version, pool scoring replaces the v1 predictions of the annotated tasks (Label Studio clears
    their parent_prediction): the next run still counts them under v1, from what the first run measured."""
    with FakeLabelStudio(make_tasks()) as label_studio:
        settings_env(monkeypatch, tmp_path, label_studio, start_checkpoint)
        first = {e["version"]: e for e in train()["effort"]}
        for item in label_studio.tasks:
            item["predictions"] = [prediction(300 + item["id"], "v3-20260106T000000", [], day=6)]
            for annotation in item["annotations"]:
                annotation["parent_prediction"] = None
        second = {e["version"]: e for e in train()["effort"]}
    assert second == first and second[V1]["tasks"] == 12
    # Without the first run's records the same tasks could not be told apart from drawing from scratch.
    (tmp_path / "models" / "projects" / "1" / "effort-tasks.json").unlink()
    with FakeLabelStudio(label_studio.tasks) as label_studio:
        settings_env(monkeypatch, tmp_path, label_studio, start_checkpoint)
        third = {e["version"]: e for e in train()["effort"]}
    assert list(third) == [None] and third[None]["tasks"] == 16


def test_the_run_records_the_effort_and_status_page_and_prometheus_show_it(trained_project):
    from yolo_backend.runtime import BackendContext
    from yolo_backend.server.app import create_app
    from yolo_backend.settings import Settings

    _, result = trained_project
    by_version = {e["version"]: e for e in result["effort"]}
    assert set(by_version) == {V1, V2, None}
    v1 = by_version[V1]
    assert (v1["tasks"], v1["accepted"], v1["adjusted"], v1["deleted"], v1["drawn"]) == (12, 6, 3, 1, 3)
    assert (v1["empty_agreed"], v1["via_parent"], v1["median_seconds"], v1["model_share"]) == (2, 12, 10.0, 0.75)

    context = BackendContext.from_settings(Settings.from_env(), loader=fake_loader)
    client = create_app(YOLOv7Backend, context=context).test_client()
    (project,) = client.get("/status", query_string={"project": 1}).json["projects"]
    shown = {v["name"]: v for v in project["effort"]["versions"]}
    assert list(shown) == [V1, V2, "no prediction"]  # by version number, "no prediction" last
    assert shown[V1]["share_percent"] == 75.0 and shown[V1]["drawn_per_task"] == 0.25
    assert shown[V1]["median_seconds_shown"] == 10.0 and shown[V1]["note"] == "on 12 tasks"
    assert shown[V1]["seconds_per_box"] == round((6 * 10 + 3 * 30 + 5 + 2 * 2) / 12, 2)
    v2 = shown[V2]
    assert (v2["tasks"], v2["deleted"], v2["drawn"], v2["via_parent"]) == (3, 3, 3, 0)  # found by time: v2
    assert (shown[V1]["by_time"], v2["by_time"]) == (0, 3)
    assert v2["too_few"] and v2["share_percent"] is None and v2["note"] == "too few to say (3 tasks; needs 10)"
    assert (shown["no prediction"]["tasks"], shown["no prediction"]["drawn"]) == (1, 1)

    page = client.get("/dashboard").get_data(as_text=True)
    assert 'id="effort-1"' in page and "75 %" in page and "too few to say (3 tasks; needs 10)" in page

    families = {f.name: f for f in text_string_to_metric_families(client.get("/prometheus").get_data(as_text=True))}
    boxes = {(s.labels["version"], s.labels["outcome"]): s.value
             for s in families["yolo_backend_annotation_boxes"].samples if s.labels["project"] == "1"}
    assert boxes[(V1, "accepted")] == 6 and boxes[(V1, "drawn")] == 3 and boxes[(V2, "deleted")] == 3
    assert boxes[("no prediction", "drawn")] == 1
    tasks = {s.labels["version"]: s.value for s in families["yolo_backend_annotation_tasks"].samples}
    assert tasks == {V1: 12, V2: 3, "no prediction": 1}
    seconds = {s.labels["version"]: s.value for s in families["yolo_backend_annotation_median_seconds"].samples}
    assert seconds == {V1: 10.0, V2: 8.0, "no prediction": 40.0}


def test_a_project_without_a_recorded_effort_says_not_known(tmp_path):
    from yolo_backend.runtime import BackendContext
    from yolo_backend.server.app import create_app
    from yolo_backend.server.effort import effort_status
    from yolo_backend.settings import Settings

    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), image_cache_dir=str(tmp_path / "c"))
    assert effort_status(settings, 4) is None
    context = BackendContext.from_settings(settings, loader=fake_loader)
    client = create_app(YOLOv7Backend, context=context).test_client()
    context.label_configs[4] = None  # a project seen by this process, nothing recorded yet
    page = client.get("/dashboard").get_data(as_text=True)
    assert "Not known yet" in page
