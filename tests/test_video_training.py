"""Training from video annotations: an annotated clip's regions -> boxes per frame (Label Studio's interpolation),
which frames are taken, frame-exact streamed decode, examples whose boxes sit on the drawn object, the split by task,
and a project of clips through the training path to a published version."""

import logging

import numpy as np
import pytest

from tests.test_video_frames import H, W, box_at, red_box, write_clip
from yolo_backend.jobs.dataset import Example, collect_examples, split_examples
from yolo_backend.jobs.video_dataset import VideoSampling, VideoTraining, clip_examples, collect_video_examples
from yolo_backend.labelstudio.config import parse_label_config
from yolo_backend.labelstudio.video_controls import EXAMPLE, read_video_control
from yolo_backend.labelstudio.video_regions import (
    ClipBoxes, clip_boxes, sample_frames, spread, stored_frames_count,
)
from yolo_backend.settings import Settings, SettingsError
from yolo_backend.video_frames import VideoError, VideoLimits, frames_at

VIDEO_CONFIG = f"<View>{EXAMPLE}</View>"
CONTROL = read_video_control(parse_label_config(VIDEO_CONFIG))   # box on video, labels fire, smoke, framerate 25


def key(frame, x, y, w, h, enabled=True):
    return {"frame": frame, "enabled": enabled, "x": x, "y": y, "width": w, "height": h, "rotation": 0,
            "time": frame / 25}


def region(rid, labels, sequence, frames_count=None):
    value = {"labels": labels, "sequence": sequence}
    if frames_count is not None:
        value["framesCount"] = frames_count
    return {"id": rid, "from_name": "box", "to_name": "video", "type": "videorectangle", "value": value}


# --------------------------------------------------------------------------------------------------------------
# the annotation -> boxes per frame, against boxes computed by hand
# --------------------------------------------------------------------------------------------------------------

def test_two_tracks_one_ending_and_restarting_against_boxes_computed_by_hand():
    fire = region("a", ["fire"], [key(1, 0, 0, 10, 10), key(5, 40, 0, 10, 10, enabled=False),   # ends on 5
                                  key(9, 80, 0, 10, 10), key(11, 95, 0, 10, 10)])               # restarts on 9
    smoke = region("b", ["smoke", "fire"], [key(3, 50, 50, 20, 20), key(7, 50, 50, 40, 20)])
    unlabelled = region("c", [], [key(1, 0, 0, 10, 10)])
    broken = region("d", ["fire"], [{"frame": 2, "y": 0, "width": 5, "height": 5}])
    clip = clip_boxes([fire, smoke, unlabelled, broken], "box", frames_count=12, frame_size=(200, 100))

    def boxes(frame):
        return sorted((b.label, round(b.x1, 4), round(b.y1, 4), round(b.x2, 4), round(b.y2, 4))
                      for b in clip.on(frame))

    fire_x = {1: 0.0, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.4, 9: 0.8, 10: 0.875}   # linear; shown on the disabled keyframe
    smoke_w = {3: 0.2, 4: 0.25, 5: 0.3, 6: 0.35}                             # then 0.4 to the clip's end
    for frame in range(1, 13):
        expected = []
        if frame in fire_x:
            expected.append(("fire", fire_x[frame], 0.0, round(fire_x[frame] + 0.1, 4), 0.1))
        elif frame >= 11:                                  # the last keyframe is enabled: to the end, clipped
            expected.append(("fire", 0.95, 0.0, 1.0, 0.1))
        if frame >= 3:
            expected.append(("smoke", 0.5, 0.5, round(0.5 + smoke_w.get(frame, 0.4), 4), 0.7))
        assert boxes(frame) == sorted(expected), frame
    assert clip.on(11)[0].clipped and not clip.on(10)[0].clipped
    assert clip.on(3)[1].extra_labels == ("fire",)            # the first label is the track's
    assert [b.kind for b in clip.bad] == ["region without label", "bad region"]
    assert "keyframe 0" in clip.bad[1].message and "x" in clip.bad[1].message
    assert clip.on(13) == [] and 13 not in clip.boxes         # past the clip


