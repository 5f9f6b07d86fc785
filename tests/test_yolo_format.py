"""One YOLO-format reader (yolov7/yolo_format.py): training (dataset.load_data) and conversion (convert.find_dataset,
convert.read_label_file) read the same datasets the same way."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_backend.convert import ConversionError, ProblemLog, find_dataset, read_label_file
from yolo_backend.yolov7 import yolo_format
from yolo_backend.yolov7.dataset import DatasetError, load_data
from yolo_backend.yolov7.image_files import list_images


def _image(path: Path, width: int = 80, height: int = 60) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 100, np.uint8))


def _labels(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_box_outside_the_image_is_dropped_by_both_and_a_box_over_the_border_clipped_by_both(tmp_path, caplog):
    _image(tmp_path / "images" / "a.jpg")
    _labels(tmp_path / "labels" / "a.txt", "0 1.2 0.5 0.1 0.1\n"      # centre outside: a problem, dropped
                                            "0 0.95 0.5 0.2 0.2\n")   # passes the border: clipped to 0.85..1
    with caplog.at_level(logging.WARNING):
        [sample] = load_data(tmp_path).train
    np.testing.assert_allclose(sample.boxes, [[0.85 * 80, 0.4 * 60, 80, 0.6 * 60]], rtol=1e-6)
    assert "a.txt:1: coordinates must be normalised" in caplog.text and "line skipped" in caplog.text
    assert "a.txt:2: box passes the image border" in caplog.text

    problems = ProblemLog()
    boxes = read_label_file(tmp_path / "labels" / "a.txt", 1, problems)
    assert [(b.cx, b.w) for b in boxes] == [pytest.approx((0.925, 0.15))]
    assert [(p.line, p.kind) for p in problems.problems] == [(1, "out-of-range value"), (2, "clipped box")]


def test_strict_reading_stops_at_the_first_problem(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("0 0.5 0.5 0.2 0.2\n0 1.2 0.5 0.1 0.1\n")
    with pytest.raises(yolo_format.LabelLineError, match=r"a\.txt:2: coordinates") as caught:
        yolo_format.read_label_file(path, strict=True)
    assert caught.value.problem.kind == "out-of-range value"
    with pytest.raises(ConversionError, match=r"a\.txt:2: coordinates.*--strict"):
        read_label_file(path, 1, ProblemLog(strict=True))
    assert len(yolo_format.read_label_file(path, report=lambda problem, outcome: None)) == 1


def test_polygon_lines_give_the_same_box_to_both(tmp_path):
    _image(tmp_path / "images" / "a.jpg", 100, 50)
    _labels(tmp_path / "labels" / "a.txt", "1 0.2 0.3 0.6 0.3 0.5 0.7 0.25 0.6\n")
    [sample] = load_data(tmp_path).train
    np.testing.assert_allclose(sample.boxes, [[20, 15, 60, 35]], rtol=1e-6)
    [box] = read_label_file(tmp_path / "labels" / "a.txt", 2, ProblemLog())
    assert (box.cx, box.cy, box.w, box.h) == pytest.approx((0.4, 0.5, 0.4, 0.4)) and box.polygon


def test_txt_image_lists_and_the_test_split_are_read_by_both(tmp_path):
    for name in ("a", "b", "c"):
        _image(tmp_path / "images" / f"{name}.jpg")
        _labels(tmp_path / "labels" / f"{name}.txt", "0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "train.txt").write_text("images/a.jpg\nimages/b.jpg\n")
    (tmp_path / "data.yaml").write_text("names: [fire]\ntrain: train.txt\nval: images/b.jpg\ntest: images/c.jpg\n")
    spec = load_data(tmp_path / "data.yaml")
    assert [s.name for s in spec.train] == ["a.jpg", "b.jpg"]
    assert [s.name for s in spec.val] == ["b.jpg"] and [s.name for s in spec.test] == ["c.jpg"]
    layout = find_dataset(tmp_path / "data.yaml")
    # Conversion imports an image listed in two splits once; training keeps it in both.
    assert [(e.image.name, e.split) for e in layout.entries] == [("a.jpg", "train"), ("b.jpg", "train"),
                                                                 ("c.jpg", "test")]


def test_gaps_in_names_are_refused_by_both(tmp_path):
    _image(tmp_path / "images" / "a.jpg")
    (tmp_path / "data.yaml").write_text("names: {0: fire, 2: smoke}\ntrain: images\n")
    with pytest.raises(DatasetError, match="without gaps"):
        load_data(tmp_path)
    with pytest.raises(ConversionError, match="without gaps"):
        find_dataset(tmp_path)


def test_roboflow_splits_and_nested_folders(tmp_path):
    for split in ("train", "valid", "test"):
        _image(tmp_path / split / "images" / f"{split}.jpg")
        _labels(tmp_path / split / "labels" / f"{split}.txt", "0 0.5 0.5 0.2 0.2\n")
    spec = load_data(tmp_path)
    assert [s.name for s in spec.train] == ["train.jpg"] and [s.name for s in spec.val] == ["valid.jpg"]
    assert [s.name for s in spec.test] == ["test.jpg"]
    assert {e.split for e in find_dataset(tmp_path).entries} == {"train", "valid", "test"}
    # A plain folder of images is read at any depth by both, as every image listing is.
    _image(tmp_path / "flat" / "deeper" / "x.jpg")
    assert list_images(tmp_path / "flat") == [tmp_path / "flat" / "deeper" / "x.jpg"]
    assert [e.image.name for e in find_dataset(tmp_path / "flat").entries] == ["x.jpg"]
    assert [s.name for s in load_data(tmp_path / "flat").train] == ["x.jpg"]


def test_every_image_listing_is_recursive(tmp_path):
    # The CLI's detect, the converter's detect and the dataset reader list a folder the same way.
    from yolo_backend.cli import _image_paths
    from yolo_backend.convert import iter_image_files

    _image(tmp_path / "b.jpg")
    _image(tmp_path / "sub" / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    expected = [tmp_path / "b.jpg", tmp_path / "sub" / "a.png"]
    assert list_images(tmp_path) == expected
    assert _image_paths(str(tmp_path)) == expected
    assert iter_image_files(tmp_path) == expected
