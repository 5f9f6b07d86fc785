"""The backend acts with its key only on projects that have it connected in Label Studio (no confused deputy).

The backend runs on a real loopback port (so Label Studio's ML-backend URL can reach it and it can recognise
itself by the instance id on /health); the fake Label Studio lists the project's ML backends. A project that
lists only another backend gets nothing: no model_version PATCH, no sampling change, no prediction written or
deleted, no annotations read, and /predict and /score_pool answer 403 saying why.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from tests.support import LEGACY, FakeLabelStudio, RecordingServer, wait_for
from tests.test_server import CONFIG, Loader, png_uri
from yolo_backend.labelstudio.connection import ConnectionCheck, Link, probe_instance
from yolo_backend.labelstudio.urls import normalise_url
from yolo_backend.registry import checkpoint_version
from yolo_backend.runtime import BackendContext, instance_id
from yolo_backend.server.app import create_app
from yolo_backend.settings import Settings
from model_backend import YOLOv7Backend


class Backend:
    """Our app on a real port, with the fake detector and no BACKEND_URL (it recognises itself by probing)."""

    def __init__(self, tmp_path: Path, ls_url: str, **overrides):
        model = tmp_path / "best.pt"
        model.write_text("weights-A")
        self.model = model
        settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), model_path=str(model),
                                     image_cache_dir=str(tmp_path / "cache"), label_studio_url=ls_url,
                                     label_studio_api_key=LEGACY, **overrides)
        self.context = BackendContext.from_settings(settings, loader=Loader())
        self.context.version_sync.first_delay = 0.05
        self.context.version_sync.backoff = 1.0
        self.app = create_app(YOLOv7Backend, context=self.context)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.client = self.app.test_client()

    def close(self):
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def ls():
    with FakeLabelStudio(project_id=2, model_version="another backend") as server:
        yield server


def test_the_instance_id_is_one_per_model_dir(tmp_path):
    first = instance_id(tmp_path / "models")
    assert len(first) == 32 and instance_id(tmp_path / "models") == first
    assert instance_id(tmp_path / "other") != first


def test_a_project_that_lists_this_backend_is_connected_by_probing(tmp_path, ls):
    backend = Backend(tmp_path, ls.url)
    try:
        ls.ml_backends = [{"id": 1, "url": "http://127.0.0.1:1"}, {"id": 2, "url": backend.url + "/"}]
        assert probe_instance(backend.url) == backend.context.instance()
        answer = backend.context.connection.check(2)
        assert answer.state is Link.CONNECTED, answer.why
        # The model_version switch goes through once a prediction of the version is stored.
        version = checkpoint_version(backend.model)
        ls.predictions.append({"task": 1, "model_version": version})
        assert backend.client.post("/setup", json={"project": "2.1", "schema": CONFIG}).status_code == 200
        assert backend.context.version_sync.wait()
        assert ls.patches == [version]
    finally:
        backend.close()


def test_a_project_of_another_backend_gets_nothing(tmp_path, ls, caplog):
    backend = Backend(tmp_path, ls.url, uncertainty_sampling=True)
    try:
        with RecordingServer() as other:  # the project's only ML backend: another model server
            ls.ml_backends = [{"id": 7, "url": other.url}]
            version = checkpoint_version(backend.model)
            ls.predictions.append({"task": 1, "model_version": version})  # even with a prediction of ours
            caplog.set_level(logging.WARNING)
            assert backend.client.post("/setup", json={"project": "2.1", "schema": CONFIG}).status_code == 200
            assert backend.context.version_sync.wait()
            assert ls.patch_attempts == [] and ls.project["model_version"] == "another backend"
            assert "project 2 has not connected this backend" in caplog.text
            # /predict and /score_pool say why, with a 403.
            tasks = [{"id": 1, "data": {"image": "/data/upload/2/a.png"}}]
            reply = backend.client.post("/predict", json={"tasks": tasks, "project": "2.1",
                                                          "label_config": CONFIG})
            assert reply.status_code == 403 and "has not connected this backend" in reply.json["error"]
            assert not any(path.startswith("/data/") for path in ls.hits)  # no image read with the key
            # Without a project id the backend cannot tell: with a key it asks for one.
            reply = backend.client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
            assert reply.status_code == 400 and "send the project id" in reply.json["error"]
            assert other.requests and all(raw.startswith(b"GET /health ") for raw in other.requests)
    finally:
        backend.close()


def test_a_just_connected_project_is_not_refused_for_long(tmp_path, ls):
    backend = Backend(tmp_path, ls.url)
    try:
        backend.context.connection.negative_ttl_s = 0.2
        ls.ml_backends = []
        assert backend.context.connection.check(2).state is Link.NOT_CONNECTED
        ls.ml_backends = [{"id": 3, "url": backend.url}]
        wait_for(lambda: backend.context.connection.check(2).connected, 5, "the new connection to be seen")
    finally:
        backend.close()


def test_backend_url_matches_without_probing(tmp_path, ls):
    calls = []
    check = ConnectionCheck(lambda: _client(ls), lambda: "mine", backend_url="http://ML.example:80/",
                            probe=lambda url: calls.append(url))
    ls.ml_backends = [{"url": "http://ml.example"}]
    assert check.check(2).connected and calls == []
    ls.ml_backends = [{"url": "http://ml.example:8080"}]
    check.forget(2)
    assert check.check(2).state is Link.NOT_CONNECTED
    assert normalise_url("http://ML.example:80/") == "http://ML.example:80"


def test_label_studio_away_is_unknown_not_refused(tmp_path):
    check = ConnectionCheck(lambda: _client_at("http://127.0.0.1:1"), lambda: "mine")
    answer = check.check(5)
    assert answer.state is Link.UNKNOWN and "could not ask" in answer.why


def test_pool_scoring_of_a_foreign_project_writes_and_deletes_nothing(tmp_path, ls, monkeypatch):
    from yolo_backend.jobs.pool import score_project

    ls.tasks = [{"id": 1, "data": {"image": png_uri(8, 8)}, "annotations": []}]
    ls.predictions.append({"id": 1, "task": 1, "model_version": "other-model", "cluster": 0})
    ls.ml_backends = [{"url": "http://other-model:9090"}]
    model = tmp_path / "best.pt"
    model.write_text("weights-A")
    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), model_path=str(model),
                                 label_studio_url=ls.url, label_studio_api_key=LEGACY,
                                 backend_url="http://ml-backend.test:9090")
    summary = score_project(settings, 2, "requested over HTTP")
    assert summary["scored"] is False and "has not connected this backend" in summary["reason"]
    assert len(ls.predictions) == 1 and not any("/api/tasks" in path for path in ls.hits)


def test_training_for_a_foreign_project_reads_nothing(tmp_path, ls, monkeypatch):
    from yolo_backend.jobs.job import run_training_job

    ls.ml_backends = [{"url": "http://other-model:9090"}]
    model = tmp_path / "best.pt"
    model.write_text("not loaded")
    for key, value in {"MODEL_DIR": str(tmp_path / "models"), "MODEL_PATH": str(model),
                       "IMAGE_CACHE_DIR": str(tmp_path / "cache"), "LABEL_STUDIO_URL": ls.url,
                       "LABEL_STUDIO_API_KEY": LEGACY, "BACKEND_URL": "http://ml-backend.test:9090"}.items():
        monkeypatch.setenv(key, value)
    result = run_training_job(2, "START_TRAINING", {}, {"settle_s": 0})
    assert result["trained"] is False and "has not connected this backend" in result["reason"]
    assert not any("export" in path or path.startswith("/api/projects/2/?") for path in ls.hits), ls.hits


def _client(ls):
    return _client_at(ls.url)


def _client_at(url):
    from yolo_backend.labelstudio.api import LabelStudioClient
    from yolo_backend.labelstudio.client import LabelStudioSession

    return LabelStudioClient.for_session(LabelStudioSession(url, LEGACY, timeout=2))


def test_two_thousand_made_up_project_ids_cost_no_threads_and_few_calls(tmp_path, ls):
    """POST /setup with 2000 distinct project ids: one sync thread, memory that does not stay, and at most one
    Label Studio call per project that got a turn (the rest are dropped beyond the bound of waiting projects)."""
    import resource

    backend = Backend(tmp_path, ls.url)
    try:
        backend.context.version_sync.first_delay = 0.0
        backend.client.post("/setup", json={"project": "999.1", "schema": CONFIG})  # starts the sync thread
        assert backend.context.version_sync.wait(30)
        time.sleep(0.5)  # the first request's warm-up thread ends

        def ours() -> list[str]:  # the test servers' own per-request threads come and go: not counted
            return [t.name for t in threading.enumerate() if "process_request_thread" not in t.name]

        threads, syncs = len(ours()), ours().count("model-version-sync")  # other tests' contexts have theirs
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for project in range(1000, 3000):
            assert backend.client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG}).status_code == 200
            assert len(ours()) <= threads, ours()
        assert backend.context.version_sync.wait(120)
        calls = sum(n for path, n in ls.hits.items() if "/model-versions/" in path)
        assert calls <= 2001 and len(ours()) <= threads and ours().count("model-version-sync") == syncs
        assert backend.context.version_sync.pending() == 0
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
        assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB"
        assert len(backend.context.label_configs) <= 1000  # the schemas kept are bounded too
    finally:
        backend.close()
