"""Video predictions: clips made here (OpenCV's VideoWriter, mp4v) -> tracks -> videorectangle regions over HTTP.

A stand-in detector (it finds whatever differs from the flat background) drives the tracker and the bad-file tests;
one test runs the real detector end to end through the Flask app on a camera pan over a real fire photo.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import struct
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from model_backend import YOLOv7Backend
from tests.support import FAKE_BACKEND_URL  # noqa: F401 (support sets up the test settings)
from yolo_backend.runtime import BackendContext
from yolo_backend.server.app import create_app
from yolo_backend.settings import Settings
from yolo_backend.video_frames import sampled_frames
from yolo_backend.video_tracks import TrackOptions, low_tail_mean, track_video
from yolo_backend.yolov7.detections import Detections

NAMES = ("fire", "smoke")
BACKGROUND = 90
CONFIG = """<View>
  <Labels name="videoLabels" toName="video" allowEmpty="true"><Label value="fire"/><Label value="smoke"/></Labels>
  <Video name="video" value="$video" framerate="{rate}"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""
IMAGE_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="fire"/><Label value="smoke"/></RectangleLabels></View>"""


def fire_patch(shared: Path, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """A crop of a real fire photo (../shared, or its generated stand-in), resized to ``size`` (w, h), BGR."""
    image = cv2.imread(str(sorted((shared / "data" / "fire-smoke" / "images" / "valid").glob("*.jpg"))[0]))
    h, w = image.shape[:2]
    return cv2.resize(image[h // 4: 3 * h // 4, w // 4: 3 * w // 4], size)


def moving(index: int) -> tuple[int, int]:
    """Object A's top-left corner on frame ``index``: 4 px right and 1 px down per frame."""
    return 10 + 4 * index, 20 + index


