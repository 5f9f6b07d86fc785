"""What the model saved annotators (labelstudio/effort.py): the matching rule on hand-made boxes, choosing the
prediction an annotation started from, and the numbers per version."""

from __future__ import annotations

import pytest

from yolo_backend.labelstudio.effort import (BoxMatch, EffortSummary, TaskEffort, match_boxes, needs_predictions,
                                             remembered_or_new, started_from, task_effort, version_effort,
                                             with_predictions)
from yolo_backend.labelstudio.regions import RegionBox, region_box


def box(x1, y1, x2, y2, label="fire"):
    return RegionBox(label, x1, y1, x2, y2)


def region(x, y, w, h, label="fire", rotation=0.0, origin=None, size=(200, 100)):
    found = {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": size[0],
             "original_height": size[1], "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                                                   "rectanglelabels": [label]}}
    if origin:
        found["origin"] = origin
    return found


# --- the rule ------------------------------------------------------------------------------------------------

def test_an_unchanged_box_is_accepted():
    assert match_boxes([box(.1, .1, .5, .5)], [box(.1, .1, .5, .5)]) == BoxMatch(accepted=1)


def test_a_box_moved_a_little_is_still_accepted_and_one_moved_more_is_adjusted():
    predicted = box(0.0, 0.0, 0.5, 0.5)
    assert match_boxes([predicted], [box(0.0, 0.0, 0.5, 0.48)]) == BoxMatch(accepted=1)     # IoU 0.96
    assert match_boxes([predicted], [box(0.0, 0.0, 0.5, 0.35)]) == BoxMatch(adjusted=1)     # IoU 0.70
    assert match_boxes([predicted], [box(0.0, 0.0, 0.5, 0.2)]) == BoxMatch(deleted=1, drawn=1)  # IoU 0.40


def test_deleted_and_drawn_boxes():
    assert match_boxes([box(.1, .1, .3, .3)], []) == BoxMatch(deleted=1)
    assert match_boxes([], [box(.1, .1, .3, .3)]) == BoxMatch(drawn=1)
    assert match_boxes([box(.1, .1, .3, .3)], [box(.6, .6, .9, .9)]) == BoxMatch(deleted=1, drawn=1)


def test_a_label_change_is_a_deletion_and_a_drawing():
    assert match_boxes([box(.1, .1, .5, .5, "fire")], [box(.1, .1, .5, .5, "smoke")]) == BoxMatch(deleted=1, drawn=1)
    assert match_boxes([box(.1, .1, .5, .5, "Fire")], [box(.1, .1, .5, .5, "fire")]) == BoxMatch(accepted=1)


def test_negatives_both_empty_is_a_task_with_nothing_to_do():
    assert match_boxes([], []) == BoxMatch()
    assert BoxMatch().final_boxes == 0


def test_greedy_pairs_the_highest_iou_first():
    # The final box overlaps both predictions; the better one pairs, the other is deleted.
    predicted = [box(0.0, 0.0, 0.5, 0.4), box(0.0, 0.0, 0.5, 0.5)]
    assert match_boxes(predicted, [box(0.0, 0.0, 0.5, 0.5)]) == BoxMatch(accepted=1, deleted=1)
    # Two final boxes on two predictions: each pairs with its own.
    predicted = [box(.0, .0, .2, .2), box(.5, .5, .9, .9)]
    final = [box(.5, .5, .9, .88), box(.0, .0, .2, .2)]  # IoU 0.95 and 1
    assert match_boxes(predicted, final) == BoxMatch(accepted=2)


def test_a_box_the_editor_marks_manual_pairs_with_nothing():
    predicted, final = [box(.1, .1, .5, .5)], [box(.1, .1, .5, .5)]
    assert match_boxes(predicted, final, [True]) == BoxMatch(deleted=1, drawn=1)
    assert match_boxes(predicted, final, [False]) == BoxMatch(accepted=1)


def test_rotated_boxes_compare_by_their_bounds():
    predicted = region_box(region(10, 10, 30, 30), (200, 100))
    turned = region_box(region(10, 10, 30, 30, rotation=30), (200, 100))
    assert turned.rotated
    outcome = match_boxes([predicted], [turned])
    assert outcome.final_boxes == 1 and outcome.accepted == 0  # a 30 degree turn is a real change
    same = region_box(region(10, 10, 30, 30, rotation=360), (200, 100))
    assert match_boxes([predicted], [same]) == BoxMatch(accepted=1)


# --- which prediction --------------------------------------------------------------------------------------

PREDICTIONS = [{"id": 7, "model_version": "v1-a", "created_at": "2026-01-01T10:00:00Z", "result": []},
               {"id": 9, "model_version": "v2-b", "created_at": "2026-01-02T10:00:00Z", "result": []}]


def test_parent_prediction_names_the_prediction():
    prediction, via_parent = started_from({"predictions": PREDICTIONS}, {"parent_prediction": 7,
                                                                         "created_at": "2026-01-03T00:00:00Z"})
    assert prediction["model_version"] == "v1-a" and via_parent


@pytest.mark.parametrize("created, version", [("2026-01-01T12:00:00Z", "v1-a"), ("2026-01-02T11:00:00+00:00", "v2-b"),
                                              ("2025-12-31T00:00:00Z", None)])
def test_without_parent_the_prediction_serving_when_the_annotation_was_made(created, version):
    # parent 99 was deleted: Label Studio keeps the id only while the prediction exists, we fall back on time.
    prediction, via_parent = started_from({"predictions": PREDICTIONS}, {"parent_prediction": 99,
                                                                         "created_at": created})
    assert (prediction or {}).get("model_version") == version and not via_parent


# --- per version -----------------------------------------------------------------------------------------------

def task(task_id, predicted, final, version="v1-a", parent=True, lead=None, cancelled=False):
    prediction = {"id": 100 + task_id, "model_version": version, "created_at": "2026-01-01T00:00:00Z",
                  "result": predicted}
    annotation = {"id": 200 + task_id, "result": final, "created_at": "2026-01-05T00:00:00Z",
                  "parent_prediction": prediction["id"] if parent else None, "lead_time": lead,
                  "was_cancelled": cancelled}
    return {"id": task_id, "annotations": [annotation], "predictions": [prediction] if version else []}


def test_numbers_per_version():
    tasks = [
        task(1, [region(10, 10, 20, 20)], [region(10, 10, 20, 20, origin="prediction")], lead=10.0),
        task(2, [region(10, 10, 20, 20)], [region(10, 10, 20, 14, origin="prediction-changed"),
                                           region(60, 60, 10, 10, label="smoke", origin="manual")], lead=30.0),
        task(3, [], [], lead=2.0),  # a negative: nothing predicted, nothing drawn
        task(4, [region(50, 50, 10, 10)], [], version="v2-b", parent=False, lead=5.0),  # found by time
        task(5, [], [region(5, 5, 10, 10)], version=None),  # no prediction at all, no lead time
        task(6, [region(5, 5, 10, 10)], [], cancelled=True),  # skipped: not counted
    ]
    found = {e.version: e for e in version_effort(tasks, "label")}
    assert set(found) == {"v1-a", "v2-b", None}
    v1 = found["v1-a"]
    assert (v1.tasks, v1.accepted, v1.adjusted, v1.deleted, v1.drawn) == (3, 1, 1, 0, 1)
    assert v1.final_boxes == 3 and v1.empty_agreed == 1 and v1.via_parent == 3
    assert v1.model_share == pytest.approx(2 / 3, abs=1e-4)
    assert v1.median_seconds == 10.0 and v1.timed_tasks == 3
    assert v1.seconds_per_box == pytest.approx(42 / 3, abs=0.01)
    v2 = found["v2-b"]
    assert (v2.tasks, v2.deleted, v2.final_boxes, v2.via_parent, v2.model_share) == (1, 1, 0, 0, None)
    assert v2.seconds_per_box is None and v2.median_seconds == 5.0
    scratch = found[None]
    assert (scratch.tasks, scratch.drawn, scratch.timed_tasks, scratch.median_seconds) == (1, 1, 0, None)


def test_a_summary_reads_back_from_its_history_form():
    from dataclasses import asdict

    summary = version_effort([task(1, [region(10, 10, 20, 20)], [region(10, 10, 20, 20)], lead=4.0)])[0]
    assert EffortSummary.from_dict(asdict(summary)) == summary
    assert EffortSummary.from_dict({"version": 3, "tasks": "many", "drawn": True}) == EffortSummary("3")


def test_other_controls_and_bad_regions_are_left_out():
    other = dict(region(10, 10, 20, 20), from_name="other")
    bad = region(10, 10, 0, 20)
    effort = task_effort(task(1, [region(10, 10, 20, 20), other], [region(10, 10, 20, 20), bad, other]), "label")
    assert effort.match == BoxMatch(accepted=1)


def test_predictions_listed_by_id_are_put_back_in_full():
    """Label Studio 1.23's export lists a task's predictions by id; the project's prediction list has them."""
    listed = [{"id": 1, "predictions": [101], "annotations": []}, {"id": 2, "predictions": [], "annotations": []},
              {"id": 3, "predictions": [{"id": 103, "model_version": "v1-a"}], "annotations": []}]
    full = [{"id": 101, "task": 1, "model_version": "v1-a"}, {"id": 102, "task": 2, "model_version": "v1-a"}]
    assert needs_predictions(listed) and not needs_predictions(listed[1:])
    tasks = with_predictions(listed, full)
    assert tasks[0]["predictions"] == [full[0]] and listed[0]["predictions"] == [101]  # a copy
    assert tasks[1] is listed[1] and tasks[2] is listed[2]  # nothing listed by id: left as they are


def test_an_earlier_measure_stands_in_for_a_prediction_deleted_since():
    """Pool scoring deleted the v1 prediction an annotation started from (Label Studio cleared parent_prediction):
    the record an earlier run kept for that annotation counts, not "no prediction"."""
    before = task_effort(task(1, [region(10, 10, 20, 20)], [region(10, 10, 20, 20)], lead=4.0))
    assert before.version == "v1-a" and before.annotation_id == 201
    gone = task(1, [], [region(10, 10, 20, 20)], version=None, lead=4.0)
    now = task_effort(gone)
    assert now.version is None and now.match == BoxMatch(drawn=1)
    remembered = {201: TaskEffort.from_record(before.record())}
    assert remembered[201] == before
    assert remembered_or_new([now], remembered) == [before]
    other = task_effort(task(2, [], [region(10, 10, 20, 20)], version=None))  # never had one: stays as it is
    assert remembered_or_new([other], remembered) == [other]
    assert TaskEffort.from_record({"match": {"accepted": "x"}}) is None
