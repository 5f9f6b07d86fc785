"""yolo_backend.convert: YOLO <-> Label Studio JSON, without torch (the detector is faked here; the CLI test runs a
real checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_backend.active_learning import task_score
from yolo_backend.convert import (ConversionError, DetectOptions, ImageRefs, ImageSources, ProblemLog,
                                  dataset_to_tasks, detections_to_tasks, export_to_yolo, find_dataset,
                                  image_name_from_ref, image_size, label_config_xml, labels_for_classes,
                                  latest_annotation, read_label_file, target_from_config, target_from_flags)
from yolo_backend.yolov7.detections import Detections

NAMES = ["fire", "smoke"]
TARGET = target_from_flags("label", "image", NAMES)

# (file, width, height, label text or None for "no label file")
IMAGES = [
    ("wide.jpg", 640, 360, "0 0.5 0.5 0.25 0.4\n1 0.1 0.2 0.2 0.4\n1 0.95 0.9 0.1 0.2\n"),
    ("tall.png", 300, 500, "1 0.333333 0.7 0.2 0.123457\n0 0.5 0.5 1 1\n"),
    ("negative.jpg", 320, 240, ""),
    ("unlabelled.jpg", 200, 100, None),
]


def read_boxes(path: Path) -> list[tuple[int, float, float, float, float]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            cls, *xywh = line.split()
            rows.append((int(cls), *map(float, xywh)))
    return rows


def assert_same_boxes(a: Path, b: Path, tol: float = 1e-6) -> None:
    ra, rb = sorted(read_boxes(a)), sorted(read_boxes(b))
    assert len(ra) == len(rb), (a, b)
    for x, y in zip(ra, rb):
        assert x[0] == y[0]
        assert np.allclose(x[1:], y[1:], atol=tol, rtol=0), (a, x, y)


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """images/ + labels/ with non-square images, an empty label file and an image without one."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for name, w, h, labels in IMAGES:
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        if labels is not None:
            (root / "labels" / (Path(name).stem + ".txt")).write_text(labels)
    return root


def export_like(tasks: list[dict]) -> list[dict]:
    """What Label Studio's JSON export gives back for imported tasks (ids added)."""
    out = []
    for i, task in enumerate(tasks, 1):
        task = json.loads(json.dumps(task))
        task["id"] = i
        for j, item in enumerate(task.get("annotations", []), 1):
            item.update(id=100 * i + j, was_cancelled=False, created_at="2025-01-01T10:00:00Z")
        out.append(task)
    return out


# --- reading ------------------------------------------------------------------------------------------------------

def test_image_size_reads_header(dataset):
    assert image_size(dataset / "images" / "wide.jpg") == (640, 360)
    assert image_size(dataset / "images" / "tall.png") == (300, 500)
    bad = dataset / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ConversionError, match="broken.jpg"):
        image_size(bad)


def test_find_dataset_layouts(dataset, tmp_path):
    layout = find_dataset(dataset)
    assert [e.image.name for e in layout.entries] == sorted(n for n, *_ in IMAGES)
    by_name = {e.image.name: e for e in layout.entries}
    assert by_name["unlabelled.jpg"].label_file is None
    assert by_name["negative.jpg"].label_file == dataset / "labels" / "negative.txt"
    assert layout.names is None

    # data.yaml with names as a mapping and train/val entries
    (dataset / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: fire, 1: smoke}\n")
    layout = find_dataset(dataset / "data.yaml")
    assert layout.names == NAMES and len(layout.entries) == len(IMAGES)  # each image once
    assert {e.split for e in layout.entries} == {"train"}

    # a flat folder with labels beside the images and classes.txt
    flat = tmp_path / "flat"
    flat.mkdir()
    cv2.imwrite(str(flat / "a.jpg"), np.zeros((10, 20, 3), np.uint8))
    (flat / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (flat / "classes.txt").write_text("fire\nsmoke\n")
    layout = find_dataset(flat)
    assert layout.names == NAMES and layout.entries[0].label_file == flat / "a.txt"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="no images"):
        find_dataset(empty)