def write_scene(path: Path, patch: np.ndarray, frames: int = 40, fps: float = 10.0,
                size: tuple[int, int] = (320, 180), second: tuple[int, int] = (12, 28)) -> Path:
    """Object A moves across the whole clip; object B stands at the right on frames ``second`` [start, end)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    ph, pw = patch.shape[:2]
    for index in range(frames):
        image = np.full((size[1], size[0], 3), BACKGROUND, np.uint8)
        x, y = moving(index)
        image[y:y + ph, x:x + pw] = patch
        if second[0] <= index < second[1]:
            image[110:110 + ph, 260:260 + pw] = patch
        writer.write(image)
    writer.release()
    return path


class BlobDetector:
    """Stand-in detector: every blob that differs from the flat background is a fire at 0.9."""

    def __init__(self, delay: float = 0.0, blind: tuple[int, ...] = ()):
        self.delay, self.frames, self.blind = delay, 0, blind   # blind: the n-th frames seen, where it sees nothing

    def detect(self, images, conf=None, embed=False):
        time.sleep(self.delay)
        found = [self._one(image) if self.frames + n not in self.blind else self._one(image[:0])
                 for n, image in enumerate(images)]
        self.frames += len(images)
        for one, image in zip(found, images):
            if embed:  # the frame's mean brightness and its blob count, as a stand-in embedding
                one.embedding = np.array([image.mean(), len(one)], np.float32)
        return found

    @staticmethod
    def _one(rgb: np.ndarray) -> Detections:
        if not rgb.size:
            return Detections.empty(320, 180, NAMES)
        h, w = rgb.shape[:2]
        mask = (np.abs(rgb.astype(np.int16) - BACKGROUND).max(axis=2) > 30).astype(np.uint8)
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
        boxes = [(x, y, x + bw, y + bh) for x, y, bw, bh, area in stats[1:count] if area > 100]
        n = len(boxes)
        scores = np.full(n, 0.9, np.float32)
        return Detections(np.array(boxes, np.float32).reshape(n, 4), scores, np.zeros(n, np.int64), scores,
                          np.tile(np.array([[0.95, 0.05]], np.float32), (n, 1)), w, h, NAMES)


# --- tracking ------------------------------------------------------------------------------------------------------
def test_one_moving_object_stays_one_track_and_one_entering_and_leaving_gets_its_own(shared_dir, tmp_path):
    clip = write_scene(tmp_path / "scene.mp4", fire_patch(shared_dir))
    found = track_video(sampled_frames(clip, step=2), BlobDetector().detect, TrackOptions(fps=10.0, batch_size=3))
    assert len(found.times) == 20 and (found.width, found.height) == (320, 180)
    assert len(found.tracks) == 2, [len(t.boxes) for t in found.tracks]
    a, b = found.tracks
    assert [box.frame_index for box in a.boxes] == list(range(0, 40, 2))   # every sampled frame, the first too
    for box in a.boxes:
        x, y = moving(box.frame_index)
        assert box.xyxy[0] == pytest.approx(x, abs=2) and box.xyxy[1] == pytest.approx(y, abs=2)
    assert [box.frame_index for box in b.boxes] == list(range(12, 28, 2))   # from where it enters to where it left
    assert a.score == pytest.approx(0.9) and {box.class_id for box in a.boxes} == {0}


def test_the_tracker_runs_on_the_headless_opencv_only():
    """requirements-nodeps.txt installs trackers without its dependencies: no opencv-python beside the headless."""
    from importlib import metadata

    pinned = dict(line.split("==") for line in (Path(__file__).parents[1] / "requirements-nodeps.txt").read_text()
                  .splitlines() if line.strip() and not line.startswith("#"))
    assert metadata.version("trackers") == pinned["trackers"]
    assert metadata.version("opencv-python-headless")
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("opencv-python")


def test_the_task_score_is_the_mean_of_the_lowest_tenth():
    assert low_tail_mean([]) == 1.0
    assert low_tail_mean([0.9, 0.2, 0.8]) == pytest.approx(0.2)
    scores = [i / 100 for i in range(100, 0, -1)]
    assert low_tail_mean(scores) == pytest.approx(np.mean([i / 100 for i in range(1, 11)]))


# --- through the app --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_server(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def app_client(tmp_path: Path, detector=None, **overrides):
    model = tmp_path / "best.pt"
    model.write_text("weights")
    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), image_cache_dir=str(tmp_path / "cache"),
                                 model_path=str(model), backend_url=FAKE_BACKEND_URL, **overrides)
    detector = detector or BlobDetector()
    context = BackendContext.from_settings(settings, loader=lambda path, s: (detector, NAMES))
    return create_app(YOLOv7Backend, context=context).test_client()


def check_region(region: dict, rate: float) -> list[dict]:
    """The stored shape of one videorectangle region; its sequence."""
    assert region["type"] == "videorectangle" and (region["from_name"], region["to_name"]) == ("box", "video")
    value = region["value"]
    sequence = value["sequence"]
    assert value["labels"] == ["fire"] and 0.0 <= region["score"] <= 1.0
    assert [k["frame"] for k in sequence] == sorted(k["frame"] for k in sequence)
    assert all(1 <= k["frame"] <= value["framesCount"] for k in sequence)
    assert value["duration"] == pytest.approx(value["framesCount"] / rate, abs=1.5 / rate)
    for k in sequence:
        assert k["time"] == pytest.approx(k["frame"] / rate)
        assert 0 <= k["x"] and 0 <= k["y"] and k["x"] + k["width"] <= 100.0001 and k["y"] + k["height"] <= 100.0001
        assert k["width"] > 0 and k["height"] > 0
    assert sequence[-1]["enabled"] is False
    return sequence


def test_a_tag_frame_rate_other_than_the_files_keeps_boxes_on_their_true_time(shared_dir, tmp_path):
    """The file is 10 fps (frame i is shown at i / 10 s) and the Video tag says 25: each keyframe's box is where
    the object was at that keyframe's time, whatever the frame numbers."""
    (tmp_path / "clips").mkdir()
    clip = write_scene(tmp_path / "clips" / "scene.mp4", fire_patch(shared_dir), second=(0, 0))
    client = app_client(tmp_path, video_frame_step=2)
    with file_server(clip.parent) as base:
        answer = client.post("/predict", json={"tasks": [{"id": 7, "data": {"video": f"{base}/scene.mp4"}}],
                                               "label_config": CONFIG.format(rate=25), "project": "1.1"})
    assert answer.status_code == 200, answer.get_json()
    item = answer.get_json()["results"][0]
    assert len(item["result"]) == 1 and 0.0 <= item["score"] <= 1.0
    region = item["result"][0]
    sequence = check_region(region, 25.0)
    assert region["value"]["framesCount"] == 100                       # 4 s at the tag's 25 fps
    assert sequence[0]["frame"] == 1 and sequence[-1]["frame"] == 1 + round(38 / 10 * 25)
    assert len(sequence) < 20                                           # sparse: a straight motion, few keyframes
    for k in sequence:
        x, y = moving(round((k["frame"] - 1) / 25 * 10))                  # the file's frame shown at that time
        assert k["x"] * 320 / 100 == pytest.approx(x, abs=2) and k["y"] * 180 / 100 == pytest.approx(y, abs=2)


