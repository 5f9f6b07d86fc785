"""Video keyframes: Label Studio's interpolation rule, and tracks -> sparse keyframes."""

import random

import pytest

from yolo_backend.labelstudio.keyframes import (
    Box, Keyframe, SequenceError, box_at, dense_boxes, normalize_angle, parse_sequence, sequence_json,
    sparse_sequence,
)


def editor_shape(sequence: list[dict], frame: int):
    """The editor's two questions, written out step by step from its source (VideoRectangleRegion.getShape and
    VideoRegion.isInLifespan/closestKeypoint): what box, and is the region in its lifespan. Shown iff both."""
    prev = nxt = None
    shape = "unset"
    for item in sequence:
        if item["frame"] == frame:
            shape = item
            break
        if item["frame"] > frame:
            nxt = item
            break
        prev = item
    if shape == "unset":
        if prev is None:
            shape = None
        elif nxt is None:
            shape = prev
        else:
            r = (frame - prev["frame"]) / (nxt["frame"] - prev["frame"])
            shape = {k: prev[k] + (nxt[k] - prev[k]) * r for k in ("x", "y", "width", "height")}
    before = [item for item in sequence if item["frame"] <= frame]
    closest = before[-1] if before else next((i for i in sequence if i["frame"] >= frame), None)
    alive = closest is not None and ((closest["frame"] == frame and not closest["enabled"]) or closest["enabled"])
    if not alive or shape is None:
        return None
    return tuple(round(shape[k], 9) for k in ("x", "y", "width", "height"))


def as_tuple(box):
    return None if box is None else tuple(round(v, 9) for v in (box.x, box.y, box.width, box.height))


def item(frame, enabled=True, x=10.0, y=20.0, w=30.0, h=40.0):
    return {"frame": frame, "enabled": enabled, "x": x, "y": y, "width": w, "height": h, "rotation": 0,
            "time": frame / 25}


def test_linear_between_keyframes_and_held_after_the_last_enabled_one():
    keyframes = parse_sequence([item(1, x=0.0), item(11, x=50.0)])
    assert box_at(keyframes, 6).x == pytest.approx(25.0)
    assert box_at(keyframes, 11).x == 50.0
    assert box_at(keyframes, 500).x == 50.0          # last keyframe enabled: shown to the end
    dense = dense_boxes(keyframes, frames_count=20)
    assert sorted(dense) == list(range(1, 21))
    assert [round(dense[f].x, 6) for f in (1, 2, 3)] == [0.0, 5.0, 10.0]


def test_a_disabled_keyframe_is_the_last_frame_shown_and_the_region_comes_back_at_the_next():
    keyframes = parse_sequence([item(5, x=0.0), item(9, enabled=False, x=40.0), item(20, x=80.0),
                                item(22, enabled=False, x=90.0)])
    assert box_at(keyframes, 4) is None                  # before the first keyframe
    assert box_at(keyframes, 7).x == pytest.approx(20.0)  # interpolated towards the disabled keyframe
    assert box_at(keyframes, 9).x == 40.0                # the disabled keyframe itself is shown
    assert box_at(keyframes, 10) is None and box_at(keyframes, 19) is None
    assert box_at(keyframes, 21).x == pytest.approx(85.0)
    assert box_at(keyframes, 23) is None
    assert sorted(dense_boxes(keyframes, 100)) == [5, 6, 7, 8, 9, 20, 21, 22]


def test_dense_boxes_match_the_editors_rule_on_random_sequences():
    rng = random.Random(7)
    for _ in range(300):
        frames = sorted(rng.sample(range(1, 60), rng.randint(1, 8)))
        sequence = [item(f, rng.random() < 0.6, rng.uniform(0, 90), rng.uniform(0, 90), rng.uniform(1, 10),
                         rng.uniform(1, 10)) for f in frames]
        keyframes = parse_sequence(list(reversed(sequence)))  # stored out of order: sorted on reading
        dense = dense_boxes(keyframes, frames_count=70)
        for frame in range(1, 71):
            expected = editor_shape(sequence, frame)
            assert as_tuple(box_at(keyframes, frame)) == expected, (sequence, frame)
            assert as_tuple(dense.get(frame)) == expected, (sequence, frame)


def test_rotation_goes_the_short_way_round_as_the_editor_does():
    assert normalize_angle(190) == pytest.approx(-170)
    assert normalize_angle(-180) == pytest.approx(180)
    a, b = item(1), item(21)
    a["rotation"], b["rotation"] = -170, 170
    assert box_at(parse_sequence([a, b]), 6).rotation == pytest.approx(-175)  # the editor's own example


