"""Per-control attributes (model_score_threshold, model_skip, predicted_values), several controls in one config, and
image-level Choices from the detector: the config rules, then /setup and /predict through the Flask test client
(the fake detector of tests/test_server.py: a fire box at 0.9 and a smoke box at 0.1 on every image), then what a
training run reads from a fake Label Studio."""

from __future__ import annotations

import pytest

from tests.support import LEGACY, FAKE_BACKEND_URL, FakeLabelStudio
from tests.test_server import make_client, model_file, png_uri  # noqa: F401 (model_file: a fixture)
from yolo_backend.labelstudio.config import LabelConfigError, parse_label_config
from yolo_backend.labelstudio.controls import ChoicesControl, RectangleControl, read_controls
from yolo_backend.jobs.dataset import chosen_class_without_box

IMAGE = '<Image name="image" value="$image"/>'


def config(*controls: str) -> str:
    return "<View>" + IMAGE + "".join(controls) + "</View>"


def rectangles(name: str = "label", labels: str = '<Label value="fire"/><Label value="smoke"/>', **attrs: str) -> str:
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f'<RectangleLabels name="{name}" toName="image"{extra}>{labels}</RectangleLabels>'


def choices(name: str = "seen", values: tuple[str, ...] = ("fire", "smoke", "no fire"), **attrs: str) -> str:
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return (f'<Choices name="{name}" toName="image"{extra}>'
            + "".join(f'<Choice value="{v}"/>' for v in values) + "</Choices>")


def predict(client, label_config: str) -> tuple[int, dict]:
    response = client.post("/predict", json={"tasks": [{"id": 7, "data": {"image": png_uri(100, 50)}}],
                                             "label_config": label_config})
    return response.status_code, response.json


def by_control(body: dict) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for region in body["results"][0]["result"]:
        found.setdefault(region["from_name"], []).append(region)
    return found


# --- the config rules --------------------------------------------------------------------------------------------
def test_attributes_are_read_per_control():
    controls = read_controls(parse_label_config(config(
        rectangles(model_score_threshold="0.4", labels='<Label value="Fire" predicted_values="fire, flame"/>'),
        rectangles("extra", '<Label value="person"/>', model_skip="true"),
        choices(choice="multiple", model_score_threshold="0.7"))))
    [rect] = controls.rectangles
    assert isinstance(rect, RectangleControl) and rect.threshold == 0.4
    assert rect.predicted == (("Fire", ("fire", "flame")),)
    [seen] = controls.choices
    assert isinstance(seen, ChoicesControl) and seen.multiple and seen.threshold == 0.7
    assert controls.skipped == ("extra",) and controls.labels == ("Fire",) and controls.box_names == ("label",)


@pytest.mark.parametrize("attrs, says", [
    ({"model_score_threshold": "1.5"}, "model_score_threshold='1.5' is not a number from 0 to 1"),
    ({"model_score_threshold": "high"}, "model_score_threshold='high' is not a number from 0 to 1"),
    ({"model_score_threshold": "nan"}, "is not a number from 0 to 1"),
    ({"model_skip": "maybe"}, "model_skip='maybe' is not true or false"),
])
def test_bad_attribute_values_say_what_to_write(attrs, says):
    with pytest.raises(LabelConfigError, match=says):
        read_controls(parse_label_config(config(rectangles(**attrs))))


def test_an_empty_predicted_values_is_an_error():
    with pytest.raises(LabelConfigError, match="label 'fire': predicted_values is empty"):
        read_controls(parse_label_config(config(rectangles(labels='<Label value="fire" predicted_values=" "/>'))))


def test_every_control_skipped_says_so():
    with pytest.raises(LabelConfigError, match="model_skip: label"):
        read_controls(parse_label_config(config(rectangles(model_skip="true"))))


def test_rectangles_on_two_images_still_need_from_name():
    two = ('<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
           '<RectangleLabels name="ra" toName="a"><Label value="fire"/></RectangleLabels>'
           '<RectangleLabels name="rb" toName="b"><Label value="smoke"/></RectangleLabels></View>')
    with pytest.raises(LabelConfigError, match="different images; set FROM_NAME"):
        read_controls(parse_label_config(two))
    assert read_controls(parse_label_config(two), from_name="rb").labels == ("smoke",)


# --- /setup and /predict -----------------------------------------------------------------------------------------
def test_setup_refuses_a_bad_threshold_with_a_400(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file)
    response = client.post("/setup", json={"project": "1.1", "schema": config(rectangles(model_score_threshold="2"))})
    assert response.status_code == 400
    assert "control 'label': model_score_threshold='2' is not a number from 0 to 1" in response.json["error"]
    assert client.post("/setup", json={"project": "1.1", "schema": config(rectangles())}).status_code == 200


VIDEO = ('<View><Video name="video" value="$video"/><VideoRectangle name="box" toName="video"/>'
         '<Labels name="videoLabels" toName="video"><Label value="fire"/></Labels></View>')


