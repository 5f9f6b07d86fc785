"""The one rule for a Label Studio rectangle region -> box (yolo_backend/labelstudio/regions.py), on hand-made
regions, and its two callers (training, conversion) agreeing on it."""

import numpy as np
import pytest

from yolo_backend.convert.from_export import region_box as converter_box
from yolo_backend.convert.problems import ProblemLog
from yolo_backend.jobs.dataset import annotation_boxes
from yolo_backend.convert import target_from_config
from yolo_backend.labelstudio.regions import BadRegion, RegionBox, is_box_region, region_box

CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '<Label value="fire"/><Label value="smoke"/></RectangleLabels></View>')


def rect(x, y, w, h, rotation=0, labels=("fire",), ow=400, oh=200, **extra):
    region = {"id": "r1", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
              "original_width": ow, "original_height": oh,
              "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": list(labels)}}
    region.update(extra)
    return region


def test_plain_box_in_fractions():
    box = region_box(rect(10, 20, 30, 40))
    assert isinstance(box, RegionBox)
    assert (box.label, box.rotated, box.clipped, box.extra_labels) == ("fire", False, False, ())
    assert np.allclose([box.x1, box.y1, box.x2, box.y2], [0.1, 0.2, 0.4, 0.6])
    assert np.allclose(box.pixels(400, 200), [40, 40, 160, 120])
    assert np.allclose(box.center_size(), [0.25, 0.4, 0.3, 0.4])


def test_rotated_box_becomes_its_axis_aligned_bounding_box():
    # 80 x 40 px at (40, 40) px, turned 90 degrees clockwise about its top-left corner: x in [0, 40], y in [40, 120]
    box = region_box(rect(10, 20, 20, 20, rotation=90))
    assert box.rotated
    assert np.allclose(box.pixels(400, 200), [0, 40, 40, 120], atol=1e-9)
    # the image size given wins over the region's original size (the same aspect gives the same box)
    assert np.allclose(region_box(rect(10, 20, 20, 20, rotation=90, ow=1, oh=1), (800, 400)).pixels(400, 200),
                       [0, 40, 40, 120], atol=1e-9)
    assert not region_box(rect(10, 20, 20, 20, rotation=360)).rotated


def test_rotated_box_without_image_size_is_bad():
    region = rect(10, 20, 20, 20, rotation=45)
    del region["original_width"], region["original_height"]
    bad = region_box(region)
    assert isinstance(bad, BadRegion) and "original_width" in bad.message
    assert isinstance(region_box(region, (400, 200)), RegionBox)


def test_box_past_the_border_is_clipped_and_says_so():
    box = region_box(rect(90, 90, 20, 20))
    assert box.clipped and np.allclose([box.x2, box.y2], [1.0, 1.0])


@pytest.mark.parametrize("region, kind", [
    (rect(10, 10, 10, 10, labels=()), "region without label"),
    (rect("a", 10, 10, 10), "bad region"),
    (rect(10, 10, float("nan"), 10), "bad region"),
    (rect(10, 10, 0, 10), "bad region"),
    (rect(10, 10, -5, 10), "bad region"),
    (rect(120, 10, 10, 10), "bad region"),           # outside the image
    (rect(10, 10, 0.1, 10), "bad region"),           # 0.4 px wide at 400 px
    ({"id": "r9", "type": "rectanglelabels", "value": {"rectanglelabels": ["fire"]}}, "bad region"),
])
def test_bad_regions_say_why(region, kind):
    bad = region_box(region)
    assert isinstance(bad, BadRegion) and bad.kind == kind and bad.message


def test_several_labels_keep_the_first():
    box = region_box(rect(10, 10, 10, 10, labels=("smoke", "fire")))
    assert (box.label, box.extra_labels) == ("smoke", ("fire",))


def test_which_regions_are_boxes_of_a_control():
    assert is_box_region(rect(1, 1, 1, 1), "label")
    assert is_box_region(dict(rect(1, 1, 1, 1), type="RectangleLabels"), "label")
    assert not is_box_region(rect(1, 1, 1, 1, from_name="other"), "label")
    assert is_box_region(rect(1, 1, 1, 1, from_name="other"), None)
    without_name = rect(1, 1, 1, 1)
    del without_name["from_name"]
    assert is_box_region(without_name, "label")       # it names no other control
    assert not is_box_region({"type": "choices", "value": {"choices": ["x"]}}, "label")
    assert not is_box_region("not a region", None)


def test_training_and_conversion_use_the_same_rule():
    target = target_from_config(CONFIG)
    regions = [rect(10, 20, 20, 20, rotation=90), rect(10, 10, 0, 10), rect(5, 5, 10, 10, labels=("flame",)),
               rect(90, 90, 20, 20, labels=("Smoke",)), rect(1, 1, 1, 1, from_name="other")]
    boxes, classes, unknown, bad = annotation_boxes({"result": regions}, target, 400, 200)
    assert classes.tolist() == [0, 1] and unknown == ["flame"] and [b.kind for b in bad] == ["bad region"]
    assert np.allclose(boxes, [[0, 40, 40, 120], [360, 180, 400, 200]], atol=1e-4)

    problems = ProblemLog()
    converted = [converter_box(r, "task 1", problems) for r in regions if is_box_region(r, "label")]
    assert [b is None for b in converted] == [False, True, False, False]
    assert np.allclose(converted[0].pixels(400, 200), boxes[0], atol=1e-4)
    assert sorted(p.kind for p in problems.problems) == ["bad region", "clipped box", "rotated box"]
