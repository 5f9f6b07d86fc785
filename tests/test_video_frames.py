"""Video decoding: streamed, sampled frames with their true times, and clear errors for what cannot be read."""

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_backend.video_frames import (
    VideoError, VideoLimits, frame_count_hint, label_studio_frame, probe, sampled_frames,
)

W, H = 160, 96


def box_at(index: int) -> tuple[int, int, int, int]:
    """The drawn box on frame ``index``: 20x16 px, moving 3 px right per frame."""
    return 10 + 3 * index, 40, 20, 16


def write_clip(path: Path, frames: int = 40, fps: float = 10.0, fourcc: str = "mp4v",
               size: tuple[int, int] = (W, H)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} here"
    for index in range(frames):
        image = np.full((size[1], size[0], 3), 40, np.uint8)
        x, y, w, h = box_at(index)
        image[y:y + h, x:x + w] = (0, 0, 255)   # BGR red
        writer.write(image)
    writer.release()
    return path


def red_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    mask = (rgb[..., 0] > 150) & (rgb[..., 2] < 100)
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def test_mp4_frames_come_in_order_with_their_true_times_and_boxes(tmp_path):
    clip = write_clip(tmp_path / "fire.mp4")
    info = probe(clip)
    assert (info.width, info.height, info.frames) == (W, H, 40) and info.fps == pytest.approx(10.0)
    frames = list(sampled_frames(clip, step=5))
    assert [f.index for f in frames] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert [round(f.time_s, 3) for f in frames] == [i / 10 for i in range(0, 40, 5)]
    for frame in frames:
        assert frame.rgb.shape == (H, W, 3) and frame.rgb.dtype == np.uint8
        x, y, w, h = red_box(frame.rgb)                 # RGB order: the red box is red
        ex, ey, ew, eh = box_at(frame.index)
        assert abs(x - ex) <= 1 and abs(y - ey) <= 1 and abs(w - ew) <= 2 and abs(h - eh) <= 2


def test_times_map_to_label_studio_frames_from_one():
    assert [label_studio_frame(t, 25.0) for t in (0.0, 0.04, 0.2, 1.0)] == [1, 2, 6, 26]
    assert label_studio_frame(0.0399, 25.0) == 2        # a timestamp a hair early still lands on its frame


def test_a_tag_frame_rate_other_than_the_files_keeps_boxes_at_their_time(tmp_path):
    """The file is 10 fps and Label Studio's Video tag says 25: frame numbers follow the time, not the index."""
    clip = write_clip(tmp_path / "ten.mp4", frames=20, fps=10.0)
    numbers = [label_studio_frame(f.time_s, 25.0) for f in sampled_frames(clip, step=4)]
    assert numbers == [1, 11, 21, 31, 41]
    assert frame_count_hint(probe(clip), 25.0) == 50 and frame_count_hint(probe(clip), None) == 20


def test_mjpeg_avi_is_read_too(tmp_path):
    clip = write_clip(tmp_path / "cam.avi", frames=6, fourcc="MJPG")
    assert len(list(sampled_frames(clip))) == 6


@pytest.mark.parametrize("limits, says", [
    (VideoLimits(max_pixels=100 * 50), "beyond the bound of 5000 pixels"),
    (VideoLimits(max_seconds=2.0), "longer than the bound of 2 s"),
])
def test_bounds_are_checked_before_decoding(tmp_path, limits, says):
    clip = write_clip(tmp_path / "big.mp4")
    with pytest.raises(VideoError, match=says):
        probe(clip, limits)
    with pytest.raises(VideoError, match=says):
        next(sampled_frames(clip, 1, limits))


def test_frame_bound_is_checked_while_decoding(tmp_path):
    clip = write_clip(tmp_path / "long.mp4", frames=30)
    with pytest.raises(VideoError, match="more than 12 frames"):
        list(sampled_frames(clip, 5, VideoLimits(max_frames=12)))


def test_not_a_video_and_a_truncated_one(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoError, match="not a video OpenCV's FFmpeg can open"):
        probe(junk)
    with pytest.raises(VideoError, match="not a video"):
        list(sampled_frames(junk))
    clip = write_clip(tmp_path / "whole.avi", frames=30, fourcc="MJPG")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    try:
        frames = list(sampled_frames(cut))
    except VideoError:
        frames = []                                     # refused with the clear error: fine too
    assert len(frames) < 30                             # never more than is there, and no crash


