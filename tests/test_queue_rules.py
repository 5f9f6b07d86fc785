"""The training queue's per-project rules under concurrency, with real processes: a real valkey, server processes
(each its own ``TrainingQueue``, firing requests from many threads at one instant), real RQ workers, and the fake
trainer of test_jobs.py. One training at a time and at most one waiting per project whatever the interleaving, the
waiting-projects cap exact, a job that RQ marked started but whose heartbeat is not written yet kept (a dead one
replaced), the project's lock first come first served, and the pending store bounded with one summary log line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from yolo_backend.jobs.keys import Keys, heartbeat_value
from yolo_backend.jobs.queue import TrainingQueue
from yolo_backend.jobs.redis_server import RedisServer, free_port
from yolo_backend.jobs.slots import SlotKind, WaitingSlots
from yolo_backend.settings import Settings
from tests.support import wait_for
from tests.test_jobs import Env, children, fake_train, label_studio  # noqa: F401 (label_studio: a fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
START_DELAY_S = 1.5   # what slow_start_job adds between RQ marking the job started and the job's first step
TRAIN_S = 2.5         # how long timed_train trains


# --------------------------------------------------------------------------------------------------------------
# seams run inside the worker's job process
# --------------------------------------------------------------------------------------------------------------

def slow_start_job(*args, **kwargs):
    """The training job, started slowly: RQ has marked it started, its heartbeat is not written yet (as while a
    work horse forks and imports). MODEL_DIR/start-delay holds the delay."""
    from yolo_backend.jobs.job import run_training_job

    delay = Path(os.environ["MODEL_DIR"]) / "start-delay"
    time.sleep(float(delay.read_text()) if delay.is_file() else START_DELAY_S)
    return run_training_job(*args, **kwargs)


def timed_train(data, callback):
    """fake_train that takes TRAIN_S and records when it ran (MODEL_DIR/spans)."""
    started = time.time()
    time.sleep(TRAIN_S)
    result = fake_train(data, callback)
    spans = Path(data.settings.model_dir) / "spans"
    spans.mkdir(exist_ok=True)
    (spans / f"{started:.6f}-{os.getpid()}.json").write_text(json.dumps({"start": started, "end": time.time()}))
    return result


def spans(model_dir: Path) -> list[dict]:
    folder = model_dir / "spans"
    return sorted((json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda s: s["start"]) \
        if folder.is_dir() else []


# --------------------------------------------------------------------------------------------------------------
# a server process: its own TrainingQueue, requests from many threads at one instant
# --------------------------------------------------------------------------------------------------------------

def burst_main() -> None:
    """``python -c 'from tests.test_queue_rules import burst_main; burst_main()' SPEC``: prints the answers."""
    from concurrent.futures import ThreadPoolExecutor

    from yolo_backend.errors import RequestRefused

    spec = json.loads(sys.argv[1])
    queue = TrainingQueue(Settings.from_env(spec["env"]), job_options=spec["job_options"], retry_interval=3600,
                          job_function=spec["job_function"])

    def one(i: int) -> dict:
        time.sleep(max(0.0, spec["start_at"] + spec["delays"][i] - time.time()))
        try:
            if spec["kind"] == "pool":
                return queue.request_pool_scoring(spec["projects"][i], "burst")
            return queue.request(spec["projects"][i], "START_TRAINING", {"source": "burst"})
        except RequestRefused as exc:
            return {"status": exc.status, "error": str(exc)}

    with ThreadPoolExecutor(spec["threads"]) as pool:
        answers = list(pool.map(one, range(len(spec["projects"]))))
    print(json.dumps(answers))


def servers_burst(env: Env, projects: list[list[int]], spread_s: float = 0.0, kind: str = "training",
                  threads: int = 25, job_function: str = "yolo_backend.jobs.job.run_training_job") -> list[dict]:
    """Two (or more) server processes, each sending its list of requests spread over ``spread_s`` seconds, all
    starting at one instant; returns every answer."""
    start_at = time.time() + 4.0  # after both processes have imported everything
    processes = []
    for mine in projects:
        spec = {"env": env.env, "job_options": env.job_options, "job_function": job_function, "kind": kind,
                "start_at": start_at, "projects": mine, "threads": threads,
                "delays": [spread_s * i / max(1, len(mine)) for i in range(len(mine))]}
        processes.append(subprocess.Popen(
            [sys.executable, "-c", "from tests.test_queue_rules import burst_main; burst_main()", json.dumps(spec)],
            cwd=str(REPO_ROOT), env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    answers = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]
        answers += json.loads(out.strip().splitlines()[-1])
    return answers


@pytest.fixture
def env(tmp_path, redis_server, label_studio, start_checkpoint):  # noqa: F811
    environment = Env(tmp_path, redis_server.url, label_studio.url, start_checkpoint,
                      f"test-queue-rules-{os.getpid()}-{time.monotonic_ns()}")
    environment.trainer = "tests.test_queue_rules:timed_train"
    yield environment
    environment.stop_workers()
    environment.queue.close()


def rq_status(env: Env, job_id: str) -> str:
    from rq.job import Job

    status = Job.fetch(job_id, connection=env.queue.connection()).get_status(refresh=True)
    return str(getattr(status, "value", status))


def enqueued_at(env: Env, job_id: str):
    from rq.job import Job

    return Job.fetch(job_id, connection=env.queue.connection()).enqueued_at


def all_job_ids(env: Env) -> set[str]:
    queue = env.queue.queue()
    ids = set(queue.job_ids)
    for registry in (queue.started_job_registry, queue.finished_job_registry, queue.failed_job_registry,
                     queue.canceled_job_registry):
        ids.update(registry.get_job_ids())
    return ids


# --------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------

def test_a_burst_over_two_servers_and_two_workers_trains_once_at_a_time_and_at_most_twice(env):
    """50 START_TRAINING for one project through 2 server processes, spread over 4 s, with 2 workers whose jobs
    start slowly: every request is queued or coalesced into one of at most two jobs (one running, one covering the
    rest), the trainings never overlap, and requests made while the first job was starting joined it."""
    env.start_worker()
    env.start_worker()
    answers = servers_burst(env, [[1] * 25, [1] * 25], spread_s=4.0, threads=5,
                            job_function="tests.test_queue_rules.slow_start_job")
    assert len(answers) == 50 and {a["status"] for a in answers} <= {"queued", "coalesced"}, answers
    queued = [a["job"] for a in answers if a["status"] == "queued"]
    jobs = {a["job"] for a in answers}
    assert len(queued) == len(jobs) == len(set(queued)) and 1 <= len(jobs) <= 2, answers
    first = min(jobs, key=lambda j: enqueued_at(env, j))
    wait_for(lambda: all(rq_status(env, j) == "finished" for j in jobs), 120, "the jobs to finish")
    assert all_job_ids(env) == jobs  # no other job was ever created
    ran = spans(env.model_dir)
    assert len(ran) == len(jobs), ran
    assert all(a["end"] <= b["start"] for a, b in zip(ran, ran[1:])), ran  # one training at a time
    client = env.app()
    coalesced = client.get("/job_status", query_string={"job": first}).get_json()["coalesced_requests"]
    assert coalesced >= 5, coalesced  # ~18 requests came while it was queued or starting (START_DELAY_S)


def test_concurrent_requests_for_distinct_projects_queue_exactly_the_cap(env):
    """60 training requests and 60 pool-scoring requests for distinct projects from 2 server processes at one
    instant: exactly MAX_QUEUED_PROJECTS (20) are queued of each, the rest refused with 429."""
    cap = env.settings.max_queued_projects
    assert cap == 20
    for kind in ("training", "pool"):
        answers = servers_burst(env, [list(range(1000, 1030)), list(range(1030, 1060))], kind=kind)
        statuses = [a["status"] for a in answers]
        assert statuses.count("queued") == cap and statuses.count(429) == 60 - cap, statuses
        assert all("MAX_QUEUED_PROJECTS=20" in a["error"] for a in answers if a["status"] == 429)
        slots = WaitingSlots(env.queue.connection(), env.queue.keys,
                             SlotKind.TRAINING if kind == "training" else SlotKind.POOL)
        assert slots.count() == cap
    assert env.queue.queue().count == 2 * cap


def test_a_job_starting_is_not_replaced_but_a_dead_one_is(env, monkeypatch):
    """RQ marks a job started before the job writes its heartbeat: a request then joins it. A job whose work horse
    was killed in that window, or whose whole worker died there (seen after START_GRACE_S), is replaced."""
    import yolo_backend.jobs.slots as slots_module

    monkeypatch.setattr(slots_module, "START_GRACE_S", 3.0)  # this process judges; the default is 20 s
    (env.model_dir / "start-delay").write_text("4")
    queue = TrainingQueue(env.settings, job_options=env.job_options, job_function="tests.test_queue_rules."
                          "slow_start_job")
    try:
        worker = env.start_worker()
        first = queue.request(1, "START_TRAINING")["job"]
        wait_for(lambda: rq_status(env, first) == "started", 30, "the worker to start the job")
        assert queue.request(1, "START_TRAINING") == {"job": first, "status": "coalesced", "project": 1}
        wait_for(lambda: rq_status(env, first) == "finished", 60, "the first job")

        # Its work horse killed while it starts: the worker marks it failed, the next request queues a new job.
        second = queue.request(1, "START_TRAINING")["job"]
        wait_for(lambda: rq_status(env, second) == "started", 30, "the worker to start the second job")
        assert queue.request(1, "START_TRAINING")["job"] == second
        [horse] = children(worker.pid)
        os.kill(horse, signal.SIGKILL)
        wait_for(lambda: rq_status(env, second) == "failed", 30, "the worker to mark the killed job failed")
        third = queue.request(1, "START_TRAINING")
        assert third["status"] == "queued" and third["job"] != second, third

        # The whole worker dies while the job starts: nobody marks it failed; after START_GRACE_S it is replaced.
        wait_for(lambda: rq_status(env, third["job"]) == "started", 30, "the worker to start the third job")
        env.stop_workers()
        assert queue.request(1, "START_TRAINING")["job"] == third["job"]  # still within the grace
        time.sleep(3.5)
        fourth = queue.request(1, "START_TRAINING")
        assert fourth["status"] == "queued" and fourth["job"] != third["job"], fourth
        (env.model_dir / "start-delay").write_text("0")
        env.run_burst()
        assert rq_status(env, fourth["job"]) == "finished"
        assert len(spans(env.model_dir)) == 2  # the first and the fourth job trained; the killed ones did not
    finally:
        queue.close()


# --- the project's lock: first come (by ticket), first served ------------------------------------------------

def lock_waiter_main() -> None:
    """``python -c '...lock_waiter_main()' SPEC``: wait for the project's lock with a ticket, note the order."""
    from redis import Redis

    from yolo_backend.jobs.job import _Heartbeat, _project_lock

    spec = json.loads(sys.argv[1])
    connection, keys = Redis.from_url(spec["url"]), Keys(spec["queue"])

    class Reporter:
        def progress(self, event):
            pass

    with _Heartbeat(connection, keys, spec["job"], 3) as heartbeat:
        with _project_lock(connection, keys, heartbeat, 1, spec["job"], spec["ticket"], 3, Reporter()):
            connection.rpush(f"{keys.prefix}:order", spec["job"])
            time.sleep(0.2)