def test_an_unsupported_config_is_refused_saying_what_is_supported(tmp_path, model_file):  # noqa: F811
    """A polygon project: Connect Model (/setup) and /predict answer 400 naming what the backend serves (a video
    project connects); a config without control tags yet (a new project's <View/>) still connects."""
    client, _, _ = make_client(tmp_path, model_file)
    assert client.post("/setup", json={"project": "1.1", "schema": VIDEO}).status_code == 200
    polygons = config('<PolygonLabels name="p" toName="image"><Label value="fire"/></PolygonLabels>')
    response = client.post("/setup", json={"project": "1.1", "schema": polygons})
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert "found: p (PolygonLabels)" in error
    assert "Supported: RectangleLabels (boxes) and Choices (one answer per image) on an Image" in error
    assert "VideoRectangle with Labels on a Video" in error and "PolygonLabels" in error
    status, body = predict(client, polygons)
    assert status == 400 and "found: p (PolygonLabels)" in body["error"] and "Supported: " in body["error"]
    assert client.post("/setup", json={"project": "1.1", "schema": "<View></View>"}).status_code == 200
    assert client.post("/setup", json={"project": "1.1", "schema": config(choices())}).status_code == 200


def test_a_control_threshold_wins_over_the_setting(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file)   # MODEL_SCORE_THRESHOLD's default shows only the 0.9 fire box
    status, body = predict(client, config(rectangles()))
    assert status == 200 and [r["value"]["rectanglelabels"] for r in by_control(body)["label"]] == [["fire"]]
    status, body = predict(client, config(rectangles(model_score_threshold="0.05")))
    assert status == 200 and [r["value"]["rectanglelabels"] for r in by_control(body)["label"]] == [["fire"], ["smoke"]]
    status, body = predict(client, config(rectangles(model_score_threshold="0.95")))
    assert status == 200 and body["results"][0]["result"] == []
    status, body = predict(client, config(rectangles(model_score_threshold="-0.1")))
    assert status == 400 and "model_score_threshold='-0.1'" in body["error"]


def test_predicted_values_name_the_classes_of_a_label_and_win_over_label_map(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file, label_map="fire=Other")
    labels = '<Label value="Flame" predicted_values="fire"/><Label value="Other"/><Label value="smoke"/>'
    status, body = predict(client, config(rectangles(labels=labels)))
    assert status == 200, body
    assert [r["value"]["rectanglelabels"] for r in by_control(body)["label"]] == [["Flame"]]
    client, _, _ = make_client(tmp_path, model_file)
    status, body = predict(client, config(rectangles(labels='<Label value="Fire" predicted_values="fire,flame"/>')))
    assert status == 400
    assert "label 'Fire' has predicted_values naming 'flame', which the model does not have (classes: fire, smoke)" \
        in body["error"]
    # a model trained on this config has its labels as classes: the values named the start checkpoint's classes
    trained = '<Label value="fire" predicted_values="flame"/><Label value="smoke" predicted_values="haze"/>'
    status, body = predict(client, config(rectangles(labels=trained)))
    assert status == 200 and [r["value"]["rectanglelabels"] for r in by_control(body)["label"]] == [["fire"]]


def test_a_skipped_control_gets_nothing_and_needs_no_from_name(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file)
    label_config = config(rectangles(model_score_threshold="0.05"),
                          rectangles("annotator", '<Label value="fire"/><Label value="person"/>', model_skip="true"))
    status, body = predict(client, label_config)
    assert status == 200, body
    assert set(by_control(body)) == {"label"} and len(by_control(body)["label"]) == 2


def test_two_served_rectangle_controls_each_get_their_labels(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file)
    label_config = config(rectangles("hazard", '<Label value="Fire"/>', model_score_threshold="0.05"),
                          rectangles("haze", '<Label value="smoke"/>', model_score_threshold="0.05"))
    status, body = predict(client, label_config)
    assert status == 200, body
    found = by_control(body)
    assert [r["value"]["rectanglelabels"] for r in found["hazard"]] == [["Fire"]]
    assert [r["value"]["rectanglelabels"] for r in found["haze"]] == [["smoke"]]
    ids = [r["id"] for r in body["results"][0]["result"]]
    assert len(set(ids)) == len(ids) == 2


def test_choices_get_the_top_class_or_the_none_choice(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file)
    status, body = predict(client, config(rectangles(), choices()))
    assert status == 200, body
    found = by_control(body)
    assert len(found["label"]) == 1
    [answer] = found["seen"]
    assert (answer["type"], answer["to_name"], answer["value"]) == ("choices", "image", {"choices": ["fire"]})
    assert answer["score"] == pytest.approx(0.9)
    # no box reaches the Choices' own threshold: "no fire", as sure as the best box is unsure
    status, body = predict(client, config(rectangles(), choices(model_score_threshold="0.95")))
    [answer] = by_control(body)["seen"]
    assert answer["value"] == {"choices": ["no fire"]} and answer["score"] == pytest.approx(0.1)
    assert len(by_control(body)["label"]) == 1  # the RectangleLabels keep the setting's threshold
    # without a none choice, nothing found is no answer
    no_none = choices(values=("fire", "smoke"), model_score_threshold="0.95")
    status, body = predict(client, config(rectangles(), no_none))
    assert status == 200 and "seen" not in by_control(body)