def test_missing_or_falling_timestamps_fall_back_to_one_frame_period():
    from yolo_backend.video_frames import FrameClock

    clock = FrameClock(fps=10.0)   # a container whose every timestamp is 0
    assert [round(clock.time(0.0), 6) for _ in range(4)] == [0.0, 0.1, 0.2, 0.3]
    clock = FrameClock(fps=0.0)    # no rate either: 25 fps; rising timestamps are kept as they are
    assert [round(clock.time(t), 6) for t in (0.0, 0.5, 0.4, 1.0)] == [0.0, 0.5, 0.54, 1.0]


def test_step_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        next(sampled_frames(write_clip(tmp_path / "a.mp4", frames=2), step=0))


def test_the_frame_step_setting_must_be_positive():
    from yolo_backend.settings import Settings, SettingsError

    assert Settings.from_env(env={}).video_frame_step == 5
    assert Settings.from_env(env={"VIDEO_FRAME_STEP": "2"}).video_frame_step == 2
    with pytest.raises(SettingsError, match="VIDEO_FRAME_STEP=0 must be greater than 0"):
        Settings.from_env(env={"VIDEO_FRAME_STEP": "0"})


# --- a variable-frame-rate MP4: the writer's constant-rate clip with its sample times rewritten -----------------
MP4_CONTAINERS = (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts")


def _boxes(data: bytes, start: int, end: int, parents: tuple = ()):
    """(offset, type, ancestors' offsets) of every MP4 box, depth first."""
    while start < end:
        size, kind = struct.unpack(">I4s", data[start:start + 8])
        yield start, kind, parents
        if kind in MP4_CONTAINERS:
            yield from _boxes(data, start + 8, start + size, parents + (start,))
        start += size


def make_variable_rate(path: Path, slow_from: int) -> list[float]:
    """Rewrite ``path`` (OpenCV's mp4v MP4, one constant sample duration, moov after mdat) so that frames from
    ``slow_from`` on last twice as long; returns every frame's true time in seconds."""
    data = bytearray(path.read_bytes())
    boxes = {kind: (off, parents) for off, kind, parents in _boxes(bytes(data), 0, len(data))}
    stts, parents = boxes[b"stts"]
    _, count, frames, delta = struct.unpack(">IIII", data[stts + 8:stts + 24])
    assert count == 1 and boxes[b"moov"][0] > boxes[b"mdat"][0]  # so no chunk offset moves
    media_scale = struct.unpack(">I", data[boxes[b"mdhd"][0] + 20:boxes[b"mdhd"][0] + 24])[0]
    movie_scale = struct.unpack(">I", data[boxes[b"mvhd"][0] + 20:boxes[b"mvhd"][0] + 24])[0]
    ticks = [i * delta if i <= slow_from else slow_from * delta + (i - slow_from) * 2 * delta
             for i in range(frames + 1)]
    movie = ticks[-1] * movie_scale // media_scale
    for kind, at, value in ((b"mdhd", 24, ticks[-1]), (b"mvhd", 24, movie), (b"tkhd", 28, movie),
                            (b"elst", 16, movie)):
        data[boxes[kind][0] + at:boxes[kind][0] + at + 4] = struct.pack(">I", value)
    data[stts:stts + 24] = struct.pack(">I4sIIIIII", 32, b"stts", 0, 2, slow_from, delta, frames - slow_from,
                                       2 * delta)
    for parent in parents:  # each ancestor grows by the 8 bytes of the second entry
        size = struct.unpack(">I", data[parent:parent + 4])[0]
        data[parent:parent + 4] = struct.pack(">I", size + 8)
    path.write_bytes(bytes(data))
    return [t / media_scale for t in ticks[:-1]]


def test_a_variable_frame_rate_clip_keeps_each_frame_at_its_true_time(tmp_path):
    """The first 10 frames at 10 fps, the next 10 at 5 fps: the container's frame rate (an average) is wrong for
    both halves, and index / rate would put frames up to half a second off."""
    clip = write_clip(tmp_path / "vfr.mp4", frames=20, fps=10.0)
    true_times = make_variable_rate(clip, slow_from=10)
    info = probe(clip)
    assert info.fps == pytest.approx(20 / 3.0)                       # what the container says: 6.67 fps
    frames = list(sampled_frames(clip, step=1))
    assert [f.index for f in frames] == list(range(20))
    assert [f.time_s for f in frames] == pytest.approx(true_times, abs=1e-3)
    assert max(abs(f.index / info.fps - t) for f, t in zip(frames, true_times)) >= 0.45  # the naive reading
    numbers = [label_studio_frame(f.time_s, 10.0) for f in frames]   # Label Studio's Video frameRate="10"
    assert numbers == [*range(1, 12), *range(13, 30, 2)]
    for frame in frames[::4]:                                        # the pixels are the frame's own
        assert abs(red_box(frame.rgb)[0] - box_at(frame.index)[0]) <= 1
