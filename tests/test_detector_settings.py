"""One place builds a Detector from the settings (yolo_backend/detector_settings.py); the server's loader, the
converter's options and cli detect all go through it."""

from dataclasses import replace

import pytest

from yolo_backend import detector_settings
from yolo_backend.convert import DetectOptions, load_checkpoint_detector
from yolo_backend.model_holder import load_detector
from yolo_backend.settings import Settings
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
EXPECTED = {"device": "cpu", "threads": 3, "backend": "torch", "cache_dir": "/cache", "img_size": 320, "conf": 0.1,
            "iou": 0.5, "max_det": 50, "half": False, "batch_size": 4}


def test_settings_feed_the_detector_and_overrides_win(calls):
    detector_settings.detector_from_settings("a.pt", SETTINGS, conf=0.4, img_size=None)
    assert calls == [("a.pt", {**EXPECTED, "conf": 0.4})]
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