def test_the_stored_frames_count_is_read_from_the_regions():
    assert stored_frames_count([region("a", ["fire"], [], 250), region("b", ["fire"], [], 300)], "box") == 300
    assert stored_frames_count([region("a", ["fire"], []), {"type": "rectanglelabels"}], "box") == 0
    assert stored_frames_count([region("a", ["fire"], [], True)], "box") == 0


# --------------------------------------------------------------------------------------------------------------
# which frames are taken
# --------------------------------------------------------------------------------------------------------------

def test_spread_keeps_first_and_last_and_the_gap():
    assert spread(list(range(1, 101)), 5) == [1, 26, 51, 75, 100]
    assert spread(list(range(1, 101)), 5, min_gap=30) == [1, 31, 61, 91]   # only 4 fit 30 apart
    assert spread([1, 2, 3, 40], 10, min_gap=2) == [1, 3, 40]
    assert spread([5, 6, 7], 1) == [6] and spread([5, 6], 0) == []


def test_sample_frames_bounds_spread_and_negatives():
    clip = ClipBoxes(300)
    for frame in range(101, 201):        # the object is on frames 101..200 of 300
        clip.boxes[frame] = ["box"]      # (what is on a frame does not matter here)
    frames = sample_frames(clip, most=20, min_gap=5, negative_share=0.25)
    positives = [f for f in frames if clip.on(f)]
    negatives = [f for f in frames if not clip.on(f)]
    assert len(frames) == 20 and len(negatives) == 5 and len(positives) == 15
    assert positives[0] == 101 and positives[-1] == 196                 # spread over the whole track
    assert all(b - a >= 5 for a, b in zip(positives, positives[1:]))
    assert all(f <= 96 or f >= 205 for f in negatives)                  # at least 5 frames from the track's ends
    assert negatives[0] == 1 and negatives[-1] == 300
    assert sample_frames(clip, most=20, min_gap=5, negative_share=0.0) == spread(list(range(101, 201)), 20, 5)
    assert len(sample_frames(clip, most=20, min_gap=10, negative_share=0.25)) == 15   # only 10 positives fit

    empty = ClipBoxes(50)                          # submitted without a box: negatives only, still bounded
    assert sample_frames(empty, most=4, min_gap=5, negative_share=0.25) == [1, 16, 31, 46]
    few = ClipBoxes(100, {50: ["box"]})           # one positive frame: negatives stay bounded
    taken = sample_frames(few, most=6, min_gap=5, negative_share=0.25)
    assert len(taken) == 2 and 50 in taken and all(abs(f - 50) >= 5 for f in taken if f != 50)
    assert sample_frames(ClipBoxes(0), most=5) == []


