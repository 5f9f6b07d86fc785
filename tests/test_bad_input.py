"""Any JSON sent to any endpoint gets an answer that is not a 500: bad input is a 4xx saying what to fix.

Property-based (hypothesis) over every endpoint's body, with the field names each endpoint reads filled with
arbitrary JSON, plus the cases a tester found by hand. The server runs with a fake detector (no torch) and a real
training queue on a real Redis-protocol server (valkey), with no worker: jobs are queued, never run.
"""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.test_server import CONFIG, make_client, png_uri
from yolo_backend.jobs.queue import TrainingQueue
from yolo_backend.jobs.redis_server import RedisServer
from yolo_backend.settings import Settings

# Field names each endpoint reads (and a few more anyone could send).
FIELDS = ["project", "schema", "label_config", "hostname", "access_token", "extra_params", "tasks", "params",
          "action", "annotations", "job", "job_id", "config", "annotation", "task", "model_version", "data", "id"]
ENDPOINTS = ["/setup", "/predict", "/webhook", "/train", "/versions", "/is_training", "/job_status", "/validate",
             "/score_pool"]

# Values an endpoint acts on, so that generated bodies reach past the first check.
MEANINGFUL = ["START_TRAINING", "1.1795461834", "3", "train-3-1a2b3c4d5e6f", "1.5", "http://127.0.0.1:1",
              "/data/upload/1/a.png", "s3://bucket/a.png", CONFIG, png_uri(8, 8), "<View/>"]
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False)
           | st.text(max_size=30) | st.sampled_from(MEANINGFUL) | st.integers(1, 5))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6) | json_values


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    model = tmp / "best.pt"
    model.write_text("weights-A")
    with RedisServer(tmp / "valkey") as redis:
        settings = Settings.from_env(env={}, model_dir=str(tmp / "models"), redis_url=redis.url)
        queue = TrainingQueue(settings, retry_interval=3600)
        client, _, _ = make_client(tmp, model, training=queue, redis_url=redis.url)
        yield client
        queue.close()


def _check(reply, what: str) -> None:
    assert reply.status_code != 500, f"{what} -> 500: {reply.get_data(as_text=True)[:300]}"
    if reply.status_code >= 400:
        body = reply.get_json(silent=True)
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], \
            f"{what} -> {reply.status_code} without a message: {reply.get_data(as_text=True)[:300]}"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=bodies)
def test_any_json_body_is_answered_without_a_500(client, endpoint, body, caplog):
    caplog.set_level(logging.CRITICAL)  # thousands of 400 log lines are expected here
    reply = client.post(endpoint, data=json.dumps(body), content_type="application/json")
    _check(reply, f"POST {endpoint} {json.dumps(body)[:200]}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(st.sampled_from(["job", "project", "job_id"]), st.text(max_size=20), max_size=3))
def test_any_query_string_is_answered_without_a_500(client, query, caplog):
    caplog.set_level(logging.CRITICAL)
    for endpoint in ("/job_status", "/is_training", "/versions", "/status"):
        _check(client.get(endpoint, query_string=query), f"GET {endpoint} {query}")


@pytest.mark.parametrize("endpoint, body, says", [
    ("/predict", {"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": CONFIG, "params": {"tasks": 1}},
     None),
    ("/predict", {"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": CONFIG,
                  "params": {"self": 1, "1x": 2, "context": None}}, None),
    ("/setup", {"project": "1.1", "schema": CONFIG, "extra_params": {"self": 1, "context": 2, "project_id": 3}},
     None),
    ("/job_status", {"job": "1.5"}, "not a job id"),
    ("/job_status", {"job": "a:b"}, "not a job id"),
    ("/setup", {"project": "1.1", "schema": "<View><Image name='i' value='$i'/>" + "x" * 600_000 + "</View>"},
     "at most"),
    ("/setup", {"project": "1.1", "schema": "<!DOCTYPE x [<!ENTITY a 'b'>]><View/>"}, "DOCTYPE"),
    ("/setup", {"project": "1.1", "schema": "<View><not closed"}, "not valid XML"),
])
def test_cases_found_by_hand(client, endpoint, body, says):
    reply = client.post(endpoint, json=body)
    _check(reply, endpoint)
    if says:
        assert reply.status_code == 400 and says in reply.json["error"], reply.json


def test_a_setup_schema_that_does_not_parse_is_not_kept(tmp_path):
    model = tmp_path / "best.pt"
    model.write_text("weights-A")
    client, context, _ = make_client(tmp_path, model)
    for junk in ("<View><not closed", "x" * 600_000, "<!DOCTYPE x><View/>"):
        assert client.post("/setup", json={"project": "7.1", "schema": junk}).status_code == 400
    assert 7 not in context.label_configs
    assert client.post("/setup", json={"project": "7.1", "schema": CONFIG}).status_code == 200
    assert context.label_configs[7] == CONFIG


def test_too_many_labels_is_a_clear_error(client):
    labels = "".join(f'<Label value="c{i}"/>' for i in range(1001))
    config = f'<View><Image name="image" value="$image"/><RectangleLabels name="l" toName="image">{labels}' \
             "</RectangleLabels></View>"
    reply = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": png_uri(8, 8)}}],
                                          "label_config": config})
    assert reply.status_code == 400 and "at most 1000" in reply.json["error"]


def test_every_answer_carries_the_security_headers(client):
    replies = [client.get("/health"), client.get("/"), client.get("/nowhere"), client.post("/predict", data="x"),
               client.get("/status"), client.post("/setup", json={"schema": CONFIG})]
    for reply in replies:
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["Referrer-Policy"] == "no-referrer"
