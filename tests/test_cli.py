"""`python -m yolo_backend detect|info` end to end, in a subprocess like a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = "data/yolov7-checkpoints"
REF_TRAINED = f"{CHECKPOINTS}/yolov7-tiny_fire-smoke_ref-trained.pt"


def run_cli(*args: str, timeout: float = 120, env_extra: Optional[dict] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_THREADS="1")
    for key in ("IMG_SIZE", "MODEL_SCORE_THRESHOLD", "IOU_THRESHOLD", "DEVICE", "MAX_DETECTIONS"):
        env.pop(key, None)
    env.update(env_extra or {})
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
    detections = shared_dir / CHECKPOINTS / "yolov7-tiny_fire-smoke_ref-trained.valid_detections_320.json"
    # one image with a box and one other (the second image of the list has two boxes); generated data: the first two
    files = [item["file"] for item in json.loads(detections.read_text())["images"][:2]] if detections.is_file() \
        else sorted(p.name for p in (shared_dir / "data/fire-smoke/images/valid").glob("*.jpg"))[:2]
    folder = tmp_path_factory.mktemp("images")
    for file in files:
        shutil.copy(shared_dir / "data/fire-smoke/images/valid" / file, folder / file)
    return folder


def test_detect_folder_to_json_matches_reference(shared_dir, reference_outputs, two_valid_images, tmp_path):
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


def test_detect_single_image_prints_summary(shared_dir, reference_outputs, two_valid_images):
    image = sorted(two_valid_images.iterdir())[1]
    result = run_cli("detect", "--weights", str(shared_dir / REF_TRAINED), "--source", str(image),
                     "--img-size", "320", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"{image} (608x608): 2 box(es)" in result.stdout
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["fire", "fire"]


GUESS = ("a guess: the checkpoint records no training size; set IMG_SIZE to the size it was trained at, or let the "
         "first training measure it")


def test_info(shared_dir, tmp_path):
    result = run_cli("info", "--weights", str(shared_dir / REF_TRAINED), env_extra={"MODEL_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("yolov7-tiny", "IDetect", "fire, smoke", "nc:", "P3/8: 10x13 16x30 33x23", "strides:    8, 16, 32"):
        assert needle in out, out
    as_json = json.loads(run_cli("info", "--weights", str(shared_dir / REF_TRAINED), "--json",
                                 env_extra={"MODEL_DIR": str(tmp_path)}).stdout)
    assert as_json["nc"] == 2 and list(as_json["names"]) == ["fire", "smoke"]
    assert [int(s) for s in as_json["strides"]] == [8, 16, 32]
    assert as_json["parameters"] > 5_000_000
    # an official checkpoint records no training size: it serves at 640, and says that this is a guess
    assert "trained at: not recorded" in out and f"serves at:  640 ({GUESS})" in out, out
    assert as_json["trained_img_size"] is None and as_json["serve_img_size"] == 640
    assert as_json["serve_img_size_guess"] is True


def test_info_shows_the_size_a_training_measured(shared_dir, tmp_path):
    from yolo_backend.serving_size import MeasuredSize, SizeScore, record_size

    record_size(tmp_path, shared_dir / REF_TRAINED, MeasuredSize(
        320, (SizeScore(320, 0.747, 0.261, 0.31), SizeScore(640, 0.181, 0.044, 0.058)), 47, "ref-4d19862a", 3))
    env = {"MODEL_DIR": str(tmp_path)}
    out = run_cli("info", "--weights", str(shared_dir / REF_TRAINED), env_extra=env).stdout
    assert "serves at:  320 (measured on 47 annotated images of project 3: mAP@0.5 0.747 at 320, 0.181 at 640)" \
        in out, out
    as_json = json.loads(run_cli("info", "--weights", str(shared_dir / REF_TRAINED), "--json", env_extra=env).stdout)
    assert as_json["serve_img_size"] == 320 and as_json["serve_img_size_guess"] is False
    assert as_json["serve_img_size_measured"]["images"] == 47
    # IMG_SIZE still wins
    out = run_cli("info", "--weights", str(shared_dir / REF_TRAINED), env_extra={**env, "IMG_SIZE": "416"}).stdout
    assert "serves at:  416 (IMG_SIZE=416)" in out, out


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


# ---- the size a checkpoint of ours was trained at -------------------------------------------------------

@pytest.fixture(scope="module")
def ref_trained_as_ours(shared_dir, tmp_path_factory) -> Path:
    """The reference-trained weights (trained at 320) saved in our format, which records that size, like a
    best.pt from our training copied somewhere."""
    from yolo_backend.yolov7.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    model = model_from_checkpoint(load_checkpoint(shared_dir / REF_TRAINED), fuse=False)
    return save_checkpoint(tmp_path_factory.mktemp("ours") / "best.pt", model,
                           metadata={"kind": "fine-tuned", "training": {"img_size": 320}})


def test_info_shows_the_training_size_and_the_serving_size(ref_trained_as_ours):
    result = run_cli("info", "--weights", str(ref_trained_as_ours))
    assert result.returncode == 0, result.stderr
    assert "trained at: 320" in result.stdout and "serves at:  320 (trained at 320)" in result.stdout, result.stdout
    as_json = json.loads(run_cli("info", "--weights", str(ref_trained_as_ours), "--json").stdout)
    assert as_json["trained_img_size"] == 320 and as_json["serve_img_size"] == 320
    assert as_json["serve_img_size_reason"] == "trained at 320"
    as_json = json.loads(run_cli("info", "--weights", str(ref_trained_as_ours), "--json",
                                 env_extra={"IMG_SIZE": "640"}).stdout)
    assert as_json["trained_img_size"] == 320 and as_json["serve_img_size"] == 640
    assert as_json["serve_img_size_reason"] == "IMG_SIZE=640"


def test_detect_without_img_size_runs_at_the_training_size(shared_dir, reference_outputs, ref_trained_as_ours,
                                                           two_valid_images, tmp_path):
    """The issue: a checkpoint trained at 320 found half its boxes at the default 640. Now it finds the boxes the
    reference finds at 320."""
    out = tmp_path / "detections.json"
    result = run_cli("detect", "--weights", str(ref_trained_as_ours), "--source", str(two_valid_images),
                     "--device", "cpu", "--json", str(out))
    assert result.returncode == 0, result.stderr
    reference = json.loads((shared_dir / CHECKPOINTS /
                            "yolov7-tiny_fire-smoke_ref-trained.valid_detections_320.json").read_text())
    expected = {item["file"]: len(item["boxes"]) for item in reference["images"][:2]}
    assert {r["file"]: len(r["boxes"]) for r in json.loads(out.read_text())} == expected


def test_val_without_img_size_follows_the_same_rule(shared_dir, ref_trained_as_ours, two_valid_images, tmp_path,
                                                    monkeypatch, capsys):
    from yolo_backend.cli import main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for image in two_valid_images.iterdir():
        shutil.copy(image, data / "images" / image.name)
        shutil.copy(shared_dir / "data/fire-smoke/labels/valid" / f"{image.stem}.txt", data / "labels")
    (data / "data.yaml").write_text("names: [fire, smoke]\ntrain: images\n")
    monkeypatch.delenv("IMG_SIZE", raising=False)
    args = ["val", "--data", str(data / "data.yaml"), "--device", "cpu", "--threads", "1", "--json"]
    assert main([*args, "--weights", str(ref_trained_as_ours)]) == 0
    assert "evaluating at img_size 320 (trained at 320)" in capsys.readouterr().err
    assert main([*args, "--weights", str(shared_dir / REF_TRAINED)]) == 0
    assert f"evaluating at img_size 640 ({GUESS})" in capsys.readouterr().err
    monkeypatch.setenv("IMG_SIZE", "416")
    assert main([*args, "--weights", str(ref_trained_as_ours)]) == 0
    assert "evaluating at img_size 416 (IMG_SIZE=416)" in capsys.readouterr().err
    assert main([*args, "--weights", str(ref_trained_as_ours), "--img-size", "256"]) == 0
    assert "evaluating at img_size 256 (--img-size=256)" in capsys.readouterr().err