def test_multiple_choice_answers_every_class_found(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file)
    status, body = predict(client, config(rectangles(), choices(choice="multiple", model_score_threshold="0.05")))
    assert status == 200, body
    [answer] = by_control(body)["seen"]
    assert answer["value"] == {"choices": ["fire", "smoke"]} and answer["score"] == pytest.approx(0.1)


def test_choices_only_and_choices_that_are_not_about_the_model(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file)
    status, body = predict(client, config(choices()))  # no RectangleLabels: the image-level answer alone
    assert status == 200 and [r["type"] for r in body["results"][0]["result"]] == ["choices"]
    status, body = predict(client, config(rectangles(), choices("quality", ("good", "blurry"))))
    assert status == 200 and set(by_control(body)) == {"label"}
    status, body = predict(client, config(rectangles(), choices(values=("fire", "no fire", "unsure"))))
    assert status == 400
    assert "choices 'no fire', 'unsure' are not classes of the model" in body["error"]
    status, body = predict(client, config(rectangles(), choices(model_skip="true")))
    assert status == 200 and set(by_control(body)) == {"label"}


def test_validate_lists_the_served_controls(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file)
    body = client.post("/validate", json={"config": config(rectangles(), rectangles("x", model_skip="true"),
                                                             choices())}).json
    assert body["controls"] == ["label", "seen"] and body["labels"] == ["fire", "smoke"]


# --- training ------------------------------------------------------------------------------------------------------
def _box(label: str, from_name: str = "label") -> dict:
    return {"from_name": from_name, "to_name": "image", "type": "rectanglelabels", "original_width": 200,
            "original_height": 100, "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0,
                                              "rectanglelabels": [label]}}


def _choice(value: str, from_name: str = "seen") -> dict:
    return {"from_name": from_name, "to_name": "image", "type": "choices", "value": {"choices": [value]}}


def test_a_chosen_class_without_a_box_is_not_a_negative():
    class_choices = {"seen": ("fire", "smoke")}
    assert chosen_class_without_box({"result": [_choice("fire")]}, ("label",), class_choices)
    assert not chosen_class_without_box({"result": [_choice("no fire")]}, ("label",), class_choices)
    assert not chosen_class_without_box({"result": [_choice("fire"), _box("fire")]}, ("label",), class_choices)
    assert not chosen_class_without_box({"result": [_choice("fire", "other")]}, ("label",), class_choices)


class Captured(Exception):
    """Raised by the trainer below with what it was given: the run stops there."""


def capture(data, callback):
    raise Captured(data)


def test_training_reads_every_served_rectangle_control_and_the_choices(tmp_path, monkeypatch, start_checkpoint):
    from yolo_backend.jobs.training import train_project
    from yolo_backend.runtime import BackendContext
    from yolo_backend.settings import Settings

    def task(i: int, result: list[dict]) -> dict:
        return {"id": i, "data": {"image": f"/data/upload/1/img{i}.png"},
                "annotations": [{"id": i, "result": result, "was_cancelled": False}]}

    tasks = [task(1, [_box("fire"), _box("smoke", "haze")]),   # boxes from both served controls
             task(2, [_choice("no fire")]),                     # a negative
             task(3, [_choice("fire")]),                        # fire there, box unknown: left out
             task(4, [_box("person", "annotator")])]            # only a skipped control's box: a negative
    label_config = config(rectangles("label", '<Label value="fire"/>'), rectangles("haze", '<Label value="smoke"/>'),
                          rectangles("annotator", '<Label value="person"/>', model_skip="true"), choices())
    with FakeLabelStudio(tasks) as label_studio:
        label_studio.project["label_config"] = label_config
        settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), model_path=str(start_checkpoint),
                                     img_size=128, train_img_size=160, image_cache_dir=str(tmp_path / "cache"),
                                     label_studio_url=label_studio.url, label_studio_api_key=LEGACY,
                                     backend_url=FAKE_BACKEND_URL, min_annotations_first_training=1)
        context = BackendContext.from_settings(settings)
        with pytest.raises(Captured) as caught:
            train_project(context, 1, trainer=capture)
    data = caught.value.args[0]
    examples = {e.task_id: e for e in data.train + data.val}
    assert data.names == ["fire", "smoke"]
    assert sorted(examples) == [1, 2, 4]
    assert sorted(examples[1].classes.tolist()) == [0, 1]
    assert len(examples[2].boxes) == 0 and len(examples[4].boxes) == 0
