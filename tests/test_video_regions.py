"""Tracks -> videorectangle regions, and annotated videorectangle regions -> boxes per frame."""

import pytest

from tests.test_video_frames import H, W, box_at, red_box, write_clip
from yolo_backend.labelstudio.config import LabelMapping
from yolo_backend.labelstudio.keyframes import Box, dense_boxes, parse_sequence
from yolo_backend.labelstudio.video_regions import clip_boxes
from yolo_backend.labelstudio.video_results import (
    TrackPoint, VideoClip, majority_label, percent_box, track_region,
)
from yolo_backend.video_frames import label_studio_frame, probe, sampled_frames

MAPPING = LabelMapping(("fire", "smoke", None))  # class 2 (person) has no label
CLIP = VideoClip(frame_rate=25.0, frames_count=100, duration_s=4.0)


def point(frame, cls=0, score=0.8, x=10.0):
    return TrackPoint(frame, Box(x, 20.0, 10.0, 10.0), cls, score)


def test_majority_label_ignores_classes_without_a_label_and_ties_go_to_the_surer():
    assert majority_label([point(1, 0), point(2, 1), point(3, 1), point(4, 2), point(5, 2), point(6, 2)],
                          MAPPING) == "smoke"
    assert majority_label([point(1, 0, 0.9), point(2, 1, 0.5)], MAPPING) == "fire"
    assert majority_label([point(1, 2)], MAPPING) is None


def test_a_track_becomes_one_region_in_label_studios_shape():
    points = [point(f, 0 if f < 40 else 1, 0.5 + f / 200, x=f * 0.5) for f in range(1, 61, 5)]
    region = track_region(points, ("box", "video"), MAPPING, CLIP, frame_step=5, model_version="v1", task_key=7)
    assert region["type"] == "videorectangle" and (region["from_name"], region["to_name"]) == ("box", "video")
    value = region["value"]
    assert value["labels"] == ["fire"] and value["framesCount"] == 100 and value["duration"] == 4.0
    assert [(k["frame"], k["enabled"]) for k in value["sequence"]] == [(1, True), (56, False)]  # a straight line
    assert value["sequence"][1]["time"] == pytest.approx(56 / 25)
    assert region["score"] == pytest.approx(sum(p.score for p in points) / len(points))
    assert track_region([point(1, 2)], ("box", "video"), MAPPING, CLIP) is None


def test_percent_box_clips_to_the_frame():
    assert percent_box(-10, 10, 50, 60, 100, 200) == Box(0.0, 5.0, 50.0, 25.0)


def test_a_drawn_moving_box_round_trips_through_decode_region_and_editor(tmp_path):
    """A clip with a box of known motion: colour-found boxes on every 3rd frame -> one region -> the editor's box on
    every frame of the clip follows the true box (the detector and tracker are stood in for by the colour)."""
    clip_path = write_clip(tmp_path / "moving.mp4", frames=40, fps=10.0)
    info = probe(clip_path)
    points = []
    for frame in sampled_frames(clip_path, step=3):
        x, y, w, h = red_box(frame.rgb)
        points.append(TrackPoint(label_studio_frame(frame.time_s, info.fps), percent_box(x, y, x + w, y + h, W, H),
                                 0, 0.9))
    clip = VideoClip(info.fps, info.frames, info.duration_s)
    region = track_region(points, ("box", "video"), MAPPING, clip, frame_step=3, tolerance=0.5)
    sequence = region["value"]["sequence"]
    assert len(sequence) <= 4                               # linear motion: few keyframes
    shown = dense_boxes(parse_sequence(sequence), info.frames)
    assert sorted(shown) == list(range(1, 41))              # the last sampled frame (decoded 39) ends the track
    for number, box in shown.items():
        tx, ty, tw, th = box_at(number - 1)                 # Label Studio frame n is decoded frame n - 1
        assert abs(box.x - tx / W * 100) < 1.5 and abs(box.y - ty / H * 100) < 1.5
        assert abs(box.width - tw / W * 100) < 2.5 and abs(box.height - th / H * 100) < 2.5

    annotated = clip_boxes([region], "box", 45, (W, H))     # as if the clip went on: the track has ended
    assert sorted(annotated.boxes) == list(range(1, 41)) and annotated.on(42) == []
    first = annotated.on(1)[0]
    assert first.label == "fire" and first.x1 == pytest.approx(10 / W, abs=0.01)


def test_annotated_regions_per_frame_with_bad_ones_reported():
    good = {"id": "a", "type": "videorectangle", "from_name": "box", "value": {
        "labels": ["smoke"], "sequence": [{"frame": 2, "enabled": True, "x": 0, "y": 0, "width": 10, "height": 10},
                                          {"frame": 4, "enabled": False, "x": 20, "y": 0, "width": 10, "height": 10}]}}
    offside = {"id": "b", "type": "videorectangle", "from_name": "box", "value": {
        "labels": ["fire"], "sequence": [{"frame": 1, "enabled": True, "x": 150, "y": 0, "width": 10, "height": 10}]}}
    unlabelled = {"id": "c", "type": "videorectangle", "from_name": "box", "value": {"sequence": []}}
    broken = {"id": "d", "type": "videorectangle", "from_name": "box", "value": {"labels": ["fire"], "sequence": 3}}
    other = {"id": "e", "type": "videorectangle", "from_name": "other", "value": good["value"]}
    image = {"id": "f", "type": "rectanglelabels", "from_name": "box", "value": {}}
    clip = clip_boxes([good, offside, unlabelled, broken, other, image], "box", frames_count=3)
    assert sorted(clip.boxes) == [2, 3]                     # frame 4 is past the clip; the offside box is nowhere
    assert clip.on(3)[0].label == "smoke" and clip.on(3)[0].x1 == pytest.approx(0.1)
    assert [b.kind for b in clip.bad] == ["region without label", "bad region"]
    assert "region d" in clip.bad[1].message and "must be a list" in clip.bad[1].message
