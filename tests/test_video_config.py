"""Label Studio's video object tracking config: the VideoRectangle control, its labels, frame rate and mapping."""

from pathlib import Path

import pytest

from tests.support import FAKE_BACKEND_URL  # noqa: F401 (support sets up the test settings)
from tests.test_server import make_client, model_file  # noqa: F401 (model_file: a fixture)
from yolo_backend.labelstudio.config import LabelConfigError, parse_label_config
from yolo_backend.labelstudio.controls import read_controls
from yolo_backend.labelstudio.video_controls import (
    check_video_attributes, is_video_config, read_video_control,
)

# Label Studio 1.23.2's own template (annotation_templates/videos/video-object-tracking), with fire classes.
TEMPLATE = """<View>
   <Labels name="videoLabels" toName="video" allowEmpty="true">
     <Label value="fire" background="red"/>
     <Label value="smoke" background="gray"/>
   </Labels>
   <Video name="video" value="$video" framerate="25.0"/>
   <VideoRectangle name="box" toName="video" />
</View>"""

IMAGE = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="fire"/><Label value="smoke"/></RectangleLabels></View>"""


def video(labels='<Label value="fire"/><Label value="smoke"/>', rect_attrs="", video_attrs=""):
    return (f'<View><Video name="clip" value="$movie" {video_attrs}/>'
            f'<Labels name="lab" toName="clip">{labels}</Labels>'
            f'<VideoRectangle name="track" toName="clip" {rect_attrs}/></View>')


def test_label_studios_template_is_a_video_config():
    parsed = parse_label_config(TEMPLATE)
    assert is_video_config(parsed) and not is_video_config(parse_label_config(IMAGE))
    control = read_video_control(parsed)
    assert (control.name, control.to_name, control.data_key) == ("box", "video", "video")
    assert control.labels == ("fire", "smoke") and control.labels_controls == ("videoLabels",)
    assert control.frame_rate() == 25.0


def test_the_label_studio_installed_here_ships_that_template():
    """The template above is Label Studio's own (read from the 1.23 install the e2e tests use, when it is here)."""
    found = list(Path.home().glob(".cache/yolo-backend-tests/label-studio-1.23/lib/python3*/site-packages/"
                                  "label_studio/annotation_templates/videos/video-object-tracking/config.yml"))
    if not found:
        pytest.skip("no Label Studio 1.23 install cached here")
    text = found[0].read_text()
    for tag in ('<Labels name="videoLabels" toName="video"', '<Video name="video" value="$video" framerate="25.0"/>',
                '<VideoRectangle name="box" toName="video" />'):
        assert tag in text


@pytest.mark.parametrize("attrs, data, fps", [
    ("", None, 24.0),                              # the Video tag's default
    ('frameRate="29.97"', None, 29.97),
    ('framerate="0.5"', None, 2.0),                # below 1: the editor takes the inverse
    ('frameRate="fast"', None, 24.0),
    ('frameRate="-5"', None, 24.0),
    ('frameRate="$fps"', {"fps": 12.5}, 12.5),     # from the task data
    ('frameRate="$fps"', {}, 24.0),
])
def test_frame_rate_is_read_as_the_editor_reads_it(attrs, data, fps):
    assert read_video_control(parse_label_config(video(video_attrs=attrs))).frame_rate(data) == pytest.approx(fps)


def test_classes_map_to_labels_with_the_image_rules():
    control = read_video_control(parse_label_config(video(labels='<Label value="Flame" predicted_values="fire"/>'
                                                                 '<Label value="Smoke"/>')))
    mapping = control.mapping(["fire", "smoke", "person"])
    assert mapping.labels == ("Flame", "Smoke", None)
    with pytest.raises(LabelConfigError, match="predicted_values naming 'fire', which the model does not have"):
        control.mapping(["a", "b"])
    plain = read_video_control(parse_label_config(video(labels='<Label value="Flame"/><Label value="Smoke"/>')))
    assert plain.mapping(["a", "b"], {"a": "Flame", "b": "Smoke"}).labels == ("Flame", "Smoke")
    with pytest.raises(LabelConfigError, match="LABEL_MAP maps 'a' to 'Fire'"):
        plain.mapping(["a"], {"a": "Fire"})
    misspelt = read_video_control(parse_label_config(video(labels='<Label value="Flames"/><Label value="smoke"/>')))
    with pytest.raises(LabelConfigError, match="label 'Flames' in the config has no class"):
        misspelt.mapping(["fire", "smoke"])


