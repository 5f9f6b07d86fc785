"""examples/minimal_backend.py served by our server, and the classic class API it is written against
(label-studio-ml 1.0.x: constructor order, ``train_output``, ``fit`` as ``process_event`` calls it,
``get_local_path``)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from examples.minimal_backend import MinimalBackend
from tests.support import FIRE_SMOKE_CONFIG as CONFIG, LEGACY, FakeLabelStudio
from yolo_backend.backend import YOLOv7Backend
from yolo_backend.registry import Registry
from yolo_backend.runtime import BackendContext
from yolo_backend.server.app import create_app
from yolo_backend.server.base import LabelStudioMLBase
from yolo_backend.settings import Settings


def make_context(tmp_path, **overrides) -> BackendContext:
    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), image_cache_dir=str(tmp_path / "cache"),
                                 **overrides)
    return BackendContext.from_settings(settings)


def test_the_minimal_example_is_served_by_our_server(tmp_path):
    client = create_app(MinimalBackend, context=make_context(tmp_path)).test_client()
    assert client.get("/health").json.items() >= {"status": "UP", "model_class": "MinimalBackend"}.items()
    assert client.post("/setup", json={"project": "1.1795461834", "schema": CONFIG}).json == {
        "model_version": "fixed-box-1"}
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}, {"id": 2, "data": {"image": "/data/upload/1/b.png"}}]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1795461834"})
    assert reply.status_code == 200, reply.json
    assert reply.json["model_version"] == "fixed-box-1"
    assert len(reply.json["results"]) == 2
    for prediction in reply.json["results"]:
        [region] = prediction["result"]
        assert (region["from_name"], region["to_name"], region["type"]) == ("label", "image", "rectanglelabels")
        assert region["value"] == {"x": 25.0, "y": 25.0, "width": 50.0, "height": 50.0, "rotation": 0,
                                   "rectanglelabels": ["fire"]}
        assert prediction["model_version"] == "fixed-box-1" and prediction["score"] == 0.5


# --------------------------------------------------------------------------------------------------------------
# the classic class API
# --------------------------------------------------------------------------------------------------------------

def test_constructor_takes_label_config_and_train_output_by_position(tmp_path):
    backend = MinimalBackend(CONFIG, {"model_path": "/models/a.pt"}, hostname="http://ls.example",
                             access_token="abc", context=make_context(tmp_path))
    assert backend.label_config == CONFIG and backend.parsed_label_config["label"]["labels"] == ["fire", "smoke"]
    assert backend.train_output == {"model_path": "/models/a.pt"}
    assert (backend.hostname, backend.access_token) == ("http://ls.example", "abc")
    assert backend.project_id is None and backend.model_version == "fixed-box-1"
    with pytest.raises(TypeError):
        MinimalBackend(CONFIG, {}, "3.1")  # the project is passed by name, as Label Studio's keys are


def test_train_output_is_the_summary_of_the_version_that_serves(tmp_path):
    checkpoint = tmp_path / "w.pt"
    checkpoint.write_text("weights")
    registry = Registry.for_project(tmp_path / "models", 3)
    older = registry.publish(checkpoint, meta={"metrics": {"map50": 0.4}})
    registry.publish(checkpoint, meta={"metrics": {"map50": 0.6}, "annotations": 12})

    newest = MinimalBackend(CONFIG, project_id="3.1795461834", context=make_context(tmp_path))
    assert newest.train_output["metrics"] == {"map50": 0.6} and newest.train_output["annotations"] == 12
    pinned = MinimalBackend(CONFIG, project_id=3, context=make_context(tmp_path, model_version=older.name))
    assert pinned.train_output["metrics"] == {"map50": 0.4} and pinned.train_output["name"] == older.name
    given = MinimalBackend(CONFIG, {"mine": 1}, project_id=3, context=make_context(tmp_path))
    assert given.train_output == {"mine": 1}  # what the caller hands in wins
    # A checkpoint outside the registry (MODEL_PATH) has no summary, nor has a project without a model.
    outside = MinimalBackend(CONFIG, project_id=4, context=make_context(tmp_path, model_path=str(checkpoint)))
    assert outside.train_output == {}
    assert MinimalBackend(CONFIG, project_id=5, context=make_context(tmp_path)).train_output == {}


def test_base_fit_trains_nothing_and_reads_the_event_however_it_is_called(tmp_path):
    assert MinimalBackend(CONFIG, context=make_context(tmp_path)).fit([{"id": 1}], "/tmp/work") == {}
    read = LabelStudioMLBase.training_event
    # label-studio-ml 1.0.x process_event: fit((), event=..., data=..., job_id=...)
    assert read((), None, "ANNOTATION_CREATED", {"annotation": {"id": 7}}) == (
        "ANNOTATION_CREATED", {"annotation": {"id": 7}})
    assert read("START_TRAINING", {"project": {"id": 1}}) == ("START_TRAINING", {"project": {"id": 1}})  # our worker
    assert read([{"id": 1}], "/tmp/work") == ("START_TRAINING", {})  # classic /train: fit(tasks, workdir)


@pytest.fixture
def recorded_training(monkeypatch):
    """Replace the training job YOLOv7Backend.fit hands over to; returns the calls it got."""
    import yolo_backend.jobs.training as training

    calls = []
    def train_project(context, project_id, event, label_config=None, **kwargs):
        calls.append((event, kwargs))
        return {"model_version": "v9"}

    monkeypatch.setattr(training, "train_project", train_project)
    return calls


def test_yolov7_fit_honours_the_classic_event_and_data_and_our_worker_call(tmp_path, recorded_training):
    backend = YOLOv7Backend(CONFIG, project_id=1, context=make_context(tmp_path))
    assert backend.fit((), event="ANNOTATION_UPDATED", data={"annotation": {"id": 2}}, job_id="job-1") == {
        "model_version": "v9"}
    progress, trainer = object(), object()
    backend.fit("START_TRAINING", {"project": {"id": 1}}, progress=progress, trainer=trainer, job_id="job-2")
    backend.fit([{"id": 1}], "/tmp/work")
    assert recorded_training == [
        ("ANNOTATION_UPDATED", {"progress": None, "trainer": None, "job_id": "job-1"}),
        ("START_TRAINING", {"progress": progress, "trainer": trainer, "job_id": "job-2"}),
        ("START_TRAINING", {"progress": None, "trainer": None, "job_id": None}),
    ]


def test_get_local_path_with_the_classic_signature(tmp_path):
    with FakeLabelStudio() as ls:
        context = make_context(tmp_path, label_studio_url=ls.url, label_studio_api_key=LEGACY)
        backend = MinimalBackend(CONFIG, context=context)
        path = backend.get_local_path("/data/upload/1/a.png", str(tmp_path / "project"))  # (url, project_dir)
        assert cv2.imread(path).shape == (48, 64, 3)
        cloud = backend.get_local_path("s3://bucket/dir/c.png", task_id=5)  # cloud storage: presigned per task
        assert cv2.imread(cloud).shape == (20, 20, 3)
        assert np.array_equal(cv2.imread(backend.get_local_path("/data/upload/1/a.png")), cv2.imread(path))
