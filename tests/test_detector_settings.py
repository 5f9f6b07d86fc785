"""One place builds a Detector from the settings (yolo_backend/detector_settings.py); the server's loader, the
converter's options and cli detect all go through it."""

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from yolo_backend import detector_settings
from yolo_backend.convert import DetectOptions, load_checkpoint_detector
from yolo_backend.model_holder import load_detector
from yolo_backend.settings import Settings, SettingsError
from yolo_backend.yolov7 import Detector


class Recorded:
    names = ("fire", "smoke")


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def from_checkpoint(path, **options):
        seen.append((str(path), options))
        return Recorded()

    monkeypatch.setattr(Detector, "from_checkpoint", staticmethod(from_checkpoint))
    return seen


SETTINGS = replace(Settings(), device="cpu", torch_threads=3, inference_backend="torch", onnx_cache_dir="/cache",
                   img_size=320, score_floor=0.1, model_score_threshold=0.4, iou_threshold=0.5, max_detections=50,
                   half=False, predict_batch_size=4)
EXPECTED = {"device": "cpu", "threads": 3, "backend": "torch", "cache_dir": "/cache", "img_size": 320,
            "img_size_setting": "IMG_SIZE", "conf": 0.1, "iou": 0.5, "max_det": 50, "half": False, "batch_size": 4}


def test_settings_feed_the_detector_and_overrides_win(calls):
    detector_settings.detector_from_settings("a.pt", SETTINGS, conf=0.4, img_size=None)
    assert calls == [("a.pt", {**EXPECTED, "conf": 0.4})]
    detector_settings.detector_from_settings("a.pt", SETTINGS, img_size=416)   # an override is not IMG_SIZE
    assert calls[-1] == ("a.pt", {**EXPECTED, "img_size": 416, "img_size_setting": "img_size"})
    with pytest.raises(TypeError, match="not a detector option: colour"):
        detector_settings.detector_from_settings("a.pt", SETTINGS, colour="red")


def test_server_loader_uses_the_settings(calls, tmp_path):
    detector, names = load_detector(tmp_path / "m.pt", SETTINGS)
    assert names == ("fire", "smoke") and calls == [(str(tmp_path / "m.pt"), EXPECTED)]


def test_converter_options_are_the_settings(calls, tmp_path):
    assert DetectOptions().settings() == Settings()          # the defaults are the settings' defaults
    weights = tmp_path / "m.pt"
    weights.write_bytes(b"not read: the detector is recorded")
    options = DetectOptions.from_settings(SETTINGS)
    assert options.settings() == SETTINGS
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("yolo_backend.registry.checkpoint_version", lambda path: "m-1")
        load_checkpoint_detector(weights, options)
    # the converter keeps everything down to the lower of the two thresholds
    assert calls == [(str(weights), EXPECTED)]


# ---- the size a detector runs at: IMG_SIZE, else the checkpoint's training size, else 640 ------------------

@pytest.fixture(scope="module")
def trained_at_320(start_checkpoint, tmp_path_factory):
    """The start checkpoint saved again as a fine-tuned one records itself: trained at 320."""
    from yolo_backend.yolov7.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    model = model_from_checkpoint(load_checkpoint(start_checkpoint), fuse=False)
    return save_checkpoint(tmp_path_factory.mktemp("trained") / "best.pt", model,
                           metadata={"kind": "fine-tuned", "training": {"img_size": 320, "epochs": 1}})


LOCAL = replace(Settings(), device="cpu", torch_threads=1, inference_backend="torch")