def test_labels_from_every_labels_control_on_the_video_once():
    config = ('<View><Video name="v" value="$video"/><Labels name="a" toName="v"><Label value="fire"/></Labels>'
              '<Labels name="b" toName="v"><Label value="Fire"/><Label value="smoke"/></Labels>'
              '<Labels name="other" toName="w"><Label value="car"/></Labels><Video name="w" value="$w"/>'
              '<VideoRectangle name="box" toName="v"/></View>')
    control = read_video_control(parse_label_config(config))
    assert control.labels == ("fire", "smoke") and control.labels_controls == ("a", "b")


@pytest.mark.parametrize("config, from_name, says", [
    (video(labels=""), None, "has no <Labels> control with labels"),
    ('<View><Video name="v" value="$v"/><Labels name="l" toName="v"><Label value="fire"/></Labels></View>', None,
     "no <VideoRectangle> control"),
    (video(rect_attrs='model_skip="true"'), None, "model_skip: track"),
    (video(), "nope", "FROM_NAME='nope' names no VideoRectangle"),
    (video(rect_attrs='model_skip="true"'), "track", "model_skip=\"true\": remove one"),
    (video().replace("</View>", '<VideoRectangle name="second" toName="clip"/></View>'), None,
     "several VideoRectangle controls"),
    (video(rect_attrs='model_score_threshold="2"'), None, "is not a number from 0 to 1"),
    (video(rect_attrs='model_skip="maybe"'), None, "is not true or false"),
])
def test_config_errors_say_what_to_change(config, from_name, says):
    with pytest.raises(LabelConfigError, match=says):
        read_video_control(parse_label_config(config), from_name)


def test_from_name_picks_one_of_several_and_thresholds_are_read():
    config = video(rect_attrs='model_score_threshold="0.6"').replace(
        "</View>", '<VideoRectangle name="second" toName="clip"/></View>')
    control = read_video_control(parse_label_config(config), "track")
    assert control.name == "track" and control.threshold_or(0.25) == 0.6


def test_setup_checks_video_attributes():
    check_video_attributes(parse_label_config(TEMPLATE))
    with pytest.raises(LabelConfigError, match="predicted_values is empty"):
        check_video_attributes(parse_label_config(video(labels='<Label value="fire" predicted_values=""/>')))


def test_image_controls_say_a_video_config_is_not_an_image_one():
    with pytest.raises(LabelConfigError, match="video object tracking config"):
        read_controls(parse_label_config(TEMPLATE))


def test_image_and_video_projects_validate_on_one_backend(tmp_path, model_file):  # noqa: F811
    client, _, _ = make_client(tmp_path, model_file)
    answer = client.post("/validate", json={"config": TEMPLATE})
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["media"] == "video" and answer.get_json()["from_name"] == "box"
    assert answer.get_json()["labels"] == ["fire", "smoke"]
    image = client.post("/validate", json={"config": IMAGE})
    assert image.status_code == 200 and image.get_json()["from_name"] == "label"
    # Connect Model on a video project connects (the config is read and checked).
    assert client.post("/setup", json={"project": "1.1", "schema": TEMPLATE}).status_code == 200
    bad = client.post("/setup", json={"project": "2.1", "schema": video(rect_attrs='model_skip="maybe"')})
    assert bad.status_code == 400 and "model_skip" in bad.get_json()["error"]


def test_predict_for_a_video_project_is_served(tmp_path, model_file, caplog):  # noqa: F811
    """The video path answers (tests/test_video_predict.py has the rest): a task whose video cannot be had (no
    LABEL_STUDIO_URL for an upload) gets no prediction and a log line."""
    client, _, _ = make_client(tmp_path, model_file)
    answer = client.post("/predict", json={"tasks": [{"id": 1, "data": {"video": "/data/upload/1/a.mp4"}}],
                                           "label_config": TEMPLATE, "project": "1.1"})
    assert answer.status_code == 200, answer.get_json()
    assert "result" not in answer.get_json()["results"][0]
    assert "task 1: video not available" in caplog.text
