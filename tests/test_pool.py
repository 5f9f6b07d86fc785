"""Pool scoring (``yolo_backend.jobs.pool``): which tasks a run scores and which predictions it replaces, its
progress in a real Redis, queueing and coalescing its jobs, and the HTTP endpoint. The whole run against a real
Label Studio is in tests/e2e/test_pool_scoring.py."""
from __future__ import annotations

import time

import pytest

from yolo_backend.errors import RequestRefused
from yolo_backend.jobs.keys import Keys
from yolo_backend.jobs.pool import (PoolScorer, RunStatus, cluster_path, enqueue_pool_run, plan, read_status,
                                    stale_of_done_tasks)
from yolo_backend.settings import Settings


def _tasks(*ids):
    return [{"id": i, "data": {"image": f"/data/{i}.jpg"}} for i in ids]


def test_plan_skips_tasks_with_a_clustered_prediction_of_the_version():
    predictions = [
        {"id": 10, "task": 1, "model_version": "v2", "cluster": 3},      # done
        {"id": 11, "task": 2, "model_version": "v2", "cluster": None},   # this version from /predict: replaced
        {"id": 12, "task": 3, "model_version": "v1", "cluster": 0},      # an older run of ours: replaced
        {"id": 13, "task": 3, "model_version": "imported", "cluster": None},  # the user's own: never touched
        {"id": 14, "task": 1, "model_version": "v1", "cluster": 1},      # done task: left alone this run
        {"id": 16, "task": 4, "model_version": "v0", "cluster": None},   # ours, from a /predict reply: replaced
        {"id": 17, "task": 4, "model_version": "other-model", "cluster": 2},  # another model's: never touched
    ]
    todo, stale = plan(_tasks(1, 2, 3, 4), predictions, "v2", keep_old=False, ours={"v0", "v1", "v2"})
    assert [t["id"] for t in todo] == [2, 3, 4]
    assert stale == {2: [11], 3: [12], 4: [16]}


def test_plan_keeps_older_versions_when_asked():
    predictions = [{"id": 12, "task": 3, "model_version": "v1", "cluster": 0},
                   {"id": 15, "task": 3, "model_version": "v2", "cluster": None}]
    todo, stale = plan(_tasks(3), predictions, "v2", keep_old=True)
    assert [t["id"] for t in todo] == [3] and stale == {3: [15]}


def test_stale_predictions_of_done_tasks_are_what_a_finished_run_deletes():
    predictions = [
        {"id": 10, "task": 1, "model_version": "v2", "cluster": 3},      # done ...
        {"id": 11, "task": 1, "model_version": "v2", "cluster": None},   # ... and a /predict reply stored late
        {"id": 12, "task": 1, "model_version": "v1", "cluster": 0},      # an older run of ours
        {"id": 13, "task": 1, "model_version": "imported", "cluster": None},  # the user's own: never touched
        {"id": 14, "task": 2, "model_version": "v2", "cluster": None},   # not done (failed image): left for a run
        {"id": 15, "task": 1, "model_version": "other-model", "cluster": 4},  # another model's: never touched
    ]
    assert stale_of_done_tasks(predictions, "v2", keep_old=False, ours={"v1", "v2"}) == [11, 12]
    assert stale_of_done_tasks(predictions, "v2", keep_old=True, ours={"v1", "v2"}) == [11]
    assert stale_of_done_tasks(predictions, "v2", keep_old=False) == [11]  # v1 not known as ours: kept


class _ListingClient:
    """Label Studio's predictions as a list that grows as time passes (it stores a /predict reply after it)."""

    def __init__(self, predictions, later=(), after_calls=2):
        self.stored, self.later, self.after_calls, self.calls, self.deleted = list(predictions), list(later), \
            after_calls, 0, []

    def predictions(self, project_id):
        self.calls += 1
        if self.calls > self.after_calls:
            self.stored += self.later
            self.later = []
        return [p for p in self.stored if p["id"] not in self.deleted]

    def delete_prediction(self, prediction_id):
        self.deleted.append(prediction_id)


