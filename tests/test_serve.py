"""`python -m yolo_backend serve`: embedded broker + one RQ worker + gunicorn from one command, the untrained
fallback model, and a stop that leaves no process behind (valkey-server and RQ work horses included)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_backend.registry import Registry
from yolo_backend.processes import descendants
from yolo_backend.serve import child_environment, describe_model
from yolo_backend.settings import Settings
from tests.support import FIRE_SMOKE_CONFIG as CONFIG, wait_for

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes_mentioning(text: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and text in _cmdline(int(p.name))
            and _alive(int(p.name))]


def png_uri(width: int, height: int) -> str:
    image = np.full((height, width, 3), 90, np.uint8)
    cv2.rectangle(image, (width // 4, height // 4), (width // 2, height // 2), (0, 80, 255), -1)
    ok, data = cv2.imencode(".png", image)
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode()


def _http(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class Serve:
    """`python -m yolo_backend serve` as a child of the test, its output in a file."""

    def __init__(self, tmp_path: Path, **env_extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "serve.log"
        env = {**os.environ, "MODEL_DIR": "data/models", "GUNICORN_ACCESS_LOG": "", "TORCH_THREADS": "1",
               "OMP_NUM_THREADS": "1", "INFERENCE_BACKEND": "torch", "LOG_LEVEL": "INFO", **env_extra}
        for key in ("MODEL_PATH", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "LABEL_STUDIO_URL",
                    "LABEL_STUDIO_API_KEY", "MODEL_VERSION", "IMAGE_CACHE_DIR"):
            if key not in env_extra:
                env.pop(key, None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "yolo_backend", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=tmp_path, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, body = _http(f"{self.url}/health", timeout=2)
                if status == 200:
                    return body
            except OSError:
                pass
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log()}"
            time.sleep(0.3)
        raise AssertionError(f"no /health answer within {timeout} s:\n{self.log()}")

    def broker_url(self) -> str:
        """The embedded broker's REDIS_URL, password included, as serve hands it to its worker (the log masks it)."""
        assert re.search(r"embedded Redis-protocol server \(valkey\) at redis://:\*\*\*@", self.log()), self.log()
        environ = Path(f"/proc/{self.child('yolo_backend worker')}/environ").read_bytes().split(b"\0")
        return next(e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"REDIS_URL="))

    def child(self, needle: str) -> int:
        """The pid of serve's direct child whose command line contains ``needle``."""
        for pid in descendants(self.proc.pid):
            if needle in _cmdline(pid) and _ppid(pid) == self.proc.pid and _alive(pid):
                return pid
        raise AssertionError(f"no child running {needle!r} under serve:\n{self.log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            for pid in descendants(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _wait_gone(pids, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    return [pid for pid in pids if _alive(pid)]


# --------------------------------------------------------------------------------------------------------------

def test_serve_runs_broker_worker_and_server_and_sigterm_leaves_nothing(tmp_path):
    from redis import Redis
    from rq import Queue
    from rq.job import Job

    serve = Serve(tmp_path)
    try:
        assert serve.wait_healthy().items() >= {"status": "UP", "model_class": "YOLOv7Backend"}.items()
        log = serve.log()
        assert "UNTRAINED yolov7-tiny" in log  # it says which model it serves
        # Relative MODEL_DIR is resolved against serve's folder; the broker keeps its data there.
        assert f"data in {tmp_path / 'data' / 'models' / 'redis'}" in log
        broker_url = serve.broker_url()
        broker_address = broker_url.split("@")[-1].split("/", 1)[0]  # valkey-server's title names host:port
        assert _processes_mentioning(broker_address), "valkey-server is not running"
        serve.child("valkey-server")
        worker_pid = serve.child("yolo_backend worker")
        serve.child("gunicorn")

        # Untrained fallback through the real server: a version at /setup, a valid (empty) prediction.
        status, body = _http(f"{serve.url}/setup", {"project": "7.1700000000", "schema": CONFIG})
        assert (status, body) == (200, {"model_version": "v0-untrained"})
        status, body = _http(f"{serve.url}/predict", {"tasks": [{"id": 1, "data": {"image": png_uri(96, 64)}}],
                                                      "project": "7.1700000000", "label_config": CONFIG}, timeout=120)
        assert status == 200, body
        assert body["model_version"] == "v0-untrained" and len(body["results"]) == 1
        assert body["results"][0]["model_version"] == "v0-untrained"
        assert isinstance(body["results"][0]["result"], list) and math.isfinite(body["results"][0]["score"])
        assert list((tmp_path / "data" / "models" / "untrained").glob("*/model.pt"))  # shared, not published
        assert not (tmp_path / "data" / "models" / "projects" / "7" / "v0-untrained").exists()

        # A training request goes to the embedded broker; with no Label Studio the job fails with a clear error.
        status, body = _http(f"{serve.url}/webhook", {"action": "START_TRAINING",
                                                      "project": {"id": 7, "label_config": CONFIG}})
        assert status == 200 and body.get("job"), body
        job_id = body["job"]

        def failed():
            code, state = _http(f"{serve.url}/job_status?job={job_id}")
            return state if code == 200 and state.get("status") == "failed" else None

        state = wait_for(failed, 60, f"job {job_id} did not fail:\n{serve.log()}")
        assert "LABEL_STUDIO_URL" in json.dumps(state), state
        assert _http(f"{serve.url}/health")[0] == 200

        # The worker is restarted when it dies.
        os.kill(worker_pid, signal.SIGKILL)
        new_worker = wait_for(lambda: next((pid for pid in descendants(serve.proc.pid)
                                             if "yolo_backend worker" in _cmdline(pid) and pid != worker_pid
                                             and _alive(pid)), None), 30, f"no new worker:\n{serve.log()}")
        assert f"the worker (pid {worker_pid}) exited with code -9; restarting it" in serve.log()

        # A long job running in a work horse when serve is told to stop: nothing may survive.
        connection = Redis.from_url(broker_url)
        job = Queue("default", connection=connection).enqueue("time.sleep", 600, job_timeout=900)
        wait_for(lambda: Job.fetch(job.id, connection=connection).get_status() == "started", 60,
                  f"the sleep job did not start:\n{serve.log()}")
        horses = wait_for(lambda: [pid for pid in descendants(new_worker) if _alive(pid)], 10, "no work horse")
        tree = descendants(serve.proc.pid)
        assert set(horses) <= set(tree) and len(tree) >= 5  # valkey, worker, horse, gunicorn master + worker
        connection.close()

        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=60) == 0, serve.log()
        assert time.monotonic() - started < 30, "stopping took too long"
        assert _wait_gone(tree) == [], f"serve left processes running:\n{serve.log()}"
        assert _wait_gone(_processes_mentioning(broker_address)) == []
        assert "cold shutdown" in serve.log() or "cold shut down" in serve.log()
        # Every child stopped on its own (none waited out STOP_TIMEOUT_S and was killed), each step logged.
        assert "did not stop in" not in serve.log(), serve.log()
        assert re.search(r"worker \(pid \d+\) stopped after [\d.]+ s", serve.log()), serve.log()
    finally:
        serve.close()


