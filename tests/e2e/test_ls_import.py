"""Issue 6, end to end: tasks JSON made by YoloToLabelStudio.py imports into a real Label Studio 1.23, and the
project's export (through the API, label-studio-sdk) converts back to the same YOLO boxes.

Runs once per token mode (fixture `label_studio`: legacy token, and JWT-only with a personal access token).
Covers the three ways tasks reference images: local files (document root), URLs, and upload through the API.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from . import harness

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = harness.REPO_ROOT


def cli(*args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "YoloToLabelStudio.py", *map(str, args), *(
        ["--no-progress"] if args[0] == "dataset" else [])], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def read_labels(path: Path) -> list[tuple]:
    return sorted(tuple(float(v) for v in line.split()) for line in path.read_text().splitlines() if line.strip())


def assert_same_labels(expected_dir: Path, got_dir: Path, names: list[str]) -> None:
    for stem in names:
        expected, got = read_labels(expected_dir / f"{stem}.txt"), read_labels(got_dir / f"{stem}.txt")
        assert len(expected) == len(got), stem
        for e, g in zip(expected, got):
            assert e[0] == g[0] and np.allclose(e[1:], g[1:], atol=1e-6, rtol=0), (stem, e, g)


@pytest.fixture()
def yolo_dataset(label_studio, valid_images, tmp_path) -> Path:
    """Under Label Studio's local-files root: 3 photos with labels, a 640x360 one and an empty-label negative."""
    root = label_studio.files_root / f"yolo-{tmp_path.name}"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    labels_dir = valid_images.parent.parent / "labels" / "valid"
    for photo in sorted(valid_images.glob("*.jpg"))[:3]:
        shutil.copy(photo, root / "images" / photo.name)
        shutil.copy(labels_dir / f"{photo.stem}.txt", root / "labels" / f"{photo.stem}.txt")
    wide = cv2.resize(cv2.imread(str(photo)), (640, 360))
    cv2.imwrite(str(root / "images" / "wide.jpg"), wide)
    (root / "labels" / "wide.txt").write_text("0 0.5 0.5 0.25 0.4\n1 0.1 0.2 0.2 0.4\n")
    cv2.imwrite(str(root / "images" / "negative.png"), np.full((500, 300, 3), 128, np.uint8))
    (root / "labels" / "negative.txt").write_text("")
    (root / "classes.txt").write_text("fire\nsmoke\n")
    return root


def stems(dataset: Path) -> list[str]:
    return sorted(p.stem for p in (dataset / "labels").glob("*.txt"))


@pytest.fixture()
def label_config(tmp_path) -> Path:
    path = tmp_path / "config.xml"
    path.write_text(harness.FIRE_SMOKE_LABEL_CONFIG)
    return path


def test_import_local_files_predictions_and_annotations(label_studio, yolo_dataset, label_config, tmp_path):
    api = label_studio.api
    for as_annotations in (False, True):
        tasks_json = tmp_path / f"tasks-{as_annotations}.json"
        cli("dataset", yolo_dataset, "--out", tasks_json, "--document-root", label_studio.files_root,
            "--label-config", label_config, *(["--as-annotations"] if as_annotations else []))
        made = json.loads(tasks_json.read_text())
        project = api.create_project(f"import-{as_annotations}", harness.FIRE_SMOKE_LABEL_CONFIG)["id"]
        # Label Studio serves /data/local-files/ only below a Local Files storage of the project (not synced:
        # the tasks come from our JSON)
        api.post("/api/storages/localfiles", json={"project": project, "path": str(yolo_dataset),
                                                    "title": "yolo", "use_blob_urls": False})
        answer = api.import_tasks(project, made)
        assert answer["task_count"] == len(made) == 5, answer
        stored = api.tasks(project)
        assert len(stored) == 5
        by_ref = {t["data"]["image"]: t for t in stored}
        for task in made:
            got = by_ref[task["data"]["image"]]
            # Label Studio serves the referenced local file
            response = api.request("GET", task["data"]["image"])
            assert response.headers.get("Content-Type", "").startswith("image/"), task["data"]["image"]
            if as_annotations:
                [annotation] = api.get(f"/api/tasks/{got['id']}/annotations")
                result, expected = annotation["result"], task["annotations"][0]["result"]
            else:
                [prediction] = api.predictions(got["id"])
                assert prediction["model_version"] == "yolo-labels"
                assert prediction["score"] == pytest.approx(1.0)
                result, expected = prediction["result"], task["predictions"][0]["result"]
            assert len(result) == len(expected)
            for r, e in zip(sorted(result, key=lambda r: r["id"]), sorted(expected, key=lambda e: e["id"])):
                assert (r["original_width"], r["original_height"]) == (e["original_width"], e["original_height"])
                assert r["value"]["rectanglelabels"] == e["value"]["rectanglelabels"]
                for key in ("x", "y", "width", "height"):
                    assert r["value"][key] == pytest.approx(e["value"][key], abs=1e-9)

        # back through the API export (label-studio-sdk), class order from the project's config
        out = tmp_path / f"back-{as_annotations}"
        done = cli("export", "--label-studio-url", label_studio.url, "--api-key", label_studio.api_key,
                   "--project", project, "--out", out, "--document-root", label_studio.files_root,
                   "--take", "annotations" if as_annotations else "predictions")
        assert "5 label file(s)" in done.stderr and "images: 5 found" in done.stderr, done.stderr
        assert_same_labels(yolo_dataset / "labels", out / "labels", stems(yolo_dataset))
        assert "- fire\n- smoke" in (out / "data.yaml").read_text()


def test_upload_through_the_api_and_export_back(label_studio, yolo_dataset, label_config, tmp_path):
    api = label_studio.api
    project = api.create_project("upload", harness.FIRE_SMOKE_LABEL_CONFIG)["id"]
    record = tmp_path / "uploaded.json"
    done = cli("dataset", yolo_dataset, "--upload", "--label-studio-url", label_studio.url, "--api-key",
               label_studio.api_key, "--project", project, "--label-config", label_config, "--as-annotations",
               "--out", record)
    assert "5 task(s)" in done.stderr, done.stderr
    stored = api.tasks(project)
    assert len(stored) == 5
    assert all(t["data"]["image"].startswith(f"/data/upload/{project}/") for t in stored)
    assert sum(len(api.get(f"/api/tasks/{t['id']}/annotations")) for t in stored) == 5
    assert {t["id"] for t in json.loads(record.read_text())} == {t["id"] for t in stored}

    out = tmp_path / "back"
    done = cli("export", "--label-studio-url", label_studio.url, "--api-key", label_studio.api_key,
               "--project", project, "--out", out, "--image-dir", yolo_dataset / "images")
    assert "5 label file(s)" in done.stderr and "images: 5 found" in done.stderr, done.stderr
    assert_same_labels(yolo_dataset / "labels", out / "labels", stems(yolo_dataset))
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        p.name for p in (yolo_dataset / "images").iterdir())