def _scorer(client, tmp_path):
    scorer = PoolScorer.__new__(PoolScorer)  # only its Label Studio side: no model, no backend
    scorer.settings, scorer.project_id, scorer.client = Settings.from_env({}, model_dir=str(tmp_path)), 4, client
    return scorer


def test_a_finished_run_sweeps_predictions_stored_after_it_planned(tmp_path):
    client = _ListingClient([{"id": 1, "task": 1, "model_version": "v2", "cluster": 0},
                             {"id": 2, "task": 2, "model_version": "v2", "cluster": 1}],
                            later=[{"id": 3, "task": 2, "model_version": "v2", "cluster": None}], after_calls=0)
    assert _scorer(client, tmp_path).sweep("v2") == 1 and client.deleted == [3]
    assert _scorer(client, tmp_path).sweep("v2") == 0  # nothing left to do


def test_a_deadline_run_waits_for_the_reply_to_be_stored(tmp_path, monkeypatch):
    import yolo_backend.jobs.pool.scorer as pool

    monkeypatch.setattr(pool, "STORED_POLL_S", 0.01)
    reply = [{"id": i, "task": i, "model_version": "v2", "cluster": None} for i in range(1, 4)]
    client = _ListingClient([], later=reply, after_calls=3)
    listed = _scorer(client, tmp_path).wait_for_stored("v2", 3, timeout=5)
    assert client.calls == 4  # polled until all three were there
    assert listed == reply  # the last listing is what the run plans on: no second listing
    started = time.monotonic()
    _scorer(_ListingClient([]), tmp_path).wait_for_stored("v2", 3, timeout=0.05)  # never stored: goes on
    assert time.monotonic() - started < 2


def test_cluster_file_name_is_safe_for_any_version(tmp_path):
    settings = Settings.from_env({}, model_dir=str(tmp_path))
    path = cluster_path(settings, 7, "../../etc/passwd v1")
    assert path.parent == tmp_path / "pool" / "project-7" and not path.name.startswith(".")


@pytest.fixture
def connection(redis_server):
    from redis import Redis

    client = Redis.from_url(redis_server.url)
    client.flushdb()
    return client


def test_run_status_counts_chunks_and_finishes_only_when_coordinated(connection):
    keys = Keys("pool-test")
    status = RunStatus(connection, keys, 5)
    status.start("v3", total=100, done=40, reason="test", job_id="pool-5-x")
    status.set_chunks(2)
    status.add("v3", stored=20, failed=1, chunk_done=True)
    status.add("v3", stored=19, chunk_done=True)
    assert read_status(connection, keys, 5)["state"] == "scoring"  # the coordinator may still queue chunks
    status.add("v2", stored=50)  # a chunk of an older version adds nothing to this run
    assert status.coordinated() is True  # this call completed the run: it sweeps up after it, then says done
    assert status.finish_if_complete() is False and status.add("v3", chunk_done=True) is False  # only once
    assert read_status(connection, keys, 5)["state"] == "scoring"  # until the sweep is over
    status.done()
    final = read_status(connection, keys, 5)
    assert final["state"] == "done" and final["done"] == 79 and final["failed"] == 1 and final["total"] == 100
    assert final["left"] == 20 and final["eta_s"] is None and final["rate"] > 0


def test_status_rate_and_eta_while_scoring(connection):
    keys = Keys("pool-test")
    status = RunStatus(connection, keys, 6)
    status.start("v1", total=1000, done=0, reason="test", job_id=None)
    connection.hset(keys.pool(6), "started_at", time.time() - 10)
    status.add("v1", stored=100)
    current = read_status(connection, keys, 6)
    assert 9 < current["rate"] <= 10.5 and 80 < current["eta_s"] < 100, current


def test_enqueue_coalesces_into_the_waiting_run_and_caps_projects(connection):
    first = enqueue_pool_run(connection, "pool-test", 1, "published v2", max_waiting=2)
    again = enqueue_pool_run(connection, "pool-test", 1, "predict deadline", max_waiting=2)
    assert first["status"] == "queued" and again == {"job": first["job"], "status": "coalesced", "project": 1}
    enqueue_pool_run(connection, "pool-test", 2, "requested", max_waiting=2)
    with pytest.raises(RequestRefused) as refused:
        enqueue_pool_run(connection, "pool-test", 3, "requested", max_waiting=2)
    assert refused.value.status == 429 and "MAX_QUEUED_PROJECTS" in str(refused.value)
    from rq import Queue

    assert Queue("pool-test", connection=connection).count == 2


