"""Issue 26, end to end: a real Label Studio 1.23 project whose config has two RectangleLabels (one for annotators
only, ``model_skip``) and an image-level Choices, with ``model_score_threshold`` on the controls; Label Studio
stores what the backend answers, and the Choices answer agrees with the boxes of the same forward pass."""
from __future__ import annotations

import pytest

from . import harness
from .test_ls_predict import setup_model_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image" model_score_threshold="0.3">
    <Label value="Fire" predicted_values="fire"/><Label value="smoke"/>
  </RectangleLabels>
  <RectangleLabels name="other" toName="image" model_skip="true">
    <Label value="person"/>
  </RectangleLabels>
  <Choices name="seen" toName="image" choice="multiple" model_score_threshold="0.3">
    <Choice value="Fire" predicted_values="fire"/><Choice value="smoke"/><Choice value="no fire"/>
  </Choices>
</View>"""


def test_several_controls_and_choices_are_stored(label_studio, yolo_backend, fire_smoke_images, image_server):
    api = label_studio.api
    project_id = api.create_project("controls e2e", CONFIG)["id"]
    tasks = harness.import_images(api, project_id, fire_smoke_images.upload, image_server,
                                  fire_smoke_images.url_names)
    api.connect_ml_backend(project_id, yolo_backend.url, "yolov7 controls e2e")
    version = setup_model_version(yolo_backend.url, project_id, CONFIG, label_studio.url)
    api.retrieve_predictions(project_id, list(tasks))
    answered = {"boxes": 0, "no fire": 0}
    for task_id, path in tasks.items():
        [prediction] = api.predictions(task_id)
        assert prediction["model_version"] == version, prediction
        regions = prediction["result"]
        assert {r["from_name"] for r in regions} <= {"label", "seen"}, (path.name, regions)
        boxes = [r for r in regions if r["from_name"] == "label"]
        assert all(r["score"] >= 0.3 and r["type"] == "rectanglelabels" for r in boxes), boxes
        [answer] = [r for r in regions if r["from_name"] == "seen"]
        assert answer["type"] == "choices", answer
        box_labels = {r["value"]["rectanglelabels"][0] for r in boxes}
        # the same forward pass and threshold: the image-level answer names exactly the classes boxed
        assert set(answer["value"]["choices"]) == (box_labels or {"no fire"}), (path.name, answer, box_labels)
        answered["boxes" if box_labels else "no fire"] += 1
    assert answered["boxes"] > 0, f"the checkpoint boxed nothing at 0.3 on the fire/smoke photos: {answered}"
    print(f"\n{len(tasks)} tasks: {answered}")
