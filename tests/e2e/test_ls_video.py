"""Issue 23, end to end: a real Label Studio 1.23 video object tracking project asks our backend for predictions.

Two clips made here (a camera panning one way, then the other, over a real fire photo; mp4v) are uploaded, the
backend connected, "Retrieve Predictions" run: every clip gets one stored prediction of our version whose regions
are ``videorectangle`` tracks in Label Studio's shape, and the boxes move the way the fire does in the picture.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from . import harness

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FRAME_RATE = 10.0
VIDEO_CONFIG = f"""<View>
  <Labels name="videoLabels" toName="video" allowEmpty="true"><Label value="fire"/><Label value="smoke"/></Labels>
  <Video name="video" value="$video" framerate="{FRAME_RATE:g}"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""
FRAMES = 30
PAN_PX = 2           # per frame: the picture moves 60 px over the clip, 15 % of the 400 px frame


def write_pan(path: Path, photo: np.ndarray, direction: int) -> Path:
    """A camera panning over a grey wall with the fire photo (200x200) hung on it. ``direction`` +1: the photo
    moves right in the frame (the camera pans left); -1: left."""
    wall = np.full((400, 640, 3), 114, np.uint8)
    wall[100:300, 220:420] = cv2.resize(photo, (200, 200))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FRAME_RATE, (400, 400))
    for index in range(FRAMES):
        x = 120 - direction * PAN_PX * index
        writer.write(np.ascontiguousarray(wall[:, x:x + 400]))
    writer.release()
    return path


def upload_videos(api: harness.LabelStudioAPI, project_id: int, paths: list[Path]) -> dict[int, Path]:
    handles = [open(p, "rb") for p in paths]
    try:
        files = [(f"file{i}", (p.name, h, "video/mp4")) for i, (p, h) in enumerate(zip(paths, handles))]
        api.request("POST", f"/api/projects/{project_id}/import", files=files)
    finally:
        for h in handles:
            h.close()
    tasks = api.tasks(project_id)
    by_name = {p.name: p for p in paths}
    return {t["id"]: next(by_name[n] for n in by_name if t["data"]["video"].endswith(n)) for t in tasks}


def test_video_predictions_are_stored_as_tracks_that_follow_the_fire(label_studio, yolo_backend, valid_images,
                                                                     tmp_path):
    if not label_studio.legacy_tokens:
        pytest.skip("one token mode is enough for video (the image tests cover both)")
    photo = cv2.imread(str(sorted(valid_images.glob("*.jpg"))[0]))
    clips = [write_pan(tmp_path / "pan-right.mp4", photo, +1), write_pan(tmp_path / "pan-left.mp4", photo, -1)]
    api = label_studio.api
    project_id = api.create_project("fire video e2e", VIDEO_CONFIG)["id"]
    tasks = upload_videos(api, project_id, clips)
    assert len(tasks) == 2
    api.connect_ml_backend(project_id, yolo_backend.url, "yolov7 video e2e")
    api.retrieve_predictions(project_id, list(tasks))
    for task_id, clip in tasks.items():
        predictions = api.predictions(task_id)
        assert len(predictions) == 1, (clip.name, predictions)
        prediction = predictions[0]
        assert isinstance(prediction["score"], float) and 0.0 <= prediction["score"] <= 1.0, prediction
        regions = prediction["result"]
        assert regions, f"{clip.name}: no track stored (the detector finds fire in this photo)"
        for region in regions:
            check_stored_region(region)
        longest = max(regions, key=lambda r: r["value"]["sequence"][-1]["frame"] - r["value"]["sequence"][0]["frame"])
        sequence = longest["value"]["sequence"]
        centre = [k["x"] + k["width"] / 2 for k in sequence]
        moved = centre[-1] - centre[0]
        shift = PAN_PX * (sequence[-1]["frame"] - sequence[0]["frame"]) / 400 * 100
        direction = 1 if "right" in clip.name else -1
        print(f"\n{clip.name}: {len(regions)} track(s), longest frames {sequence[0]['frame']}-"
              f"{sequence[-1]['frame']}, centre x {centre[0]:.1f} -> {centre[-1]:.1f} (pan {direction * shift:+.1f})")
        assert moved * direction > 0.6 * shift, f"{clip.name}: the box moved {moved:+.1f} %, the picture {shift:.1f}"
        assert moved * direction < 1.4 * shift, f"{clip.name}: the box moved {moved:+.1f} %, the picture {shift:.1f}"


def check_stored_region(region: dict) -> None:
    assert region["type"] == "videorectangle" and (region["from_name"], region["to_name"]) == ("box", "video")
    value = region["value"]
    assert value["labels"][0] in ("fire", "smoke") and math.isfinite(region["score"])
    assert value["framesCount"] == FRAMES and value["duration"] == pytest.approx(FRAMES / FRAME_RATE, abs=0.15)
    sequence = value["sequence"]
    assert [k["frame"] for k in sequence] == sorted(k["frame"] for k in sequence)
    assert all(1 <= k["frame"] <= FRAMES for k in sequence) and sequence[-1]["enabled"] is False
    for k in sequence:
        assert k["time"] == pytest.approx(k["frame"] / FRAME_RATE)
        assert 0 <= k["x"] <= 100 and 0 <= k["y"] <= 100 and k["x"] + k["width"] <= 100.001
