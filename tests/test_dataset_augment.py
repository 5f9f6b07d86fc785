"""YOLO-format data reading and the training augmentations (boxes must follow the pixels)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yolo_backend.yolov7 import augment
from yolo_backend.yolov7.dataset import (AugmentConfig, DatasetError, EvalSet, Sample, TrainingSet, collate,
                                         load_data, samples_from_arrays)

RED = (230, 20, 20)


def _write_dataset(root: Path, split_dirs=("train", "val"), layout="images/split") -> None:
    for split in split_dirs:
        img_dir = root / "images" / split if layout == "images/split" else root / split / "images"
        lab_dir = root / "labels" / split if layout == "images/split" else root / split / "labels"
        img_dir.mkdir(parents=True)
        lab_dir.mkdir(parents=True)
        for i in range(3):
            image = np.full((60, 80, 3), 100, np.uint8)
            cv2.imwrite(str(img_dir / f"{i}.jpg"), image)
        (lab_dir / "0.txt").write_text("1 0.5 0.5 0.25 0.5\n0 0.1 0.1 0.1 0.1\n")
        (lab_dir / "1.txt").write_text("")  # negative
        (lab_dir / "2.txt").write_text("0 0.5 0.5\nnot numbers here x\n0 0.5 0.5 0.2 0.2\n")  # two bad lines


def test_folder_layout_with_data_yaml(tmp_path, caplog):
    _write_dataset(tmp_path)
    (tmp_path / "data.yaml").write_text("names: {0: fire, 1: smoke}\ntrain: images/train\nval: images/val\n")
    spec = load_data(tmp_path)
    assert spec.names == ["fire", "smoke"]
    assert len(spec.train) == 3 and len(spec.val) == 3
    first = spec.train[0]
    assert first.classes.tolist() == [1, 0]
    assert first.boxes[0].tolist() == pytest.approx([30, 15, 50, 45])  # 0.5±0.125 of 80, 0.5±0.25 of 60
    assert len(spec.train[1].boxes) == 0  # negatives are kept
    assert spec.train[2].classes.tolist() == [0]  # bad lines skipped...
    assert "line skipped" in caplog.text  # ...and reported
    assert load_data(tmp_path / "data.yaml").names == ["fire", "smoke"]


def test_plain_folders_and_roboflow_layout(tmp_path):
    _write_dataset(tmp_path / "a")
    (tmp_path / "a" / "classes.txt").write_text("fire\nsmoke\n")
    spec = load_data(tmp_path / "a")
    assert spec.names == ["fire", "smoke"] and len(spec.val) == 3
    _write_dataset(tmp_path / "b", ("train", "valid"), layout="split/images")
    spec = load_data(tmp_path / "b")
    assert spec.names == ["class0", "class1"] and len(spec.train) == 3 and len(spec.val) == 3
    # A split's images folder alone: labels found beside it.
    spec = load_data(tmp_path / "a" / "images" / "train")
    assert len(spec.train) == 3 and spec.train[0].classes.tolist() == [1, 0]


def test_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such"):
        load_data(tmp_path / "missing")
    (tmp_path / "bad.yaml").write_text("names: [a, b]\nnc: 3\ntrain: images/train\n")
    with pytest.raises(DatasetError, match="nc is 3"):
        load_data(tmp_path / "bad.yaml")
    (tmp_path / "nowhere.yaml").write_text("names: [a]\ntrain: nowhere/images\n")
    with pytest.raises(DatasetError, match="not found"):
        load_data(tmp_path / "nowhere.yaml")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no data.yaml"):
        load_data(tmp_path / "empty")


def _red_square_sample(size=(120, 160)) -> Sample:
    image = np.full((*size, 3), 90, np.uint8)
    image[40:80, 60:100] = RED
    return Sample(image, [[60, 40, 100, 80]], [0])


def _box_is_red(image: np.ndarray, box) -> bool:
    x1, y1, x2, y2 = box
    cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
    return tuple(int(v) for v in image[cy, cx]) == RED


def test_flip_and_letterbox_move_boxes_with_pixels():
    sample = _red_square_sample()
    labels = np.array([[0, 60, 40, 100, 80]], np.float32)
    flipped, flipped_labels = augment.flip_horizontal(sample.image, labels)
    assert flipped_labels[0, 1:].tolist() == [60, 40, 100, 80]  # symmetric about the centre of a 160 wide image
    boxed, boxed_labels = augment.letterbox_square(sample.image, labels, 64)
    assert boxed.shape == (64, 64, 3)
    assert _box_is_red(boxed, boxed_labels[0, 1:])
    vflip, vlabels = augment.flip_vertical(boxed, boxed_labels)
    assert _box_is_red(vflip, vlabels[0, 1:])


def test_random_affine_and_mosaic_keep_boxes_on_their_pixels():
    rng = np.random.default_rng(0)
    sample = _red_square_sample((128, 128))
    labels = np.array([[0, 60, 40, 100, 80]], np.float32)
    for _ in range(10):
        out, out_labels = augment.random_affine(sample.image, labels, rng, (128, 128), translate=0.1, scale=0.5)
        for row in out_labels:
            assert _box_is_red(out, row[1:])
    canvas, mosaic_labels = augment.mosaic([sample.image] * 4, [labels] * 4, 128, rng)
    assert canvas.shape == (256, 256, 3)
    assert (mosaic_labels[:, 1:] >= 0).all() and (mosaic_labels[:, 1:] <= 256).all()
    # Identity settings change nothing.
    same, same_labels = augment.random_affine(sample.image, labels, rng, (128, 128), translate=0, scale=0)
    assert np.array_equal(same, sample.image) and np.allclose(same_labels, labels)


def test_hsv_changes_colours_not_shape():
    rng = np.random.default_rng(1)
    image = _red_square_sample().image
    out = augment.augment_hsv(image, rng)
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    assert augment.augment_hsv(image, rng, 0, 0, 0) is image


def test_training_set_items_are_seeded_and_normalised():
    samples = [_red_square_sample(), _red_square_sample((100, 100)), Sample(np.zeros((50, 70, 3), np.uint8))]
    config = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0)
    data = TrainingSet(samples, 64, config, seed=3)
    image, targets = data[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert targets.shape[1] == 6 and ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
    again, again_targets = data[0]
    assert torch.equal(image, again) and torch.equal(targets, again_targets)
    data.set_epoch(1)
    assert not torch.equal(data[0][0], image)  # another epoch, other augmentation
    # Every augmented box still sits on red pixels (hsv off).
    for epoch in range(4):
        data.set_epoch(epoch)
        for i in range(3):
            img, labels = data.item(i)
            for row in labels:
                assert _box_is_red(img, row[1:])
    batch_images, batch_targets = collate([data[0], data[1], data[2]])
    assert batch_images.shape == (3, 3, 64, 64)
    assert set(batch_targets[:, 0].tolist()) <= {0.0, 1.0, 2.0}


def test_no_augmentation_is_a_plain_letterbox_and_eval_set_scales_boxes():
    sample = _red_square_sample()  # 160x120 -> 64x48 inside a 64x64 square
    data = TrainingSet([sample], 64, AugmentConfig.none())
    image, labels = data.item(0)
    assert labels[0, 1:].tolist() == pytest.approx([24, 8 + 16, 40, 8 + 32])
    evals = list(EvalSet(samples_from_arrays([(sample.image, sample.boxes, sample.classes)]), 64))
    eval_image, boxes, classes = evals[0]
    assert eval_image.shape == (48, 64, 3) and boxes[0].tolist() == pytest.approx([24, 16, 40, 32])
    assert classes.tolist() == [0]


def test_exif_rotated_photo_gets_its_boxes_in_the_displayed_orientation(tmp_path):
    # A phone photo stored 64x32 with EXIF orientation 6 is displayed (and read by read_image) as 32x64; YOLO
    # labels are normalised to the displayed image, so boxes must be scaled by 32 across and 64 down.
    from PIL import Image

    from yolo_backend.yolov7.dataset import samples_from_folder

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image = Image.new("RGB", (64, 32), (200, 30, 30))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "images" / "phone.jpg", "JPEG", exif=exif.tobytes())
    (tmp_path / "labels" / "phone.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    [sample] = samples_from_folder(tmp_path / "images")
    assert sample.load_image().shape[:2] == (64, 32)
    np.testing.assert_allclose(sample.boxes, [[8, 16, 24, 48]])