def test_queue_says_when_redis_is_away(tmp_path):
    from yolo_backend.jobs.queue import TrainingQueue

    settings = Settings.from_env({}, model_dir=str(tmp_path), redis_url="redis://127.0.0.1:1/0")
    answer = TrainingQueue(settings).request_pool_scoring(4)
    assert answer["job"] is None and answer["status"] == "unavailable" and "unreachable" in answer["message"]


def test_score_pool_endpoint(tmp_path, redis_server, connection):
    from yolo_backend.backend import YOLOv7Backend
    from yolo_backend.jobs.queue import TrainingQueue
    from yolo_backend.runtime import BackendContext
    from yolo_backend.server.app import create_app

    settings = Settings.from_env({}, model_dir=str(tmp_path), redis_url=redis_server.url, rq_queue_name="pool-http")
    bare = create_app(YOLOv7Backend, settings, context=BackendContext.from_settings(settings)).test_client()
    assert bare.post("/score_pool", json={"project": 3}).status_code == 503  # no queue: says to use --here

    context = BackendContext.from_settings(settings, training=TrainingQueue(settings))
    client = create_app(YOLOv7Backend, settings, context=context).test_client()
    missing = client.post("/score_pool", json={})
    assert missing.status_code == 400 and "project" in missing.get_json()["error"]
    queued = client.post("/score_pool", json={"project": 3})
    assert queued.status_code == 202 and queued.get_json()["status"] == "queued"
    assert client.post("/score_pool", json={"project": 3}).get_json()["status"] == "coalesced"
    connection.hset(Keys("pool-http").pool(3), mapping={"version": "v1", "total": 10, "done": 4, "failed": 0,
                                                        "state": "scoring", "started_at": time.time(),
                                                        "updated_at": time.time()})
    pool = client.get("/status", query_string={"project": 3}).get_json()["projects"][0]["pool"]
    assert pool["done"] == 4 and pool["total"] == 10 and pool["fraction"] == 0.4 and pool["state"] == "scoring"
    page = client.get("/dashboard", query_string={"project": 3}).get_data(as_text=True)
    assert 'id="pool-3"' in page and "4 of 10" in page and 'aria-valuenow="40"' in page
    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
              '<Label value="fire"/></RectangleLabels></View>')
    client.post("/setup", json={"project": 3, "schema": config})  # a project this server knows
    metrics = client.get("/prometheus").get_data(as_text=True)
    assert 'yolo_backend_pool_scoring_tasks{project="3",state="done",version="v1"} 4.0' in metrics \
        or 'yolo_backend_pool_scoring_tasks{project="3",version="v1",state="done"} 4.0' in metrics, metrics


def test_a_video_project_scores_its_pool_in_small_chunks():
    from yolo_backend.jobs.pool.clustering import CLUSTER_SAMPLE, cluster_sample_size
    from yolo_backend.jobs.pool.scorer import chunk_size, is_video_project

    video = ('<View><Video name="video" value="$video"/><VideoRectangle name="box" toName="video"/>'
             '<Labels name="videoLabels" toName="video"><Label value="fire"/></Labels></View>')
    image = '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">' \
            '<Label value="fire"/></RectangleLabels></View>'
    settings = Settings.from_env(env={}, pool_chunk_size=200, pool_video_chunk_size=7)
    assert chunk_size(settings, is_video_project(video)) == 7 and chunk_size(settings, is_video_project(image)) == 200
    assert not is_video_project(None) and not is_video_project("<View><oops")
    # clusters are fitted on at most 3 chunks of clips; images keep SAMPLE_PER_CLUSTER per cluster up to the cap
    assert cluster_sample_size(500, 10, 7, video=True) == 21
    assert cluster_sample_size(5000, 10, 200, video=False) == 200
    assert cluster_sample_size(50000, 500, 200, video=False) == CLUSTER_SAMPLE
    assert cluster_sample_size(5, 10, 7, video=True) == 5