@pytest.mark.parametrize("bad, says", [
    ("nope", "must be a list"),
    ([{"frame": 0, "x": 1, "y": 1, "width": 1, "height": 1}], "not a frame number"),
    ([{"frame": 1.5, "x": 1, "y": 1, "width": 1, "height": 1}], "not a frame number"),
    ([{"frame": 2, "x": "1", "y": 1, "width": 1, "height": 1}], "x '1' is not a number"),
    ([{"frame": 2, "x": 1, "y": float("nan"), "width": 1, "height": 1}], "y 'nan' is not a number"),
    ([3], "keyframe 0 of a videorectangle sequence is not an object"),
])
def test_a_bad_sequence_says_which_keyframe(bad, says):
    with pytest.raises(SequenceError, match=says):
        parse_sequence(bad)


def test_defaults_for_keyframes_without_enabled_or_rotation():
    [keyframe] = parse_sequence([{"frame": 3, "x": 1, "y": 2, "width": 3, "height": 4}])
    assert keyframe == Keyframe(3, True, Box(1.0, 2.0, 3.0, 4.0, 0.0))


# --- tracks -> sparse keyframes ----------------------------------------------------------------------------------
def test_a_straight_track_needs_two_keyframes_and_ends_disabled():
    track = {f: Box(f * 0.5, 10.0, 20.0, 20.0) for f in range(1, 101)}
    keyframes = sparse_sequence(track, tolerance=0.1)
    assert [(k.frame, k.enabled) for k in keyframes] == [(1, True), (100, False)]
    dense = dense_boxes(keyframes, frames_count=200)
    assert sorted(dense) == list(range(1, 101))          # not shown after the track ends


def test_a_turning_track_gets_a_keyframe_at_the_turn():
    track = {f: Box(float(min(f, 50)), float(max(0, f - 50)), 10.0, 10.0) for f in range(1, 101)}
    keyframes = sparse_sequence(track, tolerance=0.25)
    assert [k.frame for k in keyframes] == [1, 50, 100]


def test_gaps_split_a_track_and_sampled_frames_are_one_run():
    track = {f: Box(5.0, 5.0, 10.0, 10.0) for f in (*range(1, 21, 5), *range(60, 71, 5))}  # 1..16, 60..70
    every_frame = sparse_sequence(track, max_gap=1)
    assert all(not k.enabled for k in every_frame)          # each point is its own run of one frame
    sampled = sparse_sequence(track, max_gap=5)
    assert [(k.frame, k.enabled) for k in sampled] == [(1, True), (16, False), (60, True), (70, False)]
    assert sorted(dense_boxes(sampled, 100)) == [*range(1, 17), *range(60, 71)]
    with pytest.raises(ValueError):
        sparse_sequence(track, max_gap=0)


def test_round_trip_stays_within_tolerance_and_is_sparse():
    rng = random.Random(3)
    for tolerance in (0.05, 0.5, 2.0):
        track, x, y, vx = {}, 20.0, 30.0, 0.3
        for frame in range(1, 401):
            if frame in (150, 151, 152, 153):
                continue                                    # the object is lost for four frames
            vx += rng.uniform(-0.05, 0.05)
            x, y = x + vx, y + rng.uniform(-0.2, 0.2)
            track[frame] = Box(x, y, 10 + frame * 0.01, 12.0)
        keyframes = sparse_sequence(track, tolerance=tolerance)
        stored = sequence_json(keyframes, frame_rate=25.0)
        dense = dense_boxes(parse_sequence(stored), frames_count=500)
        assert set(dense) == set(track)
        assert max(dense[f].drift(track[f]) for f in track) <= tolerance + 1e-9
        if tolerance > 0.4:                                 # above the jitter (+-0.2): few keyframes
            assert len(keyframes) < len(track) / 3
        again = sparse_sequence(dense, tolerance=tolerance)
        assert max(dense_boxes(again, 500)[f].drift(track[f]) for f in track) <= 2 * tolerance + 1e-9


def test_stored_shape_has_label_studios_keys_and_time_from_the_frame_rate():
    [first, last] = sequence_json([Keyframe(1, True, Box(1, 2, 3, 4)), Keyframe(50, False, Box(1, 2, 3, 4))], 25.0)
    assert set(first) == {"frame", "enabled", "rotation", "x", "y", "width", "height", "time"}
    assert first["time"] == pytest.approx(0.04) and last["time"] == pytest.approx(2.0)
    assert last["enabled"] is False
    with pytest.raises(ValueError):
        sequence_json([], 0.0)


def test_run_starts_break_a_run_whatever_the_gap():
    """A clip whose frame rate varies: points 4 frames apart are one run, and a run starts again where the caller
    says the track was missed (frame 30), though 30 - 20 is no wider than ``max_gap``."""
    track = {f: Box(10.0 + f, 20.0, 5.0, 5.0) for f in (1, 5, 9, 13, 17, 20, 30, 31)}
    keyframes = sparse_sequence(track, max_gap=100, run_starts={30})
    assert [(k.frame, k.enabled) for k in keyframes] == [(1, True), (20, False), (30, True), (31, False)]
    assert [(k.frame, k.enabled) for k in sparse_sequence(track, max_gap=100)] == [(1, True), (31, False)]
