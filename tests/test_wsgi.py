"""`_wsgi.py`: the classic CLI (--check, --with, --model-dir, --log-level, env MODEL_DIR / RQ_QUEUE_NAME /
REDIS_HOST / REDIS_PORT) and `app` for gunicorn, which imports no torch and loads no model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLEAN = ("MODEL_PATH", "MODEL_DIR", "MODEL_VERSION", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "RQ_QUEUE_NAME",
         "LOG_LEVEL", "IMG_SIZE")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update({"TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "INFERENCE_BACKEND": "torch", **extra})
    return env


def _wsgi(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "_wsgi.py"), *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small real checkpoint in our format (an untrained yolov7-tiny with two classes)."""
    from yolo_backend.yolov7.untrained import build_untrained_checkpoint

    return build_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", ["fire", "smoke"])


def test_import_makes_the_app_without_torch_model_or_redis(tmp_path):
    """What `gunicorn _wsgi:app` does in its master: import the module. No torch (so no CUDA), no model, no Redis
    connection; the classic environment variables reach the settings and the training queue."""
    probe = (
        "import sys, json, _wsgi\n"
        "ctx = _wsgi.app.extensions['ml_backend'].context\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'loads': ctx.models.loads,\n"
        "  'loaded': ctx.models.loaded_versions(), 'redis_url': ctx.training.redis_url,\n"
        "  'queue': ctx.training.queue_name, 'connected': ctx.training._connection is not None,\n"
        "  'model_dir': ctx.settings.model_dir}))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env=_env(REDIS_HOST="redis.example", REDIS_PORT="6390", RQ_QUEUE_NAME="yolo",
                                     MODEL_DIR=str(tmp_path / "models")))
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state == {"torch": False, "loads": 0, "loaded": [], "redis_url": "redis://redis.example:6390/0",
                     "queue": "yolo", "connected": False, "model_dir": str(tmp_path / "models")}


def test_check_loads_the_model_and_says_which(tmp_path, checkpoint):
    result = _wsgi("--check", cwd=tmp_path, MODEL_PATH=str(checkpoint), MODEL_DIR=str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: model tiny-") and "classes: fire, smoke" in result.stdout
    assert f"MODEL_PATH={checkpoint}" in result.stdout


def test_check_fails_clearly_on_a_missing_checkpoint(tmp_path):
    result = _wsgi("--check", cwd=tmp_path, MODEL_PATH=str(tmp_path / "missing.pt"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_check_without_any_model_explains_the_untrained_start(tmp_path):
    result = _wsgi("--check", "--model-dir", str(tmp_path / "empty"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no model configured" in result.stdout and "untrained" in result.stdout


def test_with_sets_settings_and_model_dir_points_at_published_versions(tmp_path, checkpoint):
    from yolo_backend.registry import Registry

    # --with model_path=... is the MODEL_PATH setting.
    result = _wsgi("--check", "--with", f"model_path={checkpoint}", "--log-level", "DEBUG", cwd=tmp_path,
                   MODEL_DIR=str(tmp_path / "m"))
    assert result.returncode == 0 and "classes: fire, smoke" in result.stdout, result.stderr
    # --model-dir wins over MODEL_DIR and its newest version over MODEL_PATH.
    Registry(tmp_path / "published").publish(checkpoint, name="v3-20260101T000000")
    result = _wsgi("--check", "--model-dir", str(tmp_path / "published"), cwd=tmp_path, MODEL_PATH=str(checkpoint),
                   MODEL_DIR=str(tmp_path / "other"))
    assert result.returncode == 0 and result.stdout.startswith("ok: model v3-20260101T000000"), result.stderr
    # A bad value says which setting is wrong; a pair without '=' is refused.
    result = _wsgi("--check", "--with", "img_size=33", cwd=tmp_path)
    assert result.returncode == 2 and "IMG_SIZE=33" in result.stderr
    result = _wsgi("--check", "--with", "img_size", cwd=tmp_path)
    assert result.returncode != 0 and "expected KEY=VALUE" in result.stderr


def test_with_splits_settings_from_backend_kwargs():
    sys.path.insert(0, str(ROOT))
    import _wsgi

    overrides, kwargs = _wsgi._parse_with(["MODEL_SCORE_THRESHOLD=0.4", "model_dir=/x", "custom=a=b"])
    assert overrides == {"model_score_threshold": "0.4", "model_dir": "/x"}
    assert kwargs == {"custom": "a=b"}


def test_backend_kwargs_reach_the_backend(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import _wsgi
    from yolo_backend.settings import Settings

    app = _wsgi.build_app(Settings.from_env(env={}, model_dir=str(tmp_path)), greeting="hello")
    backend_class = app.extensions["ml_backend"].backend_class
    seen = {}
    original = backend_class.setup

    def spy(self):
        seen.update(self.extra_params)
        original(self)

    monkeypatch.setattr(backend_class, "setup", spy)
    assert app.test_client().post("/setup", json={"project": "1.1"}).status_code == 200
    assert seen == {"greeting": "hello"}


def test_classic_cli_serves_health(tmp_path):
    """`python _wsgi.py --host --port` (Flask's threaded server) answers /health."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "_wsgi.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "WARNING"], cwd=tmp_path, env=_env(MODEL_DIR=str(tmp_path / "m")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while body is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    body = json.loads(reply.read())
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        assert body.items() >= {"status": "UP", "model_class": "YOLOv7Backend"}.items() and len(body["instance"]) == 32
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("how", ["--preload", "GUNICORN_CMD_ARGS"])
def test_gunicorn_refuses_preload_with_cuda(tmp_path, how):
    """--preload creates the app in the master before the fork, which CUDA does not survive: with DEVICE=cuda
    gunicorn stops before it binds, saying why and what to do (whether --preload comes on the command line or
    through GUNICORN_CMD_ARGS)."""
    env = _env(DEVICE="cuda", MODEL_DIR=str(tmp_path / "m"))
    args = ["--preload"] if how == "--preload" else []
    if how == "GUNICORN_CMD_ARGS":
        env["GUNICORN_CMD_ARGS"] = "--preload"
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "--chdir",
                             str(ROOT), "--bind", "127.0.0.1:0", *args, "_wsgi:app"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stderr
    assert "preload_app (--preload) is not supported with CUDA (DEVICE=cuda)" in result.stderr, result.stderr
    assert "Remove --preload" in result.stderr and "Listening at" not in result.stderr


def test_preload_refusal_decides_without_cuda():
    from yolo_backend.serve import preload_refusal

    def no_gpu() -> bool:
        return False

    def gpu() -> bool:
        return True

    assert preload_refusal(False, "cuda:1", gpu) is None       # no preload: CUDA is fine
    assert preload_refusal(True, "cpu", gpu) is None           # preload on the CPU is fine
    assert preload_refusal(True, "auto", no_gpu) is None
    assert "DEVICE=auto and an NVIDIA GPU is visible" in preload_refusal(True, "auto", gpu)
    assert "DEVICE=cuda:1" in preload_refusal(True, "cuda:1", no_gpu)
    assert "DEVICE=0" in preload_refusal(True, "0", no_gpu)


def test_nvidia_gpu_visible_respects_cuda_visible_devices():
    from yolo_backend.serve import nvidia_gpu_visible

    assert nvidia_gpu_visible({"CUDA_VISIBLE_DEVICES": ""}) is False
    assert nvidia_gpu_visible({"CUDA_VISIBLE_DEVICES": "-1"}) is False
    gpus = Path("/proc/driver/nvidia/gpus")
    here = (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))
    assert nvidia_gpu_visible({}) is here