def test_img_size_is_unset_by_default_and_checked_when_set():
    assert Settings.from_env({}).img_size is None and Settings.from_env({"IMG_SIZE": ""}).img_size is None
    assert Settings.from_env({"IMG_SIZE": "416"}).img_size == 416
    with pytest.raises(SettingsError, match="multiple of 32"):
        Settings.from_env({"IMG_SIZE": "500"})


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_checkpoint_of_ours_serves_at_its_training_size(trained_at_320, backend, caplog):
    import numpy as np

    settings = replace(LOCAL, inference_backend=backend)
    with caplog.at_level(logging.INFO, logger="yolo_backend.yolov7.detect"):
        detector = detector_settings.detector_from_settings(trained_at_320, settings)
    assert detector.img_size == 320 and detector.img_size_reason == "trained at 320"
    assert "serves at img_size 320 (trained at 320)" in caplog.text
    # the size used is the size run, on either backend (the ONNX export takes any size)
    assert (getattr(detector.model, "backend", "torch") == "onnxruntime") == (backend == "onnxruntime")
    assert detector.letterbox(np.zeros((300, 900, 3), np.uint8)).image.shape[1] == 320
    (found,) = detector.detect([np.full((300, 900, 3), 127, np.uint8)])
    assert (found.width, found.height) == (900, 300)
    assert detector_settings.img_size_for(trained_at_320, settings) == (320, "trained at 320")


def test_img_size_set_wins_over_the_training_size(trained_at_320):
    settings = replace(LOCAL, img_size=640)
    detector = detector_settings.detector_from_settings(trained_at_320, settings)
    assert detector.img_size == 640 and detector.img_size_reason == "IMG_SIZE=640"
    detector = detector_settings.detector_from_settings(trained_at_320, settings, img_size=416,
                                                        img_size_setting="--img-size")
    assert detector.img_size == 416 and detector.img_size_reason == "--img-size=416"
    assert detector_settings.img_size_for(trained_at_320, settings) == (640, "IMG_SIZE=640")
    assert detector_settings.img_size_for(trained_at_320, settings, 416) == (416, "--img-size=416")


GUESS = ("a guess: the checkpoint records no training size; set IMG_SIZE to the size it was trained at, or let the "
         "first training measure it")


def test_official_and_untrained_checkpoints_serve_at_640(ckpt_dir, start_checkpoint, tmp_path):
    from yolo_backend.yolov7.untrained import build_untrained_checkpoint

    official = ckpt_dir / "yolov7-tiny_fire-smoke_ref-trained.pt"
    detector = detector_settings.detector_from_settings(official, LOCAL)
    assert (detector.img_size, detector.img_size_reason, detector.img_size_guess) == (640, GUESS, True)
    detector = detector_settings.detector_from_settings(start_checkpoint, LOCAL)   # ours, recording no size
    assert (detector.img_size, detector.img_size_reason, detector.img_size_guess) == (640, GUESS, True)
    untrained = build_untrained_checkpoint(tmp_path / "untrained.pt", ["fire", "smoke"])   # any size will do
    assert detector_settings.serving_size(untrained, LOCAL) == detector_settings.ServingSize(640, "untrained: 640")
    assert detector_settings.detector_from_settings(official, replace(LOCAL, img_size=320)).img_size == 320
    assert detector_settings.img_size_for(official, LOCAL) == (640, GUESS)


def measured(size=320, images=12, project=3):
    from yolo_backend.serving_size import MeasuredSize, SizeScore

    return MeasuredSize(size, (SizeScore(320, 0.7, 0.3, 0.34), SizeScore(640, 0.2, 0.05, 0.065)), images,
                        "start-1234abcd", project, "job-1")


def test_a_measured_size_serves_and_img_size_still_wins(start_checkpoint, tmp_path):
    from yolo_backend.serving_size import record_size

    settings = replace(LOCAL, model_dir=str(tmp_path / "models"))
    record_size(settings.model_dir, start_checkpoint, measured())
    why = "measured on 12 annotated images of project 3: mAP@0.5 0.700 at 320, 0.200 at 640"
    detector = detector_settings.detector_from_settings(start_checkpoint, settings)
    assert (detector.img_size, detector.img_size_reason, detector.img_size_guess) == (320, why, False)
    assert detector_settings.img_size_for(start_checkpoint, settings) == (320, why)
    found = detector_settings.serving_size(start_checkpoint, settings)
    assert found.measured is not None and found.measured.images == 12 and not found.guess
    # IMG_SIZE, and an explicit size, win over the measurement; another MODEL_DIR knows nothing of it
    assert detector_settings.detector_from_settings(start_checkpoint, replace(settings, img_size=416)).img_size == 416
    assert detector_settings.img_size_for(start_checkpoint, settings, 256) == (256, "--img-size=256")
    assert detector_settings.img_size_for(start_checkpoint, replace(LOCAL, model_dir=str(tmp_path / "other"))) \
        == (640, GUESS)


