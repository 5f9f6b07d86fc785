"""The classic flow: `label-studio-ml init my_backend --script model_backend.py` with label-studio-ml 1.0.9 (its own
cached virtualenv: it pins Flask 1.1.2 / Werkzeug 2.0.2), then `label-studio-ml start my_backend`: the generated
backend answers /health, /setup and /predict with our model, and predicts what our own server predicts.

The classic venv gets our runtime requirements except the web server ones (Flask, gunicorn: the classic runtime
brings its own Flask) and finds the `yolo_backend` package through PYTHONPATH (the repository root), as the
README's classic steps say.
"""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from . import harness

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LABEL_STUDIO_ML_SPEC = "label-studio-ml==1.0.9"
VENV_DIRNAME = "label-studio-ml-1.0.9"
# Not for the classic venv: its runtime pins Flask 1.1.2; torch is installed first, from TORCH_INDEX_URL if set.
NOT_IN_CLASSIC_VENV = {"flask", "gunicorn", "torch"}
CONFIG = harness.FIRE_SMOKE_LABEL_CONFIG
COORD_TOLERANCE = 1e-3   # percent of the image side
SCORE_TOLERANCE = 1e-3


def classic_requirements() -> list[str]:
    """Our runtime requirements (requirements.txt) that the classic venv needs."""
    found = []
    for line in (harness.REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.split(r"[<>=!~ \[;]", line, maxsplit=1)[0].lower()
        if name not in NOT_IN_CLASSIC_VENV:
            found.append(line)
    return found


def torch_spec() -> str:
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def ensure_label_studio_ml(verbose: bool = True) -> Path:
    """The cached classic venv (created on first use; rebuilt when what it should hold changed). Returns it."""
    import os

    venv = harness.cache_dir() / VENV_DIRNAME
    marker = venv / harness.MARKER_NAME
    index = os.environ.get("TORCH_INDEX_URL")
    spec = " ".join([LABEL_STUDIO_ML_SPEC, torch_spec(), *classic_requirements()])
    with harness._file_lock(harness.cache_dir() / f"{VENV_DIRNAME}.lock"):
        if marker.exists() and marker.read_text().strip() == spec and (venv / "bin" / "label-studio-ml").exists():
            return venv
        if venv.exists():
            shutil.rmtree(venv)
        python = harness.base_python()
        print(f"[classic] creating {venv} from {python} ({LABEL_STUDIO_ML_SPEC}); this takes a few minutes",
              file=sys.stderr)
        harness._run([python, "-m", "venv", str(venv)], verbose)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        harness._run(pip + [torch_spec()] + (["--index-url", index] if index else []), verbose)
        harness._run(pip + [LABEL_STUDIO_ML_SPEC, *classic_requirements()], verbose)
        flask = harness._run([str(venv / "bin" / "python"), "-c", "import flask, label_studio_ml; "
                              "print(flask.__version__)"], False).strip()
        if flask != "1.1.2":
            raise RuntimeError(f"the classic venv has Flask {flask}, expected label-studio-ml's pin 1.1.2")
        marker.write_text(spec + "\n")
        return venv


def _data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def _our_predictions(tmp_path: Path, tasks: list[dict], env: dict[str, str]) -> dict:
    """What our own server predicts for the same request, in this process."""
    from model_backend import YOLOv7Backend
    from yolo_backend.server.app import create_app
    from yolo_backend.runtime import BackendContext
    from yolo_backend.settings import Settings

    settings = Settings.from_env(env=env)
    client = create_app(YOLOv7Backend, context=BackendContext.from_settings(settings)).test_client()
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1700000000"})
    assert response.status_code == 200, response.json
    return response.json


def test_label_studio_ml_init_gives_a_working_backend(valid_images, detector_checkpoint, tmp_path):
    venv = ensure_label_studio_ml()
    bin_dir = venv / "bin"

    # 1. init, as the classic docs say (the script given by its path in this repository).
    env = harness.child_env({}, drop_venv=True)
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(harness.REPO_ROOT)  # our yolo_backend package
    result = subprocess.run([str(bin_dir / "label-studio-ml"), "init", "my_backend", "--script",
                                     str(harness.REPO_ROOT / "model_backend.py")], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    backend_dir = tmp_path / "my_backend"
    assert (backend_dir / "model_backend.py").is_file()
    assert "from model_backend import YOLOv7Backend" in (backend_dir / "_wsgi.py").read_text()

    # 2. start, with our settings in the environment.
    settings_env = {"MODEL_PATH": str(detector_checkpoint), "MODEL_DIR": str(tmp_path / "models"),
                    "IMAGE_CACHE_DIR": str(tmp_path / "image-cache"), "INFERENCE_BACKEND": "torch",
                    "TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.update(settings_env)
    port = harness.free_port()
    process = harness.ManagedProcess("label-studio-ml", [str(bin_dir / "label-studio-ml"), "start", "my_backend",
                                                         "--host", "127.0.0.1", "--port", str(port)],
                                     env, tmp_path / "label-studio-ml.log", cwd=str(tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_http(f"{url}/health", 180)
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "UP"

        response = requests.post(f"{url}/setup", json={"project": "1.1700000000", "schema": CONFIG,
                                                       "hostname": "http://127.0.0.1:1", "access_token": "x"},
                                 timeout=60)
        assert response.status_code == 200 and response.json().get("model_version"), response.text

        images = sorted(valid_images.glob("*.jpg"))[:4]
        tasks = [{"id": i + 1, "data": {"image": _data_uri(path)}} for i, path in enumerate(images)]
        response = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": CONFIG,
                                                         "project": "1.1700000000", "params": {}}, timeout=300)
        assert response.status_code == 200, response.text + process.log_tail()
        classic = response.json()["results"]

        # 3. An uploaded image without LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY (the classic runtime never hands the
        # /setup token to the backend): no prediction, and an ERROR naming both, which the generated _wsgi.py's
        # default log level (ERROR) shows; our warnings show too (LOG_LEVEL).
        uploaded = [{"id": 9, "data": {"image": "/data/upload/1/a1b2c3d4-fire.jpg"}}]
        response = requests.post(f"{url}/predict", json={"tasks": uploaded, "label_config": CONFIG,
                                                         "project": "1.1700000000", "params": {}}, timeout=300)
        assert response.status_code == 200 and "result" not in response.json()["results"][0], response.text
    finally:
        process.stop()
    lines = process.log_path.read_text().splitlines()
    errors = [line for line in lines if "[ERROR] [yolo_backend.predictor" in line]
    assert len(errors) == 1, process.log_tail()
    assert "set LABEL_STUDIO_URL" in errors[0] and "LABEL_STUDIO_API_KEY" in errors[0], errors[0]
    assert any("[WARNING] [yolo_backend.predictor" in line and "task 9: image not available" in line
               for line in lines), process.log_tail()

    from yolo_backend.registry import checkpoint_version

    ours = _our_predictions(tmp_path, tasks, settings_env)["results"]
    assert len(classic) == len(ours) == len(tasks)
    version = checkpoint_version(detector_checkpoint)
    assert sum(len(item["result"]) for item in classic) > 0, "the reference checkpoint found nothing"
    for got, expected in zip(classic, ours):
        assert got["model_version"] == expected["model_version"] == version
        assert abs(got["score"] - expected["score"]) < SCORE_TOLERANCE
        assert len(got["result"]) == len(expected["result"])
        for region, reference in zip(got["result"], expected["result"]):
            assert region["value"]["rectanglelabels"] == reference["value"]["rectanglelabels"]
            assert region["original_width"] == reference["original_width"]
            for key in ("x", "y", "width", "height"):
                assert abs(region["value"][key] - reference["value"][key]) < COORD_TOLERANCE
            assert abs(region["score"] - reference["score"]) < SCORE_TOLERANCE
