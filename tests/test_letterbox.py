"""Letterbox and scale-back on non-square images with known boxes."""

import cv2
import numpy as np
import pytest

from yolo_backend.yolov7.preprocess import PAD_VALUE, ImageReadError, letterbox, read_image, scale_boxes_back

# (x1, y1, x2, y2) in original pixels, each drawn in its own colour on a black 500x300 (w x h) image
BOXES = np.array([[40, 30, 140, 120], [300, 150, 460, 280], [0, 0, 60, 40]], dtype=np.float32)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def synthetic(width=500, height=300):
    image = np.zeros((height, width, 3), np.uint8)
    for (x1, y1, x2, y2), colour in zip(BOXES.astype(int), COLOURS):
        image[y1:y2, x1:x2] = colour
    return image


def found_box(image, colour):
    """Bounding box (x1, y1, x2+1, y2+1) of pixels mostly of ``colour`` (bilinear edges blur by one pixel)."""
    channel = int(np.argmax(colour))
    mask = (image[:, :, channel] > 128) & (image.sum(axis=2) - image[:, :, channel] < 128)
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


@pytest.mark.parametrize("size", [320, 640])
def test_landscape_image(size):
    image = synthetic()
    boxed = letterbox(image, size)
    h, w = boxed.shape
    r = size / 500
    assert (w, h) == (size, int(np.ceil(round(300 * r) / 32) * 32))
    assert h % 32 == 0 and w % 32 == 0
    assert boxed.ratio == pytest.approx((round(500 * r) / 500, round(300 * r) / 300))
    left, top = boxed.pad
    new_h = round(300 * r)
    assert left == 0 and top == round((h - new_h) / 2 - 0.1)
    # padding rows are exactly 114, above and below the picture
    assert (boxed.image[:top] == PAD_VALUE).all() and (boxed.image[top + new_h:] == PAD_VALUE).all()
    assert boxed.image[top:top + new_h].max() == 255
    for box, colour in zip(BOXES, COLOURS):
        expected = box * r + np.array([left, top, left, top])
        assert np.abs(found_box(boxed.image, colour) - expected).max() <= 1.0
        back = scale_boxes_back(found_box(boxed.image, colour)[None], boxed.ratio, boxed.pad, (500, 300))[0]
        assert np.abs(back - box).max() <= 1.0 / r + 1e-3  # one letterboxed pixel


def test_portrait_image_pads_left_and_right():
    image = np.ascontiguousarray(synthetic(500, 280).transpose(1, 0, 2))  # 280 wide, 500 high
    boxed = letterbox(image, 320)
    r = 320 / 500
    assert boxed.shape == (320, 192)  # 280 * 0.64 = 179.2 -> 179 wide, 13 columns of padding
    left, top = boxed.pad
    assert (left, top) == (6, 0)  # odd padding: 6 left, 7 right, like the reference's round(dw -/+ 0.1)
    assert (boxed.image[:, :left] == PAD_VALUE).all() and (boxed.image[:, left + 179:] == PAD_VALUE).all()
    assert boxed.image[:, left].max() == 255  # the box drawn at x = 0 starts right after the padding
    transposed = BOXES[:, [1, 0, 3, 2]]
    for box, colour in zip(transposed, COLOURS):
        found = found_box(boxed.image, colour)
        assert np.abs(found - (box * r + np.array([left, 0, left, 0]))).max() <= 1.0
        back = scale_boxes_back(found[None], boxed.ratio, boxed.pad, (280, 500))[0]
        assert np.abs(back - box).max() <= 1.0 / r + 1e-3


def test_odd_padding_split_like_reference():
    # 333 x 100 at 320: resized to 320 x 96 -> already a multiple of 32? 100*320/333 = 96.1 -> 96, no pad.
    boxed = letterbox(np.zeros((100, 333, 3), np.uint8), 320)
    assert boxed.shape == (96, 320) and boxed.pad == (0, 0)
    # 320 x 90 -> 90 rows, 6 rows of padding: top 3 bottom 3; 320 x 91 -> 5 rows: top 2, bottom 3
    assert letterbox(np.zeros((90, 320, 3), np.uint8), 320).pad == (0, 3)
    boxed = letterbox(np.zeros((91, 320, 3), np.uint8), 320)
    assert boxed.pad == (0, 2) and boxed.shape == (96, 320)


def test_no_resize_when_size_matches_and_upscaling_small_images():
    image = np.random.default_rng(0).integers(0, 255, (320, 320, 3), dtype=np.uint8)
    assert np.array_equal(letterbox(image, 320).image, image)  # untouched pixels
    small = letterbox(np.zeros((100, 50, 3), np.uint8), 320)  # the reference detect scales up too
    assert small.shape == (320, 160) and small.ratio == (3.2, 3.2)


def test_scale_back_clips_to_image():
    out = scale_boxes_back(np.array([[-10.0, -5.0, 700.0, 400.0]]), (1.0, 1.0), (0, 0), (500, 300))
    assert out.tolist() == [[0.0, 0.0, 500.0, 300.0]]


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="HxWx3"):
        letterbox(np.zeros((10, 10), np.uint8), 320)


def test_read_image(tmp_path):
    image = synthetic()
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert np.array_equal(read_image(path), image)  # RGB order
    with pytest.raises(ImageReadError, match="no such image file"):
        read_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.jpg: not a readable image"):
        read_image(bad)