def test_malformed_label_lines_are_reported_with_file_and_line(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_text("0 0.5 0.5 0.2 0.2\n"       # good
                    "0 0.5 0.5 0.2\n"            # 2: field count
                    "x 0.5 0.5 0.2 0.2\n"        # 3: non-numeric
                    "0 1.5 0.5 0.2 0.2\n"        # 4: out of range
                    "2 0.5 0.5 0.2 0.2\n"        # 5: unknown class id
                    "0.5 0.5 0.5 0.2 0.2\n"      # 6: class id not whole
                    "\n"
                    "1 0.95 0.5 0.2 0.2\n")      # 8: passes the border -> clipped, kept
    problems = ProblemLog()
    boxes = read_label_file(path, 2, problems)
    assert [(b.class_id, round(b.cx, 6), round(b.w, 6)) for b in boxes] == [(0, 0.5, 0.2), (1, 0.925, 0.15)]
    assert [(p.line, p.kind) for p in problems.problems] == [
        (2, "wrong field count"), (3, "non-numeric"), (4, "out-of-range value"), (5, "unknown class id"),
        (6, "unknown class id"), (8, "clipped box")]
    assert all(p.where == str(path) for p in problems.problems)
    assert f"{path}:3:" in caplog.text  # logged at once, not only counted
    assert "6 problem(s)" in problems.summary("done")

    with pytest.raises(ConversionError, match=r"bad\.txt:2: expected 5 fields.*--strict"):
        read_label_file(path, 2, ProblemLog(strict=True))


def test_polygon_lines_are_read_as_their_bounding_box(tmp_path):
    # YOLO segmentation exports (Roboflow and others) write polygons; a detector trains on their boxes.
    path = tmp_path / "poly.txt"
    path.write_text("1 0.2 0.3 0.6 0.3 0.5 0.7 0.25 0.6\n"   # 4 points
                    "0 0.1 0.1 0.3 0.1 0.2\n")                # 6 fields: neither, wrong field count
    problems = ProblemLog()
    [box] = read_label_file(path, 2, problems)
    assert box.class_id == 1
    assert (box.cx, box.cy, box.w, box.h) == pytest.approx((0.4, 0.5, 0.4, 0.4))
    assert problems.counts["polygons read as their bounding box"] == 1
    assert [(p.line, p.kind) for p in problems.problems] == [(2, "wrong field count")]
    # Not a problem: strict mode accepts the polygon.
    path.write_text("1 0.2 0.3 0.6 0.3 0.5 0.7\n")
    assert len(read_label_file(path, 2, ProblemLog(strict=True))) == 1


# --- YOLO -> Label Studio -> YOLO -------------------------------------------------------------------------------------

@pytest.mark.parametrize("as_annotations", [False, True])
def test_round_trip_non_square_and_empty(dataset, tmp_path, as_annotations):
    layout = find_dataset(dataset)
    refs = ImageRefs.choose(str(tmp_path), None, False, layout.root)
    problems = ProblemLog(strict=True)
    made = dataset_to_tasks(layout, TARGET, NAMES, refs, problems, as_annotations=as_annotations)
    tasks = made.tasks
    assert len(tasks) == len(IMAGES)
    by_name = {Path(t["data"]["image"]).name: t for t in tasks}
    assert by_name["wide.jpg"]["data"]["image"] == "/data/local-files/?d=ds/images/wide.jpg"
    key = "annotations" if as_annotations else "predictions"
    assert key in by_name["negative.jpg"] and by_name["negative.jpg"][key][0]["result"] == []
    assert "predictions" not in by_name["unlabelled.jpg"] and "annotations" not in by_name["unlabelled.jpg"]
    wide = by_name["wide.jpg"][key][0]
    if not as_annotations:
        assert wide["model_version"] == "yolo-labels" and wide["score"] == 1.0
    regions = wide["result"]
    assert len(regions) == 3 and len({r["id"] for r in regions}) == 3
    assert {(r["original_width"], r["original_height"]) for r in regions} == {(640, 360)}
    assert regions[0]["value"]["rectanglelabels"] == ["fire"] and regions[1]["value"]["rectanglelabels"] == ["smoke"]
    assert regions[0]["value"]["x"] == pytest.approx(37.5) and regions[0]["value"]["height"] == pytest.approx(40)
    assert ("score" in regions[0]) != as_annotations
    tall = by_name["tall.png"][key][0]["result"]
    assert (tall[0]["original_width"], tall[0]["original_height"]) == (300, 500)

    out = tmp_path / "back"
    result = export_to_yolo(export_like(tasks), out, ProblemLog(strict=True), names=NAMES,
                            sources=ImageSources(document_root=tmp_path),
                            take="annotations" if as_annotations else "predictions")
    assert (result.written, result.negatives, result.unlabelled, result.images_missing) == (3, 1, 1, 0)
    for name, *_ , labels in IMAGES:
        stem = Path(name).stem
        if labels is None:
            assert not (out / "labels" / f"{stem}.txt").exists()
            continue
        assert_same_boxes(dataset / "labels" / f"{stem}.txt", out / "labels" / f"{stem}.txt")
        assert (out / "images" / name).read_bytes() == (dataset / "images" / name).read_bytes()
    assert (out / "labels" / "negative.txt").read_text() == ""
    data = (out / "data.yaml").read_text()
    assert "names:\n- fire\n- smoke" in data and "nc: 2" in data


def test_round_trip_shared_valid(shared_dir, tmp_path):
    data_root = shared_dir / "data"
    labels_dir = data_root / "fire-smoke" / "labels" / "valid"
    layout = find_dataset(data_root / "fire-smoke" / "images" / "valid")
    refs = ImageRefs.choose(str(data_root), None, False, layout.root)
    made = dataset_to_tasks(layout, TARGET, NAMES, refs, ProblemLog(strict=True), as_annotations=True)
    assert len(made.tasks) == len(list(labels_dir.glob("*.txt"))) == 47
    out = tmp_path / "back"
    result = export_to_yolo(export_like(made.tasks), out, ProblemLog(strict=True), names=NAMES,
                            sources=ImageSources(document_root=data_root), images="symlink")
    assert result.written == 47 and result.boxes == 48 and result.images_missing == 0
    for label in labels_dir.glob("*.txt"):
        assert_same_boxes(label, out / "labels" / label.name)
    assert (out / "images" / (label.stem + ".jpg")).resolve().is_file()


def test_class_names_map_to_config_labels(dataset):
    config = ("<View><Image name='img' value='$photo'/><RectangleLabels name='boxes' toName='img'>"
              "<Label value='Smoke'/><Label value='Fire'/><Label value='Other'/></RectangleLabels></View>")
    target = target_from_config(config)
    assert (target.from_name, target.to_name, target.data_key) == ("boxes", "img", "photo")
    labels = labels_for_classes(NAMES, target.labels)
    assert labels == ["Fire", "Smoke"]
    with pytest.raises(ConversionError, match="'flame'"):
        labels_for_classes(["flame"], target.labels)
    layout = find_dataset(dataset)
    refs = ImageRefs.choose(None, "http://files.local/data", False, layout.root)
    made = dataset_to_tasks(layout, target, labels, refs, ProblemLog())
    task = next(t for t in made.tasks if t["data"]["photo"].endswith("wide.jpg"))
    assert task["data"]["photo"] == "http://files.local/data/images/wide.jpg"
    region = task["predictions"][0]["result"][0]
    assert (region["from_name"], region["to_name"], region["value"]["rectanglelabels"]) == ("boxes", "img", ["Fire"])


def test_written_config_parses_back_to_the_same_target():
    target = target_from_flags("det", "photo", ["fire", "smoke & ash"], data_key="img")
    xml = label_config_xml(target)
    again = target_from_config(xml)
    assert (again.from_name, again.to_name, again.data_key, again.labels) == \
        ("det", "photo", "img", ("fire", "smoke & ash"))


def test_image_refs(tmp_path):
    image = tmp_path / "sub dir" / "a+b.jpg"
    refs = ImageRefs.choose(str(tmp_path), None, False, None)
    ref = refs.ref(image)
    assert ref == "/data/local-files/?d=sub%20dir/a%2Bb.jpg"
    assert ImageSources(document_root=tmp_path).find(ref) is None  # not there yet
    image.parent.mkdir()
    image.write_bytes(b"x")
    assert ImageSources(document_root=tmp_path).find(ref) == tmp_path / "sub dir" / "a+b.jpg"
    with pytest.raises(ConversionError, match="LOCAL_FILES_DOCUMENT_ROOT"):
        ImageRefs.choose(str(tmp_path / "sub dir"), None, False, None).ref(tmp_path / "elsewhere.jpg")
    with pytest.raises(ConversionError, match="--document-root"):
        ImageRefs.choose(None, None, False, tmp_path)
    with pytest.raises(ConversionError, match="not a URL"):
        ImageRefs.choose(None, "files/", False, tmp_path)
    assert image_name_from_ref("/data/upload/3/1a2b3c4d-fire.jpg") == "fire.jpg"
    assert image_name_from_ref("http://host/x/smoke%201.png?sig=1") == "smoke 1.png"


# --- Label Studio export -> YOLO --------------------------------------------------------------------------------------

def region(label, x, y, w, h, rotation=0.0, from_name="label", ow=400, oh=200):
    return {"id": f"r{label}{x}", "from_name": from_name, "to_name": "image", "type": "rectanglelabels",
            "original_width": ow, "original_height": oh,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def test_export_takes_latest_non_cancelled_annotation(tmp_path):
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/7/1a2b3c4d-one.jpg"}, "annotations": [
            {"id": 10, "created_at": "2025-01-01T10:00:00Z", "result": [region("fire", 0, 0, 10, 10)]},
            {"id": 11, "created_at": "2025-01-02T10:00:00Z", "result": [region("smoke", 50, 50, 20, 40)]},
            {"id": 12, "created_at": "2025-01-03T10:00:00Z", "was_cancelled": True, "result": []}]},
        {"id": 2, "data": {"image": "/data/upload/7/deadbeef-two.jpg"},
         "annotations": [{"id": 20, "result": []}]},                              # a negative
        {"id": 3, "data": {"image": "/data/upload/7/0badf00d-three.jpg"}, "annotations": [
            {"id": 30, "was_cancelled": True, "result": [region("fire", 0, 0, 5, 5)]}]},   # skipped only
        {"id": 4, "data": {"image": "http://host/four.jpg"}, "annotations": [
            {"id": 40, "result": [region("fire", 10, 10, 20, 20, rotation=90),
                                  region("flame", 1, 1, 2, 2),
                                  region("fire", 1, 1, 2, 2, from_name="other"),
                                  {"type": "choices", "value": {"choices": ["x"]}}]}]},
    ]
    assert latest_annotation(tasks[0])["id"] == 11
    media = tmp_path / "media"
    (media / "upload" / "7").mkdir(parents=True)
    (media / "upload" / "7" / "1a2b3c4d-one.jpg").write_bytes(b"one")
    problems = ProblemLog()
    out = tmp_path / "out"
    result = export_to_yolo(tasks, out, problems, names=["smoke", "fire"], from_name="label",
                            sources=ImageSources(media_root=media))
    assert (result.written, result.unlabelled, result.negatives, result.images_found) == (3, 1, 1, 1)
    assert read_boxes(out / "labels" / "one.txt") == [(0, 0.6, 0.7, 0.2, 0.4)]
    assert (out / "images" / "one.jpg").read_bytes() == b"one"
    assert (out / "labels" / "two.txt").read_text() == ""
    # rotated 90 degrees about its top-left corner (40,20) px: x in [40-40, 40], y in [20, 20+80] px
    [(cls, cx, cy, w, h)] = read_boxes(out / "labels" / "four.txt")
    assert cls == 1 and np.allclose([cx, cy, w, h], [0.05, 0.3, 0.1, 0.4], atol=1e-9)
    assert {p.kind for p in problems.problems} == {"rotated box", "unknown label"}
    assert "data.yaml" in {p.name for p in out.iterdir()}
    assert "names:\n- smoke\n- fire" in (out / "data.yaml").read_text()
    rows = (out / "sources.tsv").read_text().splitlines()
    assert rows[1].startswith("one.jpg\t1\t/data/upload/7/1a2b3c4d-one.jpg\t")

    # without a class order: sorted label names
    result = export_to_yolo(tasks[:1], tmp_path / "sorted", ProblemLog(), take="annotations")
    assert result.names == ["smoke"]
    with pytest.raises(ConversionError, match="--strict"):
        export_to_yolo(tasks, tmp_path / "strict", ProblemLog(strict=True), names=["fire", "smoke"])