def test_serve_stops_everything_when_the_server_dies(tmp_path):
    serve = Serve(tmp_path)
    try:
        serve.wait_healthy()
        gunicorn = serve.child("gunicorn")
        tree = descendants(serve.proc.pid)
        os.kill(gunicorn, signal.SIGKILL)  # its worker is orphaned: serve (a subreaper) must clean it up
        assert serve.proc.wait(timeout=60) == 1, serve.log()
        assert "the server (gunicorn" in serve.log()
        assert _wait_gone(tree) == [], f"serve left processes running:\n{serve.log()}"
    finally:
        serve.close()


def test_serve_refuses_a_missing_model_path(tmp_path):
    result = subprocess.run([sys.executable, "-m", "yolo_backend", "serve", "--port", str(_free_port())],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MODEL_PATH": str(tmp_path / "missing.pt")})
    assert result.returncode == 2
    assert "MODEL_PATH=" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # nothing started


def test_child_environment_makes_path_settings_absolute(tmp_path):
    env = {"MODEL_DIR": "state/models", "MODEL_PATH": "~/w.pt", "PATH": "/bin"}
    settings = Settings.from_env(env=env)
    child = child_environment(settings, base=env, cwd=tmp_path)
    assert child["MODEL_DIR"] == str(tmp_path / "state" / "models")
    assert child["MODEL_PATH"] == str(Path("~/w.pt").expanduser())
    assert child["IMAGE_CACHE_DIR"] == str(tmp_path / "data" / "image-cache")  # defaults too, so all agree
    assert child["PATH"] == "/bin" and "REDIS_URL" not in child


def test_describe_model_says_which_model(tmp_path, model_file):
    models = tmp_path / "models"
    settings = Settings.from_env(env={}, model_dir=str(models))
    assert "UNTRAINED" in describe_model(settings)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        describe_model(Settings.from_env(env={}, model_dir=str(models), model_path=str(tmp_path / "nope.pt")))
    with_path = Settings.from_env(env={}, model_dir=str(models), model_path=str(model_file))
    assert describe_model(with_path).startswith(f"model: MODEL_PATH={model_file}")
    Registry.for_project(models, 3).publish(model_file, name="v2-20260101T000000")
    assert "v2-20260101T000000 (project 3)" in describe_model(with_path)


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not really a checkpoint; only its name and hash matter here")
    return path


# --------------------------------------------------------------------------------------------------------------
# The untrained fallback, in process, with the real detector
# --------------------------------------------------------------------------------------------------------------

def test_untrained_fallback_is_built_once_shared_and_predicts(tmp_path):
    import torch

    from model_backend import YOLOv7Backend
    from yolo_backend.jobs.training import train_and_publish
    from yolo_backend.model_holder import MAX_UNTRAINED_BYTES, MAX_UNTRAINED_SETS, untrained_checkpoint
    from yolo_backend.server.app import create_app
    from yolo_backend.runtime import BackendContext
    from yolo_backend.yolov7.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), image_cache_dir=str(tmp_path / "c"),
                                 inference_backend="torch", torch_threads=1, img_size=320)
    untrained = tmp_path / "models" / "untrained"

    def client():
        context = BackendContext.from_settings(settings)
        context.models.check_interval = 0.0
        return create_app(YOLOv7Backend, context=context).test_client()

    first = client()
    started = time.perf_counter()
    assert first.post("/setup", json={"project": "5.1", "schema": CONFIG}).json == {"model_version": "v0-untrained"}
    assert time.perf_counter() - started < 1.0
    assert not untrained.exists()  # /setup names it; it is built on the first prediction only

    tasks = [{"id": 1, "data": {"image": png_uri(120, 80)}}, {"id": 2, "data": {"image": png_uri(64, 64)}}]
    response = first.post("/predict", json={"tasks": tasks, "project": "5.1", "label_config": CONFIG})
    assert response.status_code == 200, response.json
    assert response.json["model_version"] == "v0-untrained"
    for item in response.json["results"]:
        assert item["model_version"] == "v0-untrained" and math.isfinite(item["score"])
        for region in item["result"]:  # untrained: usually nothing, but whatever it shows must be well-formed
            assert region["from_name"] == "label" and region["to_name"] == "image"
            assert region["value"]["rectanglelabels"][0] in ("fire", "smoke")

    # One file for the label set, in the shared folder; nothing published for the project.
    files = list(untrained.glob("*/model.pt"))
    assert len(files) == 1 and Registry.for_project(settings.model_dir, 5).latest() is None
    ckpt = load_checkpoint(files[0])
    assert list(ckpt.names) == ["fire", "smoke"] and ckpt.graph_name == "yolov7-tiny"
    assert untrained_checkpoint(settings.model_dir, ["fire", "smoke"]) == (files[0], False)

    # 30 made-up project ids with the same labels: still one file. Another process: nothing rebuilt.
    stamp = files[0].stat().st_mtime_ns
    second = client()
    for project in range(10, 40):
        assert second.post("/predict", json={"tasks": tasks[:1], "project": f"{project}.1",
                                             "label_config": CONFIG}).json["model_version"] == "v0-untrained"
    assert list(untrained.glob("*/model.pt")) == files and files[0].stat().st_mtime_ns >= stamp
    assert not (tmp_path / "models" / "projects").exists()

    # Label sets beyond the bound evict the least recently used placeholder (rebuilt, identical, when needed).
    for n in range(MAX_UNTRAINED_SETS + 2):
        untrained_checkpoint(settings.model_dir, [f"class{n}"])
    kept = list(untrained.glob("*/model.pt"))
    assert 1 < len(kept) <= MAX_UNTRAINED_SETS and sum(f.stat().st_size for f in kept) <= MAX_UNTRAINED_BYTES
    assert not files[0].exists()
    assert second.post("/predict", json={"tasks": tasks[:1], "project": "5.1",
                                         "label_config": CONFIG}).status_code == 200
    assert files[0].exists()

    # A config without RectangleLabels still gets a clear error, not a model.
    bad = "<View><Image name='image' value='$image'/></View>"
    assert second.post("/setup", json={"project": "6.1", "schema": bad}).json == {"model_version": "no-model"}
    response = second.post("/predict", json={"tasks": tasks[:1], "project": "6.1", "label_config": bad})
    assert response.status_code == 400 and "RectangleLabels" in response.json["error"]
    assert train_and_publish  # the training job starts from the same file (tests/test_jobs.py trains from it)


