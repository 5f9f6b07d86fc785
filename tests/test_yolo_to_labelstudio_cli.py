"""YoloToLabelStudio.py end to end, as users run it (subprocess, repository root as working directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from tests.support import FIRE_SMOKE_CONFIG as CONFIG

REPO = Path(__file__).resolve().parents[1]


def run(*args, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TORCH_THREADS": "2"}
    done = subprocess.run([sys.executable, "YoloToLabelStudio.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    if check_rc is not None:
        assert done.returncode == check_rc, done.stderr
    return done


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("YoloToLabelStudio.py: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """A data.yaml dataset: a 640x360 and a 300x500 image, a negative, and one malformed line."""
    root = tmp_path / "ds"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "train" / "wide.jpg"), np.full((360, 640, 3), 90, np.uint8))
    cv2.imwrite(str(root / "images" / "train" / "tall.png"), np.full((500, 300, 3), 20, np.uint8))
    cv2.imwrite(str(root / "images" / "val" / "neg.jpg"), np.full((240, 320, 3), 200, np.uint8))
    (root / "labels" / "train" / "wide.txt").write_text("0 0.5 0.5 0.25 0.4\n1 0.1 0.2 0.2 0.4\n")
    (root / "labels" / "train" / "tall.txt").write_text("1 0.3 0.7 0.2 0.1\n7 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "val" / "neg.txt").write_text("")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [fire, smoke]\n")
    return root


def test_dataset_export_round_trip(dataset, tmp_path):
    tasks_json, config = tmp_path / "tasks.json", tmp_path / "config.xml"
    done = run("dataset", dataset, "--out", tasks_json, "--document-root", tmp_path, "--as-annotations",
               "--write-config", config, "--no-progress")
    # the unknown class id 7 is reported with file and line, skipped, and counted in the summary
    assert f"{dataset / 'labels' / 'train' / 'tall.txt'}:2: class id 7" in done.stderr
    assert "3 task(s)" in done.stderr and "1 problem(s)" in done.stderr and "1 unknown class id" in done.stderr
    tasks = json.loads(tasks_json.read_text())
    assert [t["data"]["image"] for t in tasks] == [
        "/data/local-files/?d=ds/images/train/tall.png", "/data/local-files/?d=ds/images/train/wide.jpg",
        "/data/local-files/?d=ds/images/val/neg.jpg"]
    assert all("annotations" in t for t in tasks) and tasks[2]["annotations"][0]["result"] == []
    assert "<Label value=\"smoke\"" in config.read_text()

    # Label Studio adds ids; the export goes back to YOLO with the same boxes
    for i, task in enumerate(tasks, 1):
        task["id"] = i
    tasks_json.write_text(json.dumps(tasks))
    out = tmp_path / "back"
    done = run("export", tasks_json, "--out", out, "--label-config", config, "--document-root", tmp_path)
    assert "3 label file(s)" in done.stderr and "no problems" in done.stderr
    expected = {"wide.txt": [(0, 0.5, 0.5, 0.25, 0.4), (1, 0.1, 0.2, 0.2, 0.4)], "tall.txt": [(1, 0.3, 0.7, 0.2, 0.1)],
                "neg.txt": []}
    for name, boxes in expected.items():
        got = [tuple(float(v) for v in line.split()) for line in (out / "labels" / name).read_text().splitlines()]
        assert len(got) == len(boxes)
        for g, e in zip(got, boxes):
            assert g[0] == e[0] and np.allclose(g[1:], e[1:], atol=1e-6, rtol=0)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["neg.jpg", "tall.png", "wide.jpg"]
    assert "- fire\n- smoke" in (out / "data.yaml").read_text()


def test_strict_makes_malformed_lines_fatal(dataset, tmp_path):
    done = run("dataset", dataset, "--out", tmp_path / "t.json", "--document-root", tmp_path, "--strict",
               "--no-progress", check_rc=None)
    assert_one_line_error(done, "tall.txt:2:", "--strict")
    assert not (tmp_path / "t.json").exists()


def test_label_config_and_url_prefix(dataset, tmp_path):
    config = tmp_path / "c.xml"
    config.write_text(CONFIG.replace('"fire"', '"Fire"'))
    run("dataset", dataset, "--out", tmp_path / "t.json", "--url-prefix", "http://files.local/x/",
        "--label-config", config, "--no-progress")
    tasks = json.loads((tmp_path / "t.json").read_text())
    assert tasks[1]["data"]["image"] == "http://files.local/x/images/train/wide.jpg"
    prediction = tasks[1]["predictions"][0]
    assert prediction["model_version"] == "yolo-labels"
    assert [r["value"]["rectanglelabels"] for r in prediction["result"]] == [["Fire"], ["smoke"]]


@pytest.mark.parametrize("args, fragments", [
    (["dataset", "{tmp}/missing", "--out", "{tmp}/t.json", "--document-root", "{tmp}"], ["no such dataset"]),
    (["dataset", "{ds}", "--out", "{tmp}/t.json"], ["--document-root", "--url-prefix", "--upload"]),
    (["dataset", "{ds}/images/train", "--out", "{tmp}/t.json", "--document-root", "{tmp}"], ["--labels"]),
    (["dataset", "{ds}", "--out", "{tmp}/t.json", "--upload"], ["--label-studio-url", "--project"]),
    (["dataset", "{ds}", "--out", "{tmp}/t.json", "--document-root", "{tmp}", "--label-config", "{tmp}/no.xml"],
     ["--label-config", "No such file"]),
    (["dataset", "{ds}", "--out", "{tmp}/t.json", "--document-root", "{tmp}", "--label-config", "{bad_config}"],
     ["RectangleLabels"]),
    (["dataset", "{ds}", "--document-root", "{tmp}"], ["--out is required"]),
    (["dataset", "{ds}", "--out", "{tmp}/t.json", "--document-root", "{tmp}/ds/images/val"], ["not under"]),
    (["export", "{tmp}/notjson.json", "--out", "{tmp}/o"], ["not JSON"]),
    (["export", "--out", "{tmp}/o"], ["--label-studio-url", "--api-key", "--project"]),
    (["detect", "--weights", "{tmp}/none.pt", "--source", "{ds}/images", "--out", "{tmp}/d.json",
      "--document-root", "{tmp}"], ["none.pt", "no such checkpoint"]),
    (["frobnicate"], ["invalid choice"]),
    ([], ["choose a command"]),
])
def test_errors_are_one_line_exit_2(dataset, tmp_path, args, fragments):
    (tmp_path / "notjson.json").write_text("{oops")
    (tmp_path / "bad.xml").write_text("<View><Text name='t' value='$text'/></View>")
    values = {"tmp": tmp_path, "ds": dataset, "bad_config": tmp_path / "bad.xml"}
    env_free = [a.format(**values) for a in args]
    saved = {k: os.environ.pop(k) for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY") if k in os.environ}
    try:
        assert_one_line_error(run(*env_free, check_rc=None), *fragments)
    finally:
        os.environ.update(saved)


def test_detect_with_reference_checkpoint(shared_dir, tmp_path):
    from yolo_backend.registry import checkpoint_version

    weights = shared_dir / "data" / "yolov7-checkpoints" / "yolov7-tiny_fire-smoke_ref-trained.pt"
    valid = shared_dir / "data" / "fire-smoke" / "images" / "valid"
    source = tmp_path / "imgs"
    source.mkdir()
    for image in sorted(valid.glob("*.jpg"))[:3]:
        (source / image.name).symlink_to(image)
    (source / "wide.png").write_bytes(cv2.imencode(".png", cv2.resize(cv2.imread(str(image)), (480, 240)))[1])
    config = tmp_path / "c.xml"
    config.write_text(CONFIG)
    out = tmp_path / "d.json"
    done = run("detect", "--weights", weights, "--source", source, "--out", out, "--document-root", tmp_path,
               "--label-config", config, "--img-size", "320", "--conf", "0.25", "--batch-size", "2")
    assert "detecting" in done.stderr and "4 task(s)" in done.stderr  # progress bar and summary
    tasks = json.loads(out.read_text())
    assert len(tasks) == 4
    version = checkpoint_version(weights)
    boxes = 0
    for task in tasks:
        [prediction] = task["predictions"]
        assert prediction["model_version"] == version
        assert 0.0 <= prediction["score"] <= 1.0
        for region in prediction["result"]:
            assert region["score"] >= 0.25 and region["value"]["rectanglelabels"][0] in ("fire", "smoke")
            boxes += 1
    wide = next(t for t in tasks if t["data"]["image"].endswith("wide.png"))
    for region in wide["predictions"][0]["result"]:
        assert (region["original_width"], region["original_height"]) == (480, 240)
    assert boxes > 0


def test_split_converts_one_split_only(dataset, tmp_path):
    out = tmp_path / "val.json"
    run("dataset", dataset, "--split", "valid", "--out", out, "--url-prefix", "http://files.example/", "--no-progress")
    tasks = json.loads(out.read_text())
    assert [t["data"]["image"].rsplit("/", 1)[-1] for t in tasks] == ["neg.jpg"]
    run("dataset", dataset, "--split", "train", "--out", out, "--url-prefix", "http://files.example/", "--no-progress")
    names = sorted(t["data"]["image"].rsplit("/", 1)[-1] for t in json.loads(out.read_text()))
    assert names == ["tall.png", "wide.jpg"]
    assert_one_line_error(run("dataset", dataset, "--split", "test", "--out", out, "--url-prefix", "x",
                              check_rc=None), "no images in split 'test'", "train, val")
