"""One place builds a Detector from the settings (yolo_backend/detector_settings.py); the server's loader, the
converter's options and cli detect all go through it."""

import logging
from dataclasses import replace

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


def test_official_and_untrained_checkpoints_serve_at_640(ckpt_dir, start_checkpoint):
    official = ckpt_dir / "yolov7-tiny_fire-smoke_ref-trained.pt"
    detector = detector_settings.detector_from_settings(official, LOCAL)
    assert detector.img_size == 640 and detector.img_size_reason == "official checkpoint: 640"
    detector = detector_settings.detector_from_settings(start_checkpoint, LOCAL)   # ours, never trained
    assert detector.img_size == 640 and detector.img_size_reason == "no training size recorded: 640"
    assert detector_settings.detector_from_settings(official, replace(LOCAL, img_size=320)).img_size == 320


def test_the_server_loads_at_the_training_size_and_says_why(trained_at_320, tmp_path, caplog):
    from yolo_backend.model_holder import ModelHolder

    holder = ModelHolder(replace(LOCAL, model_path=str(trained_at_320), model_dir=str(tmp_path / "models")))
    with caplog.at_level(logging.INFO, logger="yolo_backend.model_holder"):
        model = holder.get(1)
    assert model.img_size == 320 and model.img_size_reason == "trained at 320"
    assert "img_size 320 (trained at 320)" in caplog.text