# --- detections -------------------------------------------------------------------------------------------------------

class FakeDetector:
    """Stands in for yolov7.Detector: fixed detections per image size."""

    def __init__(self):
        self.calls = []

    def detect(self, images, conf=None):
        self.calls.append((len(images), conf))
        out = []
        for image in images:
            h, w = image.shape[:2]
            out.append(Detections(np.array([[0, 0, w / 2, h / 2], [w / 4, h / 4, w, h]], np.float32),
                                  np.array([0.9, 0.1], np.float32), np.array([0, 1]), np.array([0.9, 0.2], np.float32),
                                  np.array([[0.95, 0.05], [0.4, 0.5]], np.float32), w, h, ("fire", "smoke")))
        return out


def test_detections_to_tasks_with_fake_detector(dataset, tmp_path):
    images = sorted((dataset / "images").glob("*"))
    broken = dataset / "images" / "zz_broken.jpg"
    broken.write_bytes(b"nope")
    images.append(broken)
    options = DetectOptions(threshold=0.25, score_floor=0.05, batch_size=2)
    detector = FakeDetector()
    problems = ProblemLog()
    made = detections_to_tasks(detector, ("fire", "smoke"), "tiny-abc", images, TARGET,
                               ImageRefs.choose(str(tmp_path), None, False, None), problems, options, progress=False)
    assert len(made.tasks) == 4 and [p.kind for p in problems.problems] == ["unreadable image"]
    assert detector.calls[0] == (2, 0.05)
    wide = next(t for t in made.tasks if t["data"]["image"].endswith("wide.jpg"))["predictions"][0]
    assert wide["model_version"] == "tiny-abc"
    assert [r["score"] for r in wide["result"]] == [pytest.approx(0.9)]          # only the shown box
    expected = task_score(FakeDetector().detect([np.zeros((360, 640, 3), np.uint8)])[0], "uncertainty", 0.25, 0.05)
    assert wide["score"] == pytest.approx(expected) and wide["score"] < 1.0       # the 0.1 box counts
    value = wide["result"][0]["value"]
    assert (value["x"], value["y"], value["width"], value["height"]) == (0, 0, 50, 50)


def test_upload_batches_keep_names_unique_per_batch():
    from yolo_backend.convert.upload import _batches

    images = [Path("a/x.jpg"), Path("b/x.jpg"), Path("a/y.jpg"), Path("c/x.jpg"), Path("a/z.jpg")]
    batches = _batches(images, 2)
    assert sorted(i for b in batches for i in b) == list(range(5))
    for batch in batches:
        assert len(batch) <= 2 and len({images[i].name for i in batch}) == len(batch)


def test_convert_package_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, yolo_backend.convert; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