CONTAINERS = (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts")


def variable_rate(path: Path, slow: int = 2048, fast: int = 512) -> list[float]:
    """Rewrite an mp4v MP4 that OpenCV wrote (one ``stts`` entry: every frame 1024 ticks of 10240/s, the ``moov``
    after the ``mdat``) so its first half lasts ``slow`` ticks a frame and its second half ``fast``: a variable
    frame rate whose average (what the container's fps says) fits neither half. Returns each frame's true time."""
    data = bytearray(path.read_bytes())
    stts = _find(data, b"stts")
    count, delta = struct.unpack(">II", data[stts[0] + 16: stts[0] + 24])
    assert delta == 1024 and _timescale(data) == 10240, "OpenCV wrote another MP4 layout than this test knows"
    half = count // 2
    entries = struct.pack(">IIIII", 2, half, slow, count - half, fast)
    data[stts[0] + 12: stts[0] + 24] = entries
    for offset in stts[1:] + stts[:1]:                   # the stts and each box around it grow by 8 bytes
        size = struct.unpack(">I", data[offset: offset + 4])[0]
        data[offset: offset + 4] = struct.pack(">I", size + 8)
    ticks = half * slow + (count - half) * fast
    _set_durations(data, ticks)
    path.write_bytes(bytes(data))
    return [i * slow / 10240 if i < half else (half * slow + (i - half) * fast) / 10240 for i in range(count)]


def _find(data: bytearray, kind: bytes, start: int = 0, end: int = 0, parents: tuple = ()) -> list[int]:
    """Offsets of the box ``kind`` and of its parents, innermost first ([] when absent)."""
    offset, end = start, end or len(data)
    while offset < end:
        size, typ = struct.unpack(">I4s", data[offset: offset + 8])
        if typ == kind:
            return [offset, *reversed(parents)]
        if typ in CONTAINERS:
            found = _find(data, kind, offset + 8, offset + size, parents + (offset,))
            if found:
                return found
        offset += size
    return []


def _timescale(data: bytearray) -> int:
    return struct.unpack(">I", data[_find(data, b"mdhd")[0] + 20: _find(data, b"mdhd")[0] + 24])[0]


def _set_durations(data: bytearray, ticks: int) -> None:
    """mdhd (media ticks), mvhd, tkhd and the edit list (movie ticks: 1000/s) say the new length."""
    mdhd = _find(data, b"mdhd")[0]
    data[mdhd + 24: mdhd + 28] = struct.pack(">I", ticks)
    millis = ticks * 1000 // 10240
    mvhd, tkhd, elst = _find(data, b"mvhd")[0], _find(data, b"tkhd")[0], _find(data, b"elst")
    data[mvhd + 24: mvhd + 28] = struct.pack(">I", millis)
    data[tkhd + 28: tkhd + 32] = struct.pack(">I", millis)
    if elst:
        data[elst[0] + 16: elst[0] + 20] = struct.pack(">I", millis)


def test_a_variable_frame_rate_keeps_every_box_on_its_true_time(shared_dir, tmp_path):
    """First half 0.2 s a frame, second half 0.05 s: the container's average rate (8 fps) fits no frame, and
    index / fps would put frame 10 at 1.25 s instead of 2.0 s. Each keyframe's box must be the one shown then."""
    (tmp_path / "clips").mkdir()
    clip = write_scene(tmp_path / "clips" / "vfr.mp4", fire_patch(shared_dir), frames=20, second=(0, 0))
    times = variable_rate(clip)
    assert cv2.VideoCapture(str(clip)).get(cv2.CAP_PROP_FPS) == pytest.approx(8.0, abs=0.1)
    client = app_client(tmp_path, video_frame_step=1)
    with file_server(clip.parent) as base:
        answer = client.post("/predict", json={"tasks": [{"id": 3, "data": {"video": f"{base}/vfr.mp4"}}],
                                               "label_config": CONFIG.format(rate=20), "project": "1.1"})
    [region] = answer.get_json()["results"][0]["result"]
    sequence = check_region(region, 20.0)
    assert sequence[0]["frame"] == 1 and sequence[-1]["frame"] == 1 + round(times[-1] * 20)   # 2.45 s: frame 50
    assert [round(f.time_s, 4) for f in sampled_frames(clip)] == [round(t, 4) for t in times]  # the decoder's word
    assert [k["enabled"] for k in sequence] == [True] * (len(sequence) - 1) + [False]     # one run throughout
    by_frame = {1 + round(t * 20): i for i, t in enumerate(times)}
    assert {k["frame"] for k in sequence} <= set(by_frame)                  # keyframes only where a frame was
    for k in sequence:
        x, y = moving(by_frame[k["frame"]])
        assert k["x"] * 320 / 100 == pytest.approx(x, abs=2) and k["y"] * 180 / 100 == pytest.approx(y, abs=2)


def test_a_track_missed_on_one_sampled_frame_stays_shown_and_a_longer_miss_is_a_gap(shared_dir, tmp_path):
    """The detector misses the object on sampled frame 4 (one frame: bridged) and on 8 to 10 (three: the region
    ends at 7, disabled, and starts again at 11; ByteTrack keeps its id over 0.6 s)."""
    (tmp_path / "clips").mkdir()
    write_scene(tmp_path / "clips" / "a.mp4", fire_patch(shared_dir), frames=30, second=(0, 0))
    client = app_client(tmp_path, detector=BlobDetector(blind=(4, 8, 9, 10)), video_frame_step=2)
    with file_server(tmp_path / "clips") as base:
        answer = client.post("/predict", json={"tasks": [{"id": 1, "data": {"video": f"{base}/a.mp4"}}],
                                               "label_config": CONFIG.format(rate=10), "project": "1.1"})
    [region] = answer.get_json()["results"][0]["result"]
    sequence = check_region(region, 10.0)
    disabled = [k["frame"] for k in sequence if not k["enabled"]]
    assert disabled == [1 + 2 * 7, 1 + 2 * 14]             # sampled frame 7 (decoded 14, Label Studio 15), the end
    assert 1 + 2 * 11 in [k["frame"] for k in sequence]    # back on sampled frame 11
    assert not any(1 + 2 * 4 == k["frame"] for k in sequence if not k["enabled"])


def test_bad_files_get_no_prediction_and_the_others_still_do(shared_dir, tmp_path, caplog):
    folder = tmp_path / "clips"
    folder.mkdir()
    patch = fire_patch(shared_dir)
    write_scene(folder / "good.mp4", patch, frames=10)
    whole = write_scene(folder / "whole.mp4", patch, frames=10).read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (folder / "notes.mp4").write_text("these are my notes, not a video\n" * 50)
    write_scene(folder / "big.mp4", np.zeros((30, 40, 3), np.uint8) + 200, frames=4, size=(640, 480))
    client = app_client(tmp_path, video_max_pixels=320 * 180)
    names = ["truncated.mp4", "good.mp4", "notes.mp4", "big.mp4", "missing.mp4"]
    with file_server(folder) as base, caplog.at_level(logging.WARNING):
        answer = client.post("/predict", json={
            "tasks": [{"id": 100 + i, "data": {"video": f"{base}/{name}"}} for i, name in enumerate(names)],
            "label_config": CONFIG.format(rate=10), "project": "1.1"})
    assert answer.status_code == 200, answer.get_json()
    items = answer.get_json()["results"]
    assert "result" in items[1] and len(items[1]["result"]) == 1
    for i in (0, 2, 3, 4):
        assert "result" not in items[i], (names[i], items[i])
        assert f"task {100 + i}: video not available, no prediction" in caplog.text, names[i]
    assert "beyond the bound of 57600 pixels" in caplog.text and "HTTP 404" in caplog.text


def test_many_videos_answer_by_the_deadline_with_what_is_done(shared_dir, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_scene(folder / "a.mp4", fire_patch(shared_dir), frames=8, second=(0, 0))
    client = app_client(tmp_path, detector=BlobDetector(delay=0.15), predict_deadline_s=1.0, predict_batch_size=1,
                        video_frame_step=2)
    with file_server(folder) as base:
        import trackers  # noqa: F401  (a process's first video imports it, ~1.5 s: not what is measured here)

        started = time.monotonic()
        answer = client.post("/predict", json={
            "tasks": [{"id": i, "data": {"video": f"{base}/a.mp4"}} for i in range(8)],
            "label_config": CONFIG.format(rate=10), "project": "1.1"})
        elapsed = time.monotonic() - started
    items = answer.get_json()["results"]
    assert answer.status_code == 200 and len(items) == 8
    assert "result" in items[0] and "result" not in items[-1]           # 4 frames x 0.15 s: two clips at most
    assert elapsed < 1.0 + 4 * 0.15 + 1.0                              # one batch past the deadline, not 8 clips


class DrippingHandler(http.server.BaseHTTPRequestHandler):
    """A video server that sends a byte every 0.1 s (a slow link), until the client goes."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(600):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)

    def log_message(self, *args):
        pass


def test_a_slow_download_is_cut_at_the_deadline_and_left_for_later(tmp_path, caplog):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DrippingHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    client = app_client(tmp_path, predict_deadline_s=1.0, video_timeout=60.0)
    try:
        with caplog.at_level(logging.INFO):
            started = time.monotonic()
            answer = client.post("/predict", json={
                "tasks": [{"id": i, "data": {"video": f"http://127.0.0.1:{server.server_port}/slow{i}.mp4"}}
                          for i in range(3)], "label_config": CONFIG.format(rate=10), "project": "1.1"})
            elapsed = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert answer.status_code == 200 and all("result" not in item for item in answer.get_json()["results"])
    assert elapsed < 5.0, f"{elapsed:.1f} s: VIDEO_TIMEOUT (60 s) held the answer past PREDICT_DEADLINE_S"
    assert "predicted 0 of 3 video tasks within PREDICT_DEADLINE_S" in caplog.text
    assert "3 left at PREDICT_DEADLINE_S" in caplog.text


def test_image_and_video_projects_predict_on_one_backend(shared_dir, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_scene(folder / "a.mp4", fire_patch(shared_dir), frames=6, second=(0, 0))
    cv2.imwrite(str(folder / "a.png"), np.full((60, 80, 3), BACKGROUND, np.uint8))
    client = app_client(tmp_path)
    with file_server(folder) as base:
        video = client.post("/predict", json={"tasks": [{"id": 1, "data": {"video": f"{base}/a.mp4"}}],
                                              "label_config": CONFIG.format(rate=10), "project": "1.1"})
        image = client.post("/predict", json={"tasks": [{"id": 2, "data": {"image": f"{base}/a.png"}}],
                                              "label_config": IMAGE_CONFIG, "project": "2.1"})
    assert video.status_code == 200 and video.get_json()["results"][0]["result"][0]["type"] == "videorectangle"
    assert image.status_code == 200 and image.get_json()["results"][0]["result"] == []
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG.format(rate=25)}).status_code == 200


def test_pool_scoring_scores_each_clip_once_with_the_mean_embedding_of_its_frames(shared_dir, tmp_path):
    from yolo_backend.predictor import Predictor

    folder = tmp_path / "clips"
    folder.mkdir()
    write_scene(folder / "a.mp4", fire_patch(shared_dir), frames=10, second=(0, 4))
    (folder / "b.mp4").write_text("not a video")
    model = tmp_path / "best.pt"
    model.write_text("weights")
    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), image_cache_dir=str(tmp_path / "c"),
                                 model_path=str(model), video_frame_step=2)
    detector = BlobDetector()
    predictor = Predictor(BackendContext.from_settings(settings, loader=lambda path, s: (detector, NAMES)))
    with file_server(folder) as base:
        version, scored = predictor.score(1, CONFIG.format(rate=10), [
            {"id": 1, "data": {"video": f"{base}/a.mp4"}}, {"id": 2, "data": {"video": f"{base}/b.mp4"}}])
    assert len(scored) == 2 and version.startswith("best-")
    first, bad = scored
    assert [r["type"] for r in first.item["result"]] == ["videorectangle", "videorectangle"]
    assert first.embedding is not None and first.embedding[1] == pytest.approx((2 * 2 + 3 * 1) / 5)  # blobs/frame
    assert bad.embedding is None and "result" not in bad.item


# --- the real detector, end to end ------------------------------------------------------------------------------
def test_the_real_detector_tracks_fire_in_a_camera_pan_over_a_real_photo(shared_dir, tmp_path):
    pytest.importorskip("torch")
    weights = shared_dir / "data" / "yolov7-checkpoints" / "yolov7-tiny_fire-smoke_ref-trained.pt"
    photo = cv2.imread(str(sorted((shared_dir / "data" / "fire-smoke" / "images" / "valid").glob("*.jpg"))[0]))
    photo = cv2.resize(photo, (480, 480))
    folder = tmp_path / "clips"
    folder.mkdir()
    writer = cv2.VideoWriter(str(folder / "pan.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (400, 400))
    for index in range(30):                                            # the camera pans right 2 px a frame
        writer.write(photo[40:440, 2 * index: 2 * index + 400])
    writer.release()
    settings = Settings.from_env(env={}, model_path=str(weights), model_dir=str(tmp_path / "m"),
                                 image_cache_dir=str(tmp_path / "c"), img_size=320, torch_threads=1, device="cpu",
                                 video_frame_step=3)
    client = create_app(YOLOv7Backend, context=BackendContext.from_settings(settings)).test_client()
    with file_server(folder) as base:
        answer = client.post("/predict", json={"tasks": [{"id": 5, "data": {"video": f"{base}/pan.mp4"}}],
                                               "label_config": CONFIG.format(rate=10), "project": "1.1"})
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    item = body["results"][0]
    assert body["model_version"] == item["model_version"] and 0.0 <= item["score"] <= 1.0
    assert item["result"], "the real detector found no fire in the pan"
    for region in item["result"]:
        assert region["value"]["labels"][0] in NAMES
        region["value"]["labels"] = ["fire"]                            # check_region checks the rest of the shape
        sequence = check_region(region, 10.0)
        assert region["value"]["framesCount"] == 30 and sequence[-1]["frame"] <= 30


def test_video_bounds_are_settings():
    from yolo_backend.settings import SettingsError

    settings = Settings.from_env(env={"VIDEO_MAX_PIXELS": "0", "VIDEO_MAX_MB": "10"})
    assert settings.video_max_pixels == 0 and settings.video_max_mb == 10
    with pytest.raises(SettingsError, match="VIDEO_MAX_SECONDS=-1.0 must not be negative"):
        Settings.from_env(env={"VIDEO_MAX_SECONDS": "-1"})
    with pytest.raises(SettingsError, match="VIDEO_TIMEOUT=0.0 must be greater than 0"):
        Settings.from_env(env={"VIDEO_TIMEOUT": "0"})


def test_a_track_lost_for_a_while_where_another_ended_continues_it():
    from yolo_backend.video_tracks import Track, TrackedBox, stitch

    def track(track_id, times, box):
        return Track(track_id, [TrackedBox(int(t * 10), t, box, 0, 0.5) for t in times])

    here, there = (10.0, 10.0, 50.0, 50.0), (200.0, 200.0, 240.0, 240.0)
    flicker = [track(1, [0.0, 1.0, 2.0], here), track(7, [4.0, 5.0], (12.0, 10.0, 52.0, 50.0)),   # back at 4 s
               track(3, [4.5, 6.0], there),                        # another object: no overlap
               track(4, [1.5, 2.5], (100.0, 10.0, 140.0, 50.0)),   # a second object, elsewhere
               track(9, [12.0, 13.0], here)]                       # back after 7 s: past the 5 s gap
    joined = stitch(flicker)
    assert [(t.track_id, [b.time_s for b in t.boxes]) for t in joined] == [
        (1, [0.0, 1.0, 2.0, 4.0, 5.0]), (4, [1.5, 2.5]), (3, [4.5, 6.0]), (9, [12.0, 13.0])]
    assert stitch(flicker, max_gap_s=10.0)[0].boxes[-1].time_s == 13.0