def test_the_sizes_file_survives_damage_and_keeps_other_entries(start_checkpoint, trained_at_320, tmp_path, caplog):
    from yolo_backend.serving_size import measured_size, read_sizes, record_size, sizes_path

    model_dir = tmp_path / "models"
    record_size(model_dir, start_checkpoint, measured(320))
    record_size(model_dir, trained_at_320, measured(640))            # a second checkpoint: both kept
    assert measured_size(model_dir, start_checkpoint).size == 320
    assert measured_size(model_dir, trained_at_320).size == 640
    record_size(model_dir, start_checkpoint, measured(640, images=40))  # measured again: replaced
    assert measured_size(model_dir, start_checkpoint).images == 40 and len(read_sizes(model_dir)) == 2
    sizes_path(model_dir).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert measured_size(model_dir, start_checkpoint) is None
    assert "cannot be read" in caplog.text
    assert detector_settings.img_size_for(start_checkpoint, replace(LOCAL, model_dir=str(model_dir))) == (640, GUESS)


def test_the_server_loads_at_the_training_size_and_says_why(trained_at_320, tmp_path, caplog):
    from yolo_backend.model_holder import ModelHolder

    holder = ModelHolder(replace(LOCAL, model_path=str(trained_at_320), model_dir=str(tmp_path / "models")))
    with caplog.at_level(logging.INFO, logger="yolo_backend.model_holder"):
        model = holder.get(1)
    assert model.img_size == 320 and model.img_size_reason == "trained at 320"
    assert "img_size 320 (trained at 320)" in caplog.text


def test_the_server_serves_a_new_measurement_without_restart(start_checkpoint, tmp_path, caplog):
    """A server process notices MODEL_DIR/serving-sizes.json like a new version: the same checkpoint (same version
    name) is loaded again at the measured size; until then its load line is a WARNING that says it guesses."""
    import shutil

    from yolo_backend.model_holder import ModelHolder
    from yolo_backend.serving_size import record_size

    best = Path(shutil.copy(start_checkpoint, tmp_path / "best.pt"))
    settings = replace(LOCAL, model_path=str(best), model_dir=str(tmp_path / "models"))
    holder = ModelHolder(settings, check_interval=0.0)
    with caplog.at_level(logging.INFO, logger="yolo_backend.model_holder"):
        first = holder.get(1)
    assert (first.img_size, first.img_size_guess) == (640, True)
    assert [r.levelname for r in caplog.records if "loaded model" in r.getMessage()] == ["WARNING"]
    assert f"img_size 640 ({GUESS})" in caplog.text
    assert holder.serving_size(1) == detector_settings.ServingSize(640, GUESS, guess=True)

    record_size(settings.model_dir, best, measured(320))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolo_backend.model_holder"):
        second = holder.get(1)
    assert second.version == first.version and holder.loads == 2
    assert (second.img_size, second.img_size_guess) == (320, False)
    assert second.img_size_reason.startswith("measured on 12 annotated images of project 3")
    assert [r.levelname for r in caplog.records if "loaded model" in r.getMessage()] == ["INFO"]
    assert holder.serving_size(1).size == 320
    assert holder.get(1) is second and holder.loads == 2   # and kept
    # a fresh holder (another process) reads the same file without loading anything
    assert ModelHolder(settings).serving_size(1).reason == second.img_size_reason