def test_sampling_settings_are_checked_and_share_out_over_clips():
    settings = Settings.from_env({"VIDEO_TRAIN_FRAMES_PER_CLIP": "40", "VIDEO_TRAIN_MAX_FRAMES": "100"})
    sampling = VideoSampling.from_settings(settings)
    assert (sampling.per_clip(1), sampling.per_clip(5), sampling.per_clip(1000)) == (40, 20, 1)
    assert sampling.min_gap(25.0) == 13 and VideoSampling(min_gap_s=0.0).min_gap(25.0) == 1
    assert VideoSampling(min_gap_s=0.2).min_gap(25.0) == 5
    for name, value in (("VIDEO_TRAIN_FRAMES_PER_CLIP", "0"), ("VIDEO_TRAIN_NEGATIVE_SHARE", "1.5"),
                        ("VIDEO_TRAIN_MIN_GAP_S", "-1"), ("VIDEO_TRAIN_MAX_FRAMES", "-3")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


# --------------------------------------------------------------------------------------------------------------
# frame-exact decode, and examples whose boxes sit on the drawn object
# --------------------------------------------------------------------------------------------------------------

def decoded_index(rgb, scale: float = 1.0) -> int:
    """Which frame of ``write_clip`` this is (``rgb`` scaled by ``scale``): its red box starts at x = 10 + 3 *
    index."""
    return round((red_box(rgb)[0] / scale - 10) / 3)


def test_frames_at_gives_exactly_the_asked_frames_and_stops_after_the_last(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", frames=40, fps=10.0)
    taken = list(frames_at(path, [33, 1, 7, 20, 7], 10.0))   # unsorted, a repeat
    assert [n for n, _ in taken] == [1, 7, 20, 33]
    assert [f.index for _, f in taken] == [0, 6, 19, 32]     # Label Studio frame n is decoded frame n - 1
    assert [decoded_index(f.rgb) for _, f in taken] == [0, 6, 19, 32]
    # the tag says 20 fps for a 10 fps file: frame 4 falls between decoded frames, the next one (its frame 5) comes
    taken = list(frames_at(path, [4, 5, 9], 20.0))
    assert [(n, f.index, decoded_index(f.rgb)) for n, f in taken] == [(5, 2, 2), (9, 4, 4)]
    assert list(frames_at(path, [], 10.0)) == [] and list(frames_at(path, [500], 10.0)) == []
    # decoding stops after the last target: a bound of 10 decoded frames is never reached for frame 5
    assert [n for n, _ in frames_at(path, [5], 10.0, VideoLimits(max_frames=10))] == [5]
    with pytest.raises(VideoError, match="more than 10 frames"):
        list(frames_at(path, [30], 10.0, VideoLimits(max_frames=10)))


def moving_box_annotation(last_frame: int, fps: float = 10.0, end_enabled: bool = False) -> list[dict]:
    """A track on ``write_clip``'s red box from its first frame to ``last_frame`` (linear motion: two keyframes)."""
    def at(frame, enabled=True):
        x, y, w, h = box_at(frame - 1)
        return {**key(frame, x / W * 100, y / H * 100, w / W * 100, h / H * 100, enabled), "time": frame / fps}

    return [region("t", ["smoke"], [at(1), at(last_frame, end_enabled)], 40)]


def test_clip_examples_have_the_drawn_box_on_each_sampled_frame(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", frames=40, fps=10.0)
    control = read_video_control(parse_label_config(VIDEO_CONFIG.replace('framerate="25"', 'framerate="10"')))
    sampling = VideoSampling(min_gap_s=0.3, negative_share=0.25)
    found = clip_examples(path, 7, moving_box_annotation(24), control, 10.0, ["fire", "smoke"], size=80, most=8,
                          sampling=sampling)
    examples = found.examples
    assert len(examples) == 8 and {e.task_id for e in examples} == {7} and not found.bad and not found.unknown
    positives = [e for e in examples if len(e.boxes)]
    assert len(positives) == 6 and len(examples) - len(positives) == 2
    for example in examples:
        assert example.image.shape == (48, 80, 3) and example.scale == pytest.approx(0.5)  # 160x96 -> long side 80
        assert example.reload is None
    for example in positives:
        assert example.classes.tolist() == [1]                          # smoke, by the names' order
        x, y, w, h = red_box(example.image)                             # the box drawn on this very frame
        x1, y1, x2, y2 = example.boxes[0]
        assert abs(x1 - x) <= 1.5 and abs(y1 - y) <= 1.5 and abs(x2 - (x + w)) <= 2 and abs(y2 - (y + h)) <= 2
    for example in examples:                    # negatives come from past the track's end and its margin
        if not len(example.boxes):
            assert decoded_index(example.image, 0.5) >= 23 + 3 - 1     # (within a pixel of the small copy)


def test_a_labels_missing_from_the_names_is_counted_and_a_bad_file_skipped(tmp_path, caplog):
    path = write_clip(tmp_path / "clip.mp4", frames=20, fps=10.0)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    tasks = [({"id": 1, "data": {"video": "a"}}, {"result": moving_box_annotation(20, end_enabled=True)}),
             ({"id": 2, "data": {"video": "b"}}, {"result": moving_box_annotation(20)})]
    files = {"a": path, "b": tmp_path / "broken.mp4"}
    video = VideoTraining(CONTROL, lambda task: files[task["data"]["video"]], VideoSampling(frames_per_clip=3))
    with caplog.at_level(logging.WARNING):
        examples, counts = collect_video_examples(video, tasks, ["fire"], size=160, report=lambda e: None)
    assert counts["video_failed"] == 1 and "task 2: video not available" in caplog.text
    assert counts["video_frames"] == len(examples) == 3 and counts["unknown_labels"] == 3   # smoke is no class
    assert counts["boxes"] == 0 and all(len(e.boxes) == 0 for e in examples)


# --------------------------------------------------------------------------------------------------------------
# the split, and a project of clips through the training path
# --------------------------------------------------------------------------------------------------------------

def test_frames_of_one_clip_are_never_on_both_sides():
    examples = [Example(task, np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
                for task in range(1, 41) for _ in range(5)]
    train, val = split_examples(3, examples)
    assert len(train) + len(val) == 200 and train and val
    assert not {e.task_id for e in train} & {e.task_id for e in val}
    assert all(len([e for e in val if e.task_id == t]) == 5 for t in {e.task_id for e in val})


def video_tasks(paths: dict) -> list[dict]:
    def ann(aid, result, cancelled=False):
        return {"id": aid, "result": result, "was_cancelled": cancelled, "updated_at": "2026-01-01T10:00:00Z",
                "created_at": "2026-01-01T10:00:00Z"}

    return [{"id": i, "data": {"video": f"/data/upload/1/{name}"}, "annotations": [ann(i, moving_box_annotation(30))]}
            for i, name in enumerate(sorted(paths), start=8)] + [
        {"id": 90, "data": {"video": "/data/upload/1/skipped.mp4"}, "annotations": [ann(90, [], cancelled=True)]}]


def test_a_project_of_clips_trains_and_publishes(tmp_path, start_checkpoint):
    """Label Studio (the fake) holds a project of annotated clips: the real annotation reading, video examples,
    split, fine-tuning (a short real run), evaluation against the start model and publish (forced: an epoch on
    six clips need not beat it)."""
    from tests.support import FAKE_BACKEND_URL, LEGACY as TOKEN, FakeLabelStudio
    from yolo_backend.jobs.dataset import annotated_tasks
    from yolo_backend.jobs.training import train_and_publish
    from yolo_backend.registry import Registry
    from yolo_backend.runtime import BackendContext

    paths = {f"clip{i}.mp4": write_clip(tmp_path / f"clip{i}.mp4", frames=30, fps=10.0) for i in range(1, 7)}
    with FakeLabelStudio(video_tasks(paths)) as label_studio:
        label_studio.project["label_config"] = VIDEO_CONFIG
        settings = Settings.from_env({
            "MODEL_DIR": str(tmp_path / "models"), "MODEL_PATH": str(start_checkpoint), "DEVICE": "cpu",
            "IMAGE_CACHE_DIR": str(tmp_path / "cache"), "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": TOKEN, "BACKEND_URL": FAKE_BACKEND_URL, "TRAIN_IMG_SIZE": "160",
            "IMG_SIZE": "160", "TRAIN_EPOCHS": "1", "TORCH_THREADS": "1", "VIDEO_TRAIN_FRAMES_PER_CLIP": "4",
            "FORCE_PUBLISH": "true"})
        context = BackendContext.from_settings(settings)
        tasks = annotated_tasks(context.client(), 1)
    control = read_video_control(parse_label_config(VIDEO_CONFIG))
    video = VideoTraining(control, lambda task: paths[task["data"]["video"].rsplit("/", 1)[1]],
                          VideoSampling.from_settings(settings))
    examples, counts = collect_examples(context, 1, None, tasks, settings.train_img_size, lambda e: None,
                                        video=video)
    assert counts["annotated_tasks"] == 7 and counts["cancelled_only"] == 1 and counts["video_tasks"] == 6
    assert counts["video_frames"] == len(examples) == 24 and counts["boxes"] == 24 - counts["negatives"] > 0
    assert sorted({e.task_id for e in examples}) == [8, 9, 10, 11, 12, 13]
    summary, version = train_and_publish(settings, 1, examples, list(control.labels), job_id="job-v")
    assert summary["trained"] is True and summary["train_images"] + summary["val_images"] == 24
    # task 10 hashes to validation in project 1: its 4 frames, and only those, are the validation set
    assert (summary["train_images"], summary["val_images"]) == (20, 4) and summary["compared"] is True
    assert summary["metrics"] is not None and summary["baseline_metrics"] is not None
    assert version is not None, summary
    meta = Registry.for_project(settings.model_dir, 1).latest().meta()
    assert meta["labels"] == ["fire", "smoke"] and meta["train_images"] == summary["train_images"]


def test_image_and_video_tasks_of_one_project_train_together(tmp_path):
    """A project with images and clips: image tasks through the image path, clips through the video path, class
    ids by the image control's labels for both."""
    from tests.support import FIRE_SMOKE_CONFIG, LEGACY as TOKEN, FakeLabelStudio
    from tests.test_jobs import box
    from yolo_backend.labelstudio.controls import read_controls
    from yolo_backend.runtime import BackendContext

    path = write_clip(tmp_path / "clip.mp4", frames=30, fps=10.0)
    annotation = {"id": 1, "result": [], "was_cancelled": False}
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/img1.png"},
              "annotations": [{**annotation, "result": [box(10, 20, 30, 40, "smoke")]}]},
             {"id": 2, "data": {"image": "/data/upload/1/img2.png"}, "annotations": [annotation]},
             {"id": 3, "data": {"video": "/data/upload/1/clip.mp4"},
              "annotations": [{**annotation, "result": moving_box_annotation(30)}]}]
    controls = read_controls(parse_label_config(FIRE_SMOKE_CONFIG))
    video = VideoTraining(CONTROL, lambda task: path, VideoSampling(frames_per_clip=4))
    events = []
    with FakeLabelStudio(tasks) as label_studio:
        settings = Settings.from_env({"IMAGE_CACHE_DIR": str(tmp_path / "cache"), "LABEL_STUDIO_URL": label_studio.url,
                                      "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(tmp_path / "models")})
        context = BackendContext.from_settings(settings)
        examples, counts = collect_examples(context, 1, controls.box_target(), tasks, 160, events.append, controls,
                                            video)
    by_task = {t: [e for e in examples if e.task_id == t] for t in (1, 2, 3)}
    assert [len(by_task[t]) for t in (1, 2, 3)] == [1, 1, 4]
    assert by_task[1][0].classes.tolist() == [1] and len(by_task[2][0].boxes) == 0
    assert all(e.classes.tolist() in ([1], []) for e in by_task[3])       # smoke is class 1 of fire, smoke
    assert (counts["video_tasks"], counts["video_frames"], counts["image_failed"]) == (1, 4, 0)
    assert counts["boxes"] == 1 + sum(len(e.boxes) for e in by_task[3])
    assert any(e.get("videos") == 1 for e in events) and any(e.get("images") == 2 for e in events)


def test_the_training_job_trains_a_project_of_clips_and_skips_one_it_cannot_download(tmp_path, monkeypatch,
                                                                                      start_checkpoint, caplog):
    """The training job in process, against the fake Label Studio serving three annotated clips and one that is
    gone (404): first it waits for more annotated clips, then it downloads the clips by the predict path's rules,
    trains on their sampled frames (all with the drawn box's class), publishes, and switches Label Studio to the
    new version with a prediction of it on a clip."""
    from tests.support import FAKE_BACKEND_URL, LEGACY as TOKEN, FakeLabelStudio
    from tests.test_jobs import fake_train, seen_calls
    from yolo_backend.jobs.job import run_training_job

    config = VIDEO_CONFIG.replace('framerate="25"', 'framerate="10"')
    names = ["clip8.mp4", "clip9.mp4", "clip10.mp4", "missing.mp4"]
    tasks = [{"id": i, "data": {"video": f"/data/upload/1/{name}"},
              "annotations": [{"id": i, "result": moving_box_annotation(30), "was_cancelled": False}]}
             for i, name in enumerate(names, start=8)]
    model_dir = tmp_path / "models"
    with FakeLabelStudio(tasks) as label_studio:
        label_studio.project["label_config"] = config
        for name in names[:3]:
            label_studio.images[name] = write_clip(tmp_path / name, frames=30, fps=10.0).read_bytes()
        for key_, value in {"MODEL_DIR": str(model_dir), "MODEL_PATH": str(start_checkpoint), "IMG_SIZE": "160",
                            "TRAIN_IMG_SIZE": "160", "IMAGE_CACHE_DIR": str(tmp_path / "cache"),
                            "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN,
                            "BACKEND_URL": FAKE_BACKEND_URL, "MIN_ANNOTATIONS_FIRST_TRAINING": "5",
                            "VIDEO_TRAIN_FRAMES_PER_CLIP": "4", "TORCH_THREADS": "1"}.items():
            monkeypatch.setenv(key_, value)
        monkeypatch.setattr("yolo_backend.jobs.training.fine_tune_trainer", fake_train)
        waiting = run_training_job(1, "START_TRAINING", {}, {"settle_s": 0})
        assert waiting["reason"] == ("waiting for 1 more annotation: the first training needs 5 annotated clips "
                                     "(MIN_ANNOTATIONS_FIRST_TRAINING), the project has 4")
        assert not [k for k in label_studio.hits if ".mp4" in k]   # no clip downloaded to wait
        monkeypatch.setenv("MIN_ANNOTATIONS_FIRST_TRAINING", "4")   # each annotated clip counts as one
        with caplog.at_level(logging.INFO):
            summary = run_training_job(1, "START_TRAINING", {}, {"settle_s": 0})
    assert (summary["video_tasks"], summary["video_frames"], summary["video_failed"]) == (4, 12, 1), summary
    assert "task 11: video not available, not trained on" in caplog.text and "HTTP 404" in caplog.text
    assert "4 annotated clip(s) gave 12 frame(s), 1 clip(s) failed" in caplog.text
    assert summary["published"] is True and summary["labels"] == ["fire", "smoke"], summary
    [seen] = seen_calls(model_dir)
    assert sorted(set(seen["train"] + seen["val"])) == [8, 9, 10] and seen["names"] == ["fire", "smoke"]
    assert not set(seen["train"]) & set(seen["val"])                       # split by clip
    assert all(classes in ([1], []) for classes in seen["classes"].values())   # smoke, the drawn label
    assert any(classes == [1] for classes in seen["classes"].values())
    version = summary["model_version"]
    assert label_studio.patches == [version] and summary["label_studio"]["model_version"] == version
    [stored] = label_studio.predictions
    assert stored["model_version"] == version and stored["task"] == 8


def test_what_a_config_trains_clips_images_or_both(caplog):
    """A video config trains clips with the VideoRectangle's labels; images and a VideoRectangle train both, by the
    image labels, and the effort counts the image tasks only; a VideoRectangle that cannot be served leaves the
    clips out with one log line, the images still train."""
    from yolo_backend.jobs.project_controls import read_project_controls

    clips = read_project_controls(parse_label_config(VIDEO_CONFIG), None, 1)
    assert clips.controls is None and clips.names == ["fire", "smoke"] and clips.box_names == ()
    assert (clips.kind, clips.item) == ("clips", "clip")
    mixed_config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                    '<Label value="smoke"/><Label value="fire"/></RectangleLabels>' + EXAMPLE + "</View>")
    mixed = read_project_controls(parse_label_config(mixed_config), None, 1)
    assert mixed.names == ["smoke", "fire"] and mixed.video is not None and mixed.box_names == ("label",)
    assert (mixed.kind, mixed.item) == ("images or clips", "image or clip")
    tasks = [{"id": 1, "data": {"image": "a.png"}, "annotations": [{"id": 1, "result": []}]},
             {"id": 2, "data": {"video": "a.mp4"}, "annotations": [{"id": 2, "result": moving_box_annotation(9)}]}]
    assert [t["id"] for t in mixed.image_tasks(tasks)] == [1] and clips.image_tasks(tasks) == [tasks[0]]
    no_labels = mixed_config.replace('<Labels name="videoLabels" toName="video">',
                                     '<Labels name="other" toName="image">')   # the Video has no Labels
    with caplog.at_level(logging.WARNING):
        images_only = read_project_controls(parse_label_config(no_labels), None, 7)
    assert images_only.video is None and images_only.kind == "images" and images_only.image_tasks(tasks) == tasks
    assert "project 7: its clips are not trained on" in caplog.text and "no <Labels>" in caplog.text
