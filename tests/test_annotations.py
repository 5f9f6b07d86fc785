"""Which of a task's annotations training and the YOLO export use (yolo_backend/labelstudio/annotations.py)."""

from yolo_backend.labelstudio.annotations import latest_annotation, latest_prediction


def test_latest_non_cancelled_annotation_by_parsed_time():
    task = {"annotations": [
        {"id": 1, "created_at": "2025-01-02T09:00:00Z", "updated_at": "2025-01-02T11:30:00+02:00"},  # 09:30 UTC
        {"id": 2, "created_at": "2025-01-02T09:10:00Z"},                      # no update: created time counts
        {"id": 3, "updated_at": "2025-01-02T10:00:00Z", "was_cancelled": True},  # skipped: never used
        "not an annotation"]}
    # 09:30 UTC beats 09:10...
    assert latest_annotation(task)["id"] == 1
    task["annotations"][0]["updated_at"] = "2025-01-02T11:05:00+02:00"  # ...09:05 UTC does not (as text it would)
    assert latest_annotation(task)["id"] == 2
    assert latest_annotation({"annotations": [{"id": 5, "was_cancelled": True}]}) is None
    assert latest_annotation({}) is None
    # Same times: the higher id is the later one.
    assert latest_annotation({"annotations": [{"id": 8}, {"id": 9}]})["id"] == 9


def test_latest_prediction():
    task = {"predictions": [{"id": 1, "created_at": "2025-01-01T00:00:00Z"},
                            {"id": 2, "created_at": "2025-01-03T00:00:00Z"}]}
    assert latest_prediction(task)["id"] == 2 and latest_prediction({}) is None