def test_embedded_broker_keeps_queued_jobs_across_restarts(tmp_path):
    from redis import Redis
    from rq import Queue
    from rq.job import Job

    first = Serve(tmp_path)
    try:
        first.wait_healthy()
        connection = Redis.from_url(first.broker_url())
        # A queue no worker listens on: the job stays queued, as a training request waiting for a worker would.
        job = Queue("parked", connection=connection).enqueue("time.sleep", 1)
        connection.close()
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=60) == 0
    finally:
        first.close()
    second = Serve(tmp_path)
    try:
        second.wait_healthy()
        connection = Redis.from_url(second.broker_url())
        assert Job.fetch(job.id, connection=connection).get_status() == "queued"
        assert job.id in Queue("parked", connection=connection).job_ids
        connection.close()
    finally:
        second.proc.send_signal(signal.SIGTERM)
        second.proc.wait(timeout=60)
        second.close()


def test_a_killed_embedded_broker_is_restarted_and_no_training_request_is_lost(tmp_path):
    from redis import Redis

    serve = Serve(tmp_path)
    try:
        serve.wait_healthy()
        broker_url = serve.broker_url()
        assert broker_url.startswith("redis://:") and "***" not in broker_url  # a password, masked in the log
        assert broker_url.split("@")[0].split(":")[-1] not in serve.log()
        with pytest.raises(Exception, match="(?i)auth"):
            Redis.from_url("redis://" + broker_url.split("@", 1)[1]).ping()  # without the password: refused
        old = serve.child("valkey-server")
        os.kill(old, signal.SIGKILL)
        # While it is down (restarted after 1 s): health answers, a training request is kept on disk.
        assert _http(f"{serve.url}/health", timeout=2)[0] == 200
        status, body = _http(f"{serve.url}/webhook", {"action": "START_TRAINING",
                                                      "project": {"id": 7, "label_config": CONFIG}})
        assert status == 200 and body["status"] == "pending", body
        assert serve.proc.poll() is None
        wait_for(lambda: any(pid != old for pid in _processes_mentioning("valkey-server")
                             if _ppid(pid) == serve.proc.pid), 30, f"a new broker:\n{serve.log()}")

        def queued():
            code, state = _http(f"{serve.url}/is_training?project=7", timeout=5)
            return code == 200 and (state.get("job") or state.get("waiting_job")) and not state["pending_requests"]

        wait_for(queued, 30, f"the kept request to be queued:\n{serve.log()}")
        assert "restarting it in" in serve.log() and "embedded broker is back" in serve.log()
        connection = Redis.from_url(broker_url)  # same port and password: every child's REDIS_URL still works
        assert connection.ping()
        connection.close()
        assert serve.proc.poll() is None
    finally:
        serve.close()
