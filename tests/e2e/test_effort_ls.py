"""Issue 24 against a real Label Studio 1.23: what it stores and exports for an annotation made from a prediction
(``parent_prediction``, region ``origin``, ``lead_time``; the export lists a task's predictions by id), and the
per-version numbers the training job works out from it (``jobs/effort.annotation_effort``, with our API client).

One token mode is enough here (the API client's auth is covered by the other e2e tests).
"""
from __future__ import annotations

import pytest

from tests.support import FIRE_SMOKE_CONFIG

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def region(x, y, w, h, label="fire", origin=None):
    found = {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 200,
             "original_height": 100, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                               "rectanglelabels": [label]}}
    if origin:
        found["origin"] = origin
    return found


@pytest.mark.parametrize("label_studio", ["legacy"], indirect=True)
def test_parent_prediction_origins_and_lead_time_give_the_numbers(label_studio, tmp_path):
    from yolo_backend.jobs.dataset import annotated_tasks
    from yolo_backend.jobs.effort import annotation_effort
    from yolo_backend.labelstudio.api import LabelStudioClient
    from yolo_backend.labelstudio.client import LabelStudioSession

    api = label_studio.api
    project = api.create_project("effort", FIRE_SMOKE_CONFIG)["id"]
    predicted = {"model_version": "v1-20260101T000000", "score": 0.5, "result": [region(10, 20, 30, 40)]}
    api.import_tasks(project, [{"data": {"image": f"/data/upload/{project}/img{i}.png"}, "predictions": [predicted]}
                               for i in range(3)])
    tasks = sorted(api.tasks(project), key=lambda t: t["id"])
    ids = [api.predictions(t["id"])[0]["id"] for t in tasks]
    # 1: accepted as is; 2: adjusted, and a smoke box drawn; 3: no parent named (matched by time), fire -> smoke
    api.create_annotation(tasks[0]["id"], [region(10, 20, 30, 40, origin="prediction")], parent_prediction=ids[0],
                          lead_time=12.5)
    api.create_annotation(tasks[1]["id"], [region(10, 20, 30, 30, origin="prediction-changed"),
                                           region(60, 10, 20, 20, "smoke", origin="manual")],
                          parent_prediction=ids[1], lead_time=30.0)
    api.create_annotation(tasks[2]["id"], [region(10, 20, 30, 40, "smoke", origin="manual")], lead_time=20.0)

    client = LabelStudioClient.for_session(LabelStudioSession(label_studio.url, label_studio.api_key))
    exported = sorted(annotated_tasks(client, project), key=lambda t: t["id"])
    assert [t["predictions"] for t in exported] == [[i] for i in ids]  # 1.23 exports predictions by id
    first = exported[0]["annotations"][0]
    assert first["parent_prediction"] == ids[0] and first["lead_time"] == 12.5
    assert first["result"][0]["origin"] == "prediction"  # the region's origin is kept as sent

    [v1] = annotation_effort(client, tmp_path, project, exported, "label")
    assert v1["version"] == "v1-20260101T000000" and v1["tasks"] == 3 and v1["via_parent"] == 2
    assert (v1["accepted"], v1["adjusted"], v1["deleted"], v1["drawn"]) == (1, 1, 1, 2)
    assert v1["model_share"] == 0.5 and v1["median_seconds"] == 20.0
