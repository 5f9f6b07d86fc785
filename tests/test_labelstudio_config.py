"""Label config parsing and class -> label mapping."""

import pytest

from yolo_backend.convert import ConversionError, target_from_config
from yolo_backend.labelstudio.config import (
    LabelConfigError,
    map_classes_to_labels,
    parse_label_config,
    parse_label_map,
)

ONE = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Fire" background="red"/><Label value="smoke"/>
  </RectangleLabels>
</View>"""

TWO = """<View>
  <Image name="img" value="$photo"/>
  <RectangleLabels name="hazard" toName="img"><Label value="fire"/></RectangleLabels>
  <RectangleLabels name="objects" toName="img"><Label value="car"/></RectangleLabels>
  <Choices name="quality" toName="img"><Choice value="good"/></Choices>
</View>"""

NO_RECT = """<View><Image name="image" value="$image"/>
  <Choices name="c" toName="image"><Choice value="fire"/></Choices></View>"""


def test_classic_parsed_shape():
    parsed = parse_label_config(ONE)
    assert parsed["label"]["type"] == "RectangleLabels"
    assert parsed["label"]["to_name"] == ["image"]
    assert parsed["label"]["inputs"] == [{"type": "Image", "valueType": None, "value": "image"}]
    assert parsed["label"]["labels"] == ["Fire", "smoke"]
    assert parse_label_config("") == {}


def test_single_control():
    target = target_from_config(ONE)
    assert (target.from_name, target.to_name, target.data_key, target.labels) == \
        ("label", "image", "image", ("Fire", "smoke"))


def test_several_controls_need_from_name():
    with pytest.raises(ConversionError) as err:
        target_from_config(TWO)
    assert "hazard" in str(err.value) and "objects" in str(err.value) and "FROM_NAME" in str(err.value)
    target = target_from_config(TWO, from_name="hazard")
    assert (target.from_name, target.to_name, target.data_key, target.labels) == ("hazard", "img", "photo", ("fire",))
    with pytest.raises(ConversionError, match="FROM_NAME='nope'.*candidates: hazard, objects"):
        target_from_config(TWO, from_name="nope")


def test_a_skipped_control_is_no_candidate():
    assert target_from_config(TWO.replace('name="objects"', 'name="objects" model_skip="true"')).from_name == "hazard"


def test_missing_rectangle_labels_says_what_to_add():
    with pytest.raises(ConversionError) as err:
        target_from_config(NO_RECT)
    message = str(err.value)
    assert "no <RectangleLabels>" in message and "c (Choices)" in message and "<RectangleLabels name=" in message


def test_malformed_xml():
    with pytest.raises(LabelConfigError, match="not valid XML"):
        parse_label_config("<View><Image name='x'")


def test_case_insensitive_mapping_and_skipped_classes():
    mapping = map_classes_to_labels(["fire", "smoke", "person"], ["Fire", "smoke"])
    assert mapping.labels == ("Fire", "smoke", None)
    assert mapping.skipped_classes == [2]
    assert mapping.label_of(0) == "Fire" and mapping.label_of(7) is None


def test_label_map_text_and_json():
    assert parse_label_map("fire=Flame, smoke = Smog") == {"fire": "Flame", "smoke": "Smog"}
    assert parse_label_map('{"fire": "Flame"}') == {"fire": "Flame"}
    assert parse_label_map(None) == {}
    mapping = map_classes_to_labels(["fire", "smoke"], ["Flame", "Smog"], parse_label_map("fire=Flame,smoke=Smog"))
    assert mapping.labels == ("Flame", "Smog")
    for bad in ("fire", "fire=", "{not json"):
        with pytest.raises(LabelConfigError, match="LABEL_MAP"):
            parse_label_map(bad)


def test_label_without_class_says_what_to_change():
    with pytest.raises(LabelConfigError) as err:
        map_classes_to_labels(["fire", "smoke"], ["Flame", "smoke"])
    message = str(err.value)
    assert "label 'Flame' in the config has no class in the checkpoint (classes: fire, smoke)" in message
    assert "class 'fire' has no label" in message and "LABEL_MAP=fire=Flame" in message


def test_a_label_the_model_has_not_learned_yet_is_allowed():
    # Active learning: a label added to the config before any model knows it. The known classes are predicted.
    mapping = map_classes_to_labels(["fire", "smoke"], ["Fire", "smoke", "person"])
    assert mapping.labels == ("Fire", "smoke") and mapping.unlearned_labels == ("person",)
    assert map_classes_to_labels(["fire"], ["fire"]).unlearned_labels == ()


def test_label_map_errors_name_the_problem():
    with pytest.raises(LabelConfigError, match="class 'dog'"):
        map_classes_to_labels(["fire"], ["Fire"], {"dog": "Fire"})
    with pytest.raises(LabelConfigError, match="'Flame', which is not a label"):
        map_classes_to_labels(["fire"], ["Fire"], {"fire": "Flame"})


def test_parsed_label_config_has_the_classic_shape():
    from yolo_backend.labelstudio.config import parse_label_config

    parsed = parse_label_config("""<View>
      <Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image,image2">
        <Label value="fire" background="red"/><Label value="smoke" alias="Smoke"/>
      </RectangleLabels>
      <Image name="image2" value="$other"/>
      <View><Text name="t" value="$text"/><TextArea name="ta" toName="t"/></View>
    </View>""")
    assert set(parsed) == {"label", "ta"}
    assert parsed["label"] == {
        "type": "RectangleLabels", "to_name": ["image", "image2"],
        "inputs": [{"type": "Image", "valueType": None, "value": "image"},
                   {"type": "Image", "valueType": None, "value": "other"}],
        "labels": ["fire", "Smoke"],
        "labels_attrs": {"fire": {"value": "fire", "background": "red"},
                         "Smoke": {"value": "smoke", "alias": "Smoke"}},
        "attrs": {"name": "label", "toName": "image,image2"}}
    assert parsed["ta"]["inputs"] == [{"type": "Text", "valueType": None, "value": "text"}]
    assert parsed["ta"]["labels"] == []
    assert parse_label_config("") == {} and parse_label_config(None) == {}