def test_the_project_lock_is_first_come_first_served_by_ticket(redis_server):
    from redis import Redis

    connection, keys = Redis.from_url(redis_server.url), Keys(f"lock-order-{os.getpid()}")
    connection.set(keys.alive("holder"), heartbeat_value(), ex=60)  # this process holds the lock
    connection.set(keys.lock(1), "holder", ex=60)

    def waiter(job: str, ticket: int) -> subprocess.Popen:
        spec = {"url": redis_server.url, "queue": keys.prefix.split(":", 1)[1], "job": job, "ticket": ticket}
        process = subprocess.Popen([sys.executable, "-c", "from tests.test_queue_rules import lock_waiter_main; "
                                    "lock_waiter_main()", json.dumps(spec)], cwd=str(REPO_ROOT),
                                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        wait_for(lambda: connection.zscore(keys.lock_queue(1), job) is not None, 30, f"{job} to wait in line")
        return process

    # Arriving in another order than their tickets (queued order); the one first in line is then killed.
    processes = [waiter(f"job-{t}", t) for t in (5, 2, 9, 4)]
    dead = waiter("job-1", 1)
    dead.kill()
    dead.wait()
    connection.delete(keys.lock(1))
    released = time.monotonic()
    for process in processes:
        assert process.wait(timeout=60) == 0
    assert [v.decode() for v in connection.lrange(f"{keys.prefix}:order", 0, -1)] == ["job-2", "job-4", "job-5",
                                                                                     "job-9"]
    assert time.monotonic() - released < 15, "the dead job first in line held the others up"
    assert connection.zcard(keys.lock_queue(1)) == 0 and not connection.exists(keys.lock(1))


# --- Redis away: the pending store is bounded, and a flush says one line ----------------------------------------

def said(caplog) -> list[str]:
    """What the training queue logged at INFO and above."""
    return [f"{r.threadName}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.INFO and r.name == "yolo_backend.jobs.queue"]


def test_pending_requests_are_bounded_and_a_flush_logs_one_summary_line(tmp_path, label_studio,  # noqa: F811
                                                                       start_checkpoint, caplog):
    from yolo_backend.errors import RequestRefused
    from yolo_backend.jobs.pending import PendingRequests

    port = free_port()
    environment = Env(tmp_path, f"redis://127.0.0.1:{port}/0", label_studio.url, start_checkpoint,
                      "test-queue-rules-pending", MAX_QUEUED_PROJECTS="5")
    queues = []
    try:
        answers = servers_burst(environment, [list(range(1, 26)), list(range(26, 51))])
        statuses = [a["status"] for a in answers]
        assert statuses.count("pending") == 5 and statuses.count(503) == 45, statuses
        refused = next(a["error"] for a in answers if a["status"] == 503)
        assert "MAX_QUEUED_PROJECTS" in refused and "start Redis" in refused, refused
        pending = environment.model_dir / "pending"
        assert len(list(pending.glob("project-*.json"))) == 5
        # A project already kept still counts its requests (coalesced in its file).
        kept = int(next(pending.glob("project-*.json")).name.split("-")[1].split(".")[0])
        assert environment.queue.request(kept, "START_TRAINING")["status"] == "pending"
        with pytest.raises(RequestRefused) as full:
            environment.queue.request(77, "START_TRAINING")
        assert full.value.status == 503

        small = PendingRequests(tmp_path / "small", max_projects=100, max_bytes=200)
        info = {"event": "START_TRAINING", "source": "/webhook", "requested_at": 1.0}
        small.record(1, info, OSError("down"))
        with pytest.raises(RequestRefused) as too_big:
            small.record(2, info, OSError("down"))
        assert too_big.value.status == 503 and "bytes" in str(too_big.value)

        environment.queue.close()  # its retry thread would flush them as soon as Redis is back
        with RedisServer(tmp_path / "valkey", port=port):
            elsewhere = TrainingQueue(environment.settings, job_options=environment.job_options,
                                      pending_dir=tmp_path / "elsewhere", retry_interval=3600)
            queues.append(elsewhere)
            for project in (101, 102, 103):  # 3 of the 5 waiting places taken meanwhile
                assert elsewhere.request(project, "START_TRAINING")["status"] == "queued"
            other = TrainingQueue(environment.settings, job_options=environment.job_options, retry_interval=3600)
            queues.append(other)
            caplog.set_level(logging.INFO, logger="yolo_backend.jobs.queue")
            caplog.clear()
            report = other.flush_pending()
            assert len(report.queued) == 2 and len(report.kept) == 3, report
            for _ in range(20):
                assert other.flush_pending().queued == []
            lines = said(caplog)
            assert len(lines) == 1, lines  # not a line per file, nor per flush
            assert "queued 2 saved training request(s)" in lines[0] and "3 stay pending" in lines[0], lines[0]
            assert "MAX_QUEUED_PROJECTS=5" in lines[0], lines[0]

            caplog.clear()  # a retry loop every 50 ms for 1.5 s: one line (its first flush), not one per try
            looping = TrainingQueue(environment.settings, job_options=environment.job_options, retry_interval=0.05)
            queues.append(looping)
            time.sleep(1.5)
            looping.close()
            lines = said(caplog)
            assert len(lines) == 1 and "3 stay pending" in lines[0], lines
            assert len(list(pending.glob("project-*.json"))) == 3
            assert WaitingSlots(other.connection(), other.keys, SlotKind.TRAINING).count() == 5
    finally:
        for queue in queues:
            queue.close()
        environment.queue.close()
