"""`python -m yolo_backend detect|info` end to end, in a subprocess like a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = "data/yolov7-checkpoints"
REF_TRAINED = f"{CHECKPOINTS}/yolov7-tiny_fire-smoke_ref-trained.pt"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_THREADS="1")
    for key in ("IMG_SIZE", "MODEL_SCORE_THRESHOLD", "IOU_THRESHOLD", "DEVICE", "MAX_DETECTIONS"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "yolo_backend", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def two_valid_images(shared_dir, tmp_path_factory) -> Path:
    reference = json.loads((shared_dir / CHECKPOINTS /
                            "yolov7-tiny_fire-smoke_ref-trained.valid_detections_320.json").read_text())
    # one image with a box and one other (the second image of the list has two boxes)
    folder = tmp_path_factory.mktemp("images")
    for item in reference["images"][:2]:
        shutil.copy(shared_dir / "data/fire-smoke/images/valid" / item["file"], folder / item["file"])
    return folder


def test_detect_folder_to_json_matches_reference(shared_dir, two_valid_images, tmp_path):
    out = tmp_path / "out" / "detections.json"
    result = run_cli("detect", "--weights", str(shared_dir / REF_TRAINED), "--source", str(two_valid_images),
                     "--img-size", "320", "--conf", "0.25", "--iou", "0.45", "--device", "cpu", "--json", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())
    reference = json.loads((shared_dir / CHECKPOINTS /
                            "yolov7-tiny_fire-smoke_ref-trained.valid_detections_320.json").read_text())
    expected = {item["file"]: item for item in reference["images"][:2]}
    assert sorted(r["file"] for r in records) == sorted(expected)
    for record in records:
        ref = expected[record["file"]]
        assert (record["width"], record["height"]) == (ref["width"], ref["height"])
        assert Path(record["path"]).name == record["file"]
        assert len(record["boxes"]) == len(ref["boxes"])
        for ours, theirs in zip(sorted(record["boxes"], key=lambda b: -b["score"]),
                                sorted(ref["boxes"], key=lambda b: -b["score"])):
            assert set(ours) == {"xyxy", "label", "class_id", "score"}
            assert ours["label"] == theirs["label"] and ours["class_id"] == ["fire", "smoke"].index(ours["label"])
            assert abs(ours["score"] - theirs["score"]) < 0.03
            assert max(abs(a - b) for a, b in zip(ours["xyxy"], theirs["xyxy"])) < 3.0
    assert "2 image(s)" in result.stderr


def test_detect_single_image_prints_summary(shared_dir, two_valid_images):
    image = sorted(two_valid_images.iterdir())[1]
    result = run_cli("detect", "--weights", str(shared_dir / REF_TRAINED), "--source", str(image),
                     "--img-size", "320", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"{image} (608x608): 2 box(es)" in result.stdout
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["fire", "fire"]


def test_info(shared_dir):
    result = run_cli("info", "--weights", str(shared_dir / REF_TRAINED))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("yolov7-tiny", "IDetect", "fire, smoke", "nc:", "P3/8: 10x13 16x30 33x23", "strides:    8, 16, 32"):
        assert needle in out, out
    as_json = json.loads(run_cli("info", "--weights", str(shared_dir / REF_TRAINED), "--json").stdout)
    assert as_json["nc"] == 2 and list(as_json["names"]) == ["fire", "smoke"]
    assert [int(s) for s in as_json["strides"]] == [8, 16, 32]
    assert as_json["parameters"] > 5_000_000


def test_info_on_truncated_checkpoint_is_a_clean_error(shared_dir):
    path = shared_dir / CHECKPOINTS / "truncated_yolov7-tiny.pt"
    result = run_cli("info", "--weights", str(path))
    assert_clean_error(result, "truncated_yolov7-tiny.pt")
    assert any(word in result.stderr.lower() for word in ("damaged", "corrupt", "truncated"))


def test_not_a_checkpoint(tmp_path):
    fake = tmp_path / "notes.pt"
    fake.write_text("hello")
    assert_clean_error(run_cli("info", "--weights", str(fake)), "notes.pt")


def test_missing_files():
    assert_clean_error(run_cli("info", "--weights", "/nonexistent/best.pt"), "/nonexistent/best.pt")
    assert_clean_error(run_cli("detect", "--weights", "/nonexistent/best.pt", "--source", "."), "best.pt")


def test_missing_source_and_unreadable_image(shared_dir, tmp_path):
    weights = str(shared_dir / REF_TRAINED)
    assert_clean_error(run_cli("detect", "--weights", weights, "--source", str(tmp_path / "nope")), "nope")
    assert_clean_error(run_cli("detect", "--weights", weights, "--source", str(tmp_path)), "holds no images")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    assert_clean_error(run_cli("detect", "--weights", weights, "--source", str(tmp_path)),
                       "broken.jpg", "not a readable image")


def test_bad_device_and_usage():
    result = run_cli("detect", "--weights", "x.pt", "--source", ".", "--device", "gpu7")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert run_cli().returncode == 2  # no command: argparse usage error


def test_detect_leaves_nothing_in_the_folder_it_runs_in(shared_dir, two_valid_images, tmp_path):
    """ONNX exports go to the user's cache folder (~/.cache/yolo-backend/onnx), not ./data of the current folder."""
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_THREADS="1", HOME=str(home), INFERENCE_BACKEND="onnxruntime")
    env.pop("ONNX_CACHE_DIR", None)
    result = subprocess.run([sys.executable, "-m", "yolo_backend", "detect", "--weights", str(shared_dir / REF_TRAINED),
                             "--source", str(two_valid_images), "--img-size", "320"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert list(workdir.iterdir()) == []
    assert list((home / ".cache" / "yolo-backend" / "onnx").glob("*.onnx")), list(home.rglob("*"))
