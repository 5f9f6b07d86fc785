"""The dashboard (HTML page, /status JSON, per-version metrics in /versions), the SVG charts, Prometheus metrics
and the training run history, through Flask's test client with a fake detector and fake training hooks (no torch,
no Redis). The real browser test is tests/e2e/test_dashboard_browser.py."""

from __future__ import annotations

import base64
import json
import logging
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_backend import YOLOv7Backend
from yolo_backend.jobs import history
from yolo_backend.registry import Registry
from yolo_backend.server import charts
from yolo_backend.server.app import create_app
from yolo_backend.runtime import BackendContext
from yolo_backend.server.status import job_progress, pool_state_text
from yolo_backend.settings import Settings
from yolo_backend.yolov7.detections import Detections
from tests.support import FAKE_BACKEND_URL, FIRE_SMOKE_CONFIG as CONFIG

REPO = Path(__file__).resolve().parents[1]
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
SVG = "{http://www.w3.org/2000/svg}"
PROJECT = 3


def metrics(map50: float, precision: float = 0.7, recall: float = 0.5, images: int = 12, boxes: int = 14) -> dict:
    """What the engine's evaluate() returns on ``images`` validation images: smoke has no validation boxes, so
    its numbers are NaN."""
    nan = float("nan")
    return {"map50": map50, "map": map50 / 2, "precision": precision, "recall": recall, "serve_conf": 0.25,
            "images": images, "instances": boxes,
            "per_class": [{"name": "fire", "instances": boxes, "ap50": map50 + 0.01, "ap": map50 / 2,
                           "precision": precision, "recall": recall},
                          {"name": "smoke", "instances": 0, "ap50": nan, "ap": nan, "precision": nan, "recall": nan}]}


class Training:
    """Training hooks as the queue provides them: one job of the project at epoch 2 of 5, iteration 3 of 10."""

    def __init__(self):
        self.job = {"job": "train-3-abc", "status": "started", "phase": "training",
                    "progress": {"epoch": 2, "epochs": 5, "iteration": 4, "iterations": 10, "loss": 0.1234,
                                 "elapsed": 42.0},
                    "log_tail": ["[2026-12-01 10:00:00] [INFO] [x] reading annotations",
                                 "[2026-12-01 10:00:01] [WARNING] [x] task 7: image not available"]}

    def request(self, project_id, event, payload):
        return {"job": self.job["job"]}

    def status(self, project_id):
        return {"is_training": project_id == PROJECT, "job": self.job["job"] if project_id == PROJECT else None,
                "pending_requests": 0}

    def job_status(self, job_id):
        return dict(self.job)

    def metrics(self):
        return {"redis": "up", "workers": 1, "queued": 1, "started": 1, "finished": 4, "failed": 2,
                "pending_requests": 0, "coalesced": 3, "queue": "default"}


def empty_detector_loader(path, settings):
    class Detector:
        def detect(self, images, conf=None):
            return [Detections.empty(im.shape[1], im.shape[0], ["fire", "smoke"]) for im in images]

    return Detector(), ["fire", "smoke"]


def make_app(tmp_path, training=None, **overrides):
    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), image_cache_dir=str(tmp_path / "cache"),
                                 **overrides)
    context = BackendContext.from_settings(settings, loader=empty_detector_loader, training=training)
    context.models.check_interval = 0.0
    return create_app(YOLOv7Backend, context=context).test_client(), settings


@pytest.fixture
def trained(tmp_path):
    """Project 3 with a published v1 (20 images), a rejected run (30 images) and a published v2 (40 images)."""
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    model_dir = tmp_path / "models"
    registry = Registry.for_project(model_dir, PROJECT)
    v1 = registry.publish(checkpoint, {"parent": "best-1234abcd", "metrics": metrics(0.30),
                                       "decision": "no current model with these labels to compare with",
                                       "annotations": 20, "negatives": 3, "train_images": 8, "val_images": 12,
                                       "train_seconds": 65.0}, name="v1-20261201T100000")
    history.record_run(model_dir, PROJECT, {"trained": True, "published": True, "model_version": v1.name,
                                            "examples": 20, "negatives": 3, "metrics": metrics(0.30)}, "job-1", 70.0)
    history.record_run(model_dir, PROJECT, {
        "trained": True, "published": False, "examples": 30, "negatives": 5, "parent": v1.name,
        "train_images": 18, "val_images": 12, "metrics": metrics(0.25), "baseline_metrics": metrics(0.30),
        "decision": "validation fitness 0.1237 < current 0.1480 (set FORCE_PUBLISH=true to publish anyway)"},
        "job-2", 81.0)
    v2 = registry.publish(checkpoint, {"parent": v1.name, "metrics": metrics(0.45, 0.8, 0.6), "decision": "better",
                                       "annotations": 40, "negatives": 6, "train_images": 28, "val_images": 12,
                                       "train_seconds": 90.0}, name="v2-20261201T110000")
    history.record_run(model_dir, PROJECT, {"trained": True, "published": True, "model_version": v2.name,
                                            "examples": 40, "negatives": 6, "metrics": metrics(0.45)}, "job-3", 95.0)
    return tmp_path


def strict_json(text: str):
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are errors."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------------------------------------------
# GET /: HTML for browsers, health JSON for everyone else
# --------------------------------------------------------------------------------------------------------------

def test_root_keeps_the_health_json_for_non_browsers_and_health_is_unchanged(tmp_path):
    client, _ = make_app(tmp_path)
    health = {"status": "UP", "model_class": "YOLOv7Backend"}
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"},
                    {"Accept": "application/json, text/html;q=0.5"}):
        response = client.get("/", headers=headers)
        assert response.status_code == 200 and response.json.items() >= health.items(), headers
    for headers in ({}, {"Accept": BROWSER_ACCEPT}):
        response = client.get("/health", headers=headers)
        assert response.mimetype == "application/json" and response.json.items() >= health.items()


def test_root_serves_the_dashboard_to_a_browser(trained):
    client, _ = make_app(trained, training=Training())
    response = client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "<h1>YOLOv7 backend · dashboard</h1>" in page
    assert client.get("/dashboard").get_data(as_text=True).startswith("<!doctype html>")


def test_page_shows_versions_runs_metrics_and_the_job(trained):
    client, _ = make_app(trained, training=Training())
    page = client.get("/dashboard").get_data(as_text=True)
    assert f"Project {PROJECT} — serving <span id=\"serving-{PROJECT}\">v2-20261201T110000</span>" in page
    rows = re.findall(r'<tr class="[^"]*">\s*<td class="name">(.*?)</td>\s*<td class="why">(.*?)</td>', page, re.S)
    names = [name.split("<")[0].strip() for name, _ in rows]
    assert names == ["v2-20261201T110000", "(not published)", "v1-20261201T100000"]  # newest first
    assert "rejected</span>: validation fitness 0.1237 &lt; current 0.1480" in rows[1][1]
    assert 'serving</span>' in rows[0][0] and "serving</span>" not in rows[2][0]
    # images with positives / negatives, train / val split, train time, overall and per-class metrics
    assert "40 (34 / 6)" in page and "30 (25 / 5)" in page and "28 / 12" in page and "1 min 30 s" in page
    assert ">0.450<" in page and ">0.225<" in page and ">0.800<" in page and ">0.600<" in page
    assert "<b>fire</b> mAP@0.5 0.460 · mAP@0.5:0.95 0.225 · P 0.80 · R 0.60 (14 boxes)" in page
    assert "per class (on 12 validation images): " in page and "on 12 images</span>" in page  # what it rests on
    assert "<b>smoke</b> no boxes among the validation images" in page
    assert "P@0.25</th><th>R@0.25</th>" in page
    # the job: phase, epoch of total, loss, progress (epoch 1 done + 5/10 of epoch 2 = 1.5 of 5 = 30 %), ETA
    job = page[page.index('<div class="card job"'):page.index('<div class="charts">')]
    assert "train-3-abc" in job and ">training<" in job and ">2 of 5<" in job and ">0.1234<" in job
    assert 'aria-valuenow="30"' in job and 'style="width: 30%"' in job and ">30 %<" in job
    assert "about 1 min 38 s" in job  # 42 s for 30 % -> 98 s more
    assert "image not available" in page  # the job's warning
    # the queue
    assert 'id="q-queued">1<' in page and 'id="q-failed">2<' in page and 'id="q-coalesced">3<' in page


def test_page_draws_the_learning_curve_and_per_class_chart(trained):
    client, _ = make_app(trained, training=Training())
    page = client.get("/dashboard").get_data(as_text=True)
    svgs = re.findall(r"<svg .*?</svg>", page, re.S)
    assert len(svgs) == 2
    curve = ET.fromstring(svgs[0])
    points = curve.findall(f"{SVG}circle")
    assert len(points) == 6  # 3 runs x (mAP@0.5, mAP@0.5:0.95)
    hollow = [p for p in points if p.get("fill") == "#fff"]
    assert len(hollow) == 2 and all("rejected" in p.find(f"{SVG}title").text for p in hollow)
    # mAP@0.5 of the runs with 20, 30, 40 images: 0.30, 0.25, 0.45 -> left to right; higher mAP is higher up
    firsts = sorted(points[:3], key=lambda p: float(p.get("cx")))
    cy = [float(p.get("cy")) for p in firsts]
    assert cy[2] < cy[0] < cy[1]
    assert len(curve.findall(f"{SVG}polyline")) == 2  # published points joined, per series
    bars = ET.fromstring(svgs[1]).findall(f"{SVG}rect[@class='bar']")
    assert [b.find(f"{SVG}title").text for b in bars] == ["fire mAP@0.5: 0.460", "fire mAP@0.5:0.95: 0.225"]


def test_page_is_self_contained_and_its_script_is_the_only_one_allowed(trained):
    client, _ = make_app(trained, training=Training())
    response = client.get("/dashboard")
    page = response.get_data(as_text=True)
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must load nothing from the network"
    assert '<link rel="icon" href="data:,">' in page  # no /favicon.ico request (a 404 in the console)
    policy = response.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy).group(1)
    scripts = re.findall(r"<script([^>]*)>", page)
    assert scripts == [f' nonce="{nonce}"'] and "default-src 'none'" in policy
    assert client.get("/dashboard").headers["Content-Security-Policy"] != policy  # a fresh nonce each time


def test_page_without_projects_or_queue_says_what_to_do(tmp_path):
    client, _ = make_app(tmp_path)
    page = client.get("/dashboard").get_data(as_text=True)
    assert "No project yet" in page and "has no training queue" in page


# --------------------------------------------------------------------------------------------------------------
# the same numbers as JSON
# --------------------------------------------------------------------------------------------------------------

def test_status_json_has_every_number_of_the_page(trained):
    client, _ = make_app(trained, training=Training())
    response = client.get("/status", query_string={"project": PROJECT})
    body = strict_json(response.get_data(as_text=True))  # NaN of the class without boxes became null
    (project,) = body["projects"]
    assert project["serving_version"] == "v2-20261201T110000"
    statuses = [(v["name"], v["status"]) for v in project["versions"]]
    assert statuses == [("v2-20261201T110000", "published"), (None, "rejected"), ("v1-20261201T100000", "published")]
    newest = project["versions"][0]
    assert newest["serving"] and newest["images"] == 40 and newest["positives"] == 34 and newest["negatives"] == 6
    assert newest["train_seconds"] == 90.0 and newest["job_seconds"] == 95.0
    assert newest["parent"] == "v1-20261201T100000"
    assert newest["metrics"]["map50"] == 0.45 and newest["metrics"]["precision"] == 0.8
    assert newest["metrics"]["per_class"][1] == {"name": "smoke", "instances": 0, "map50": None, "map": None,
                                                 "precision": None, "recall": None, "too_few": False, "note": None}
    assert (newest["metrics"]["val_images"], newest["metrics"]["too_few"], newest["metrics"]["note"]) == \
        (12, False, "on 12 validation images")
    assert project["versions"][1]["reason"].startswith("validation fitness 0.1237 < current")
    assert [(p["images"], p["map50"], p["status"]) for p in project["learning_curve"]] == \
        [(20, 0.30, "published"), (30, 0.25, "rejected"), (40, 0.45, "published")]
    job = project["job"]
    assert (job["phase"], job["epoch"], job["epochs"], job["loss"]) == ("training", 2, 5, 0.1234)
    assert job["fraction"] == pytest.approx(0.3) and job["eta_seconds"] == pytest.approx(98.0)
    assert project["job_warnings"] == ["[2026-12-01 10:00:01] [WARNING] [x] task 7: image not available"]
    assert body["queue"]["failed"] == 2 and body["queue"]["coalesced"] == 3
    assert client.get("/status").json["projects"][0]["project"] == PROJECT  # all projects without ?project
    for bad in ("x", "\u00b9", "9" * 5000, "0"):  # digits int() refuses, more than int() reads, not an id
        reply = client.get("/status", query_string={"project": bad})
        assert reply.status_code == 400 and "is not a project id" in reply.get_data(as_text=True), bad


def test_versions_keeps_its_fields_and_adds_per_version_metrics(trained):
    client, _ = make_app(trained)
    body = client.get("/versions", query_string={"project": PROJECT}).json
    assert body["versions"] == ["v2-20261201T110000", "v1-20261201T100000"] or \
        body["versions"] == ["v1-20261201T100000", "v2-20261201T110000"]
    assert body["model_version"] == "v2-20261201T110000"
    assert [d["name"] for d in body["details"]] == body["versions"]
    by_name = {d["name"]: d for d in body["details"]}
    assert by_name["v1-20261201T100000"]["metrics"]["map"] == pytest.approx(0.15)
    assert by_name["v2-20261201T110000"]["images"] == 40


def test_warnings_of_the_server_are_listed(trained):
    client, _ = make_app(trained, training=Training())
    logging.getLogger("model_backend").warning("task 99: image refused by Label Studio (HTTP 403)")
    assert any("task 99: image refused" in w["message"] for w in client.get("/status").json["warnings"])
    assert "task 99: image refused by Label Studio (HTTP 403)" in client.get("/dashboard").get_data(as_text=True)


def test_job_progress_for_each_phase():
    assert job_progress(None) is None
    downloading = job_progress({"phase": "downloading", "status": "started", "progress": {"images": 3, "total": 12}})
    assert downloading["fraction"] == 0.25 and downloading["eta_seconds"] is None
    first = job_progress({"phase": "training", "progress": {"epoch": 1, "epochs": 4, "iteration": 1,
                                                            "iterations": 4, "elapsed": 10.0}})
    assert first["fraction"] == pytest.approx(0.125) and first["eta_seconds"] == pytest.approx(70.0)
    # 30 epochs planned but a 300 s budget: after 60 s of the first epoch, 20 % done and at most 240 s left
    budgeted = job_progress({"phase": "training", "progress": {"epoch": 1, "epochs": 30, "iteration": 2,
                                                               "iterations": 10, "elapsed": 60.0}}, time_budget=300)
    assert budgeted["fraction"] == pytest.approx(0.2) and budgeted["eta_seconds"] == pytest.approx(240.0)
    assert job_progress({"phase": "training", "progress": {"epoch": 20, "epochs": 30, "elapsed": 60.0}},
                        time_budget=300)["eta_seconds"] == pytest.approx(60 * 11 / 19, abs=0.1)  # epochs: less left
    evaluating = job_progress({"phase": "evaluating", "progress": {"epoch": 2, "epochs": 4}})
    assert evaluating["fraction"] == 0.5
    assert job_progress({"phase": "publishing", "progress": {}})["fraction"] == 1.0
    assert job_progress({"phase": "done", "status": "finished", "progress": {}})["fraction"] == 1.0
    published = job_progress({"phase": "done", "status": "finished",
                              "result": {"published": True, "model_version": "v4-x"}})
    assert published["message"] == "published v4-x" and published["result_version"] == "v4-x"
    rejected = job_progress({"phase": "done", "status": "finished",
                             "result": {"published": False, "model_version": "v3-x", "decision": "worse"}})
    assert rejected["message"] == "not published: worse" and rejected["result_version"] is None
    assert job_progress({"phase": "reading annotations", "status": "started"})["fraction"] is None
    # the epoch total as the job estimates it (jobs.training.TrainingProgress): "at most" before an epoch is timed
    assert first["epochs_text"] == "1 of 4" and downloading["epochs_text"] is None
    assert job_progress({"phase": "training", "progress": {"epoch": 1, "epochs": 30, "epochs_note": "at most"}}
                        )["epochs_text"] == "1 of at most 30"
    assert job_progress({"phase": "training", "progress": {"epoch": 3, "epochs": 14, "epochs_note": "about"}}
                        )["epochs_text"] == "3 of about 14"
    waited = job_progress({"phase": "done", "status": "finished", "result": {
        "published": False, "waiting": True, "reason": "waiting for 7 more annotations: ..."}})
    assert waited["message"] == "waiting for 7 more annotations: ..."


# --------------------------------------------------------------------------------------------------------------
# auth
# --------------------------------------------------------------------------------------------------------------

def test_dashboard_json_and_metrics_are_behind_basic_auth(trained):
    client, _ = make_app(trained, training=Training(), basic_auth_user="ls", basic_auth_pass="secret")
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
    for path in ("/", "/dashboard", "/status", "/prometheus", "/versions"):
        for headers in ({"Accept": BROWSER_ACCEPT}, {"Accept": BROWSER_ACCEPT, **bad}):
            response = client.get(path, headers=headers)
            assert response.status_code == 401 and "Basic" in response.headers["WWW-Authenticate"], path
            assert "v2-2026" not in response.get_data(as_text=True)
        assert client.get(path, headers={"Accept": BROWSER_ACCEPT, **good}).status_code == 200, path
    assert client.get("/health").status_code == 200  # container health checks need no password
    assert client.get("/", headers={"Accept": BROWSER_ACCEPT, **good}).mimetype == "text/html"


# --------------------------------------------------------------------------------------------------------------
# the SVG charts
# --------------------------------------------------------------------------------------------------------------

def test_line_chart_is_valid_svg_with_scaled_points_and_escaped_text():
    svg = charts.line_chart([charts.Series("a <b>", [charts.Point(10, 0.2, True, "x<1"),
                                                     charts.Point(40, 0.6, False, "y & z")])],
                            title="t <script>alert(1)</script>", x_label="images", y_label="mAP")
    root = ET.fromstring(svg)  # well-formed: text escaped
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    first, second = root.findall(f"{SVG}circle")
    assert float(second.get("cx")) > float(first.get("cx")) and float(second.get("cy")) < float(first.get("cy"))
    assert first.get("fill") != "#fff" and second.get("fill") == "#fff"
    assert [t.text for t in root.iter(f"{SVG}title")] == ["x<1", "y & z"]
    assert root.get("viewBox") == "0 0 640 320" and root.get("role") == "img"


def test_line_chart_axis_ends_and_empty_state():
    assert [charts.nice_ceiling(v) for v in (0.37, 0.5, 0.51, 7, 42, 120)] == [0.5, 0.5, 1.0, 10, 50, 200]
    tiny = charts.line_chart([charts.Series("m", [charts.Point(17, 0.019)])], "c", "x", "y", y_min_top=0.1)
    labels = [t.text for t in ET.fromstring(tiny).iter(f"{SVG}text") if t.get("text-anchor") == "end"]
    assert labels == ["0", "0.02", "0.04", "0.06", "0.08", "0.1"]  # y ticks: distinct, and not zoomed in on 0.019
    zoomed = charts.line_chart([charts.Series("m", [charts.Point(17, 0.019)])], "c", "x", "y")
    labels = [t.text for t in ET.fromstring(zoomed).iter(f"{SVG}text") if t.get("text-anchor") == "end"]
    assert labels == ["0", "0.005", "0.01", "0.015", "0.02", "0.025"]
    svg = charts.line_chart([], "curve", "x", "y", empty_message="nothing yet")
    root = ET.fromstring(svg)
    assert root.findall(f"{SVG}circle") == [] and "nothing yet" in svg


def test_bar_chart_lengths_follow_the_values():
    svg = charts.bar_chart(["fire", "smoke"], [("mAP", [0.8, 0.2]), ("mAP2", [0.4, None])], "per class")
    bars = ET.fromstring(svg).findall(f"{SVG}rect[@class='bar']")
    widths = [float(b.get("width")) for b in bars]
    assert len(widths) == 3 and widths[0] == pytest.approx(2 * widths[1]) and widths[0] == pytest.approx(4 * widths[2])


# --------------------------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------------------------

def scrape(client) -> dict:
    response = client.get("/prometheus")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def png_uri(width: int, height: int) -> str:
    ok, data = cv2.imencode(".png", np.full((height, width, 3), 80, np.uint8))
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode()


def test_prometheus_counts_predictions_failures_and_latency(trained):
    client, _ = make_app(trained, training=Training())
    before = scrape(client)
    assert before[("yolo_backend_predict_tasks_total", (("outcome", "predicted"),))] == 0
    tasks = [{"id": 1, "data": {"image": png_uri(64, 48)}}, {"id": 2, "data": {"image": png_uri(32, 32)}},
             {"id": 3, "data": {"image": "/data/upload/1/nowhere.png"}}]  # no Label Studio URL: cannot be read
    response = client.post("/predict", json={"tasks": tasks, "project": f"{PROJECT}.1795461834",
                                             "label_config": CONFIG})
    assert response.status_code == 200, response.json
    bad = client.post("/predict", json={"tasks": [{"id": 4, "data": {}}, {"id": 5, "data": {}}],
                                        "project": PROJECT})  # no label config: 400
    assert bad.status_code == 400
    after = scrape(client)
    assert after[("yolo_backend_predict_tasks_total", (("outcome", "predicted"),))] == 3
    assert after[("yolo_backend_predict_tasks_total", (("outcome", "failed"),))] == 2
    assert after[("yolo_backend_predict_images_total", (("outcome", "predicted"),))] == 2
    assert after[("yolo_backend_predict_images_total", (("outcome", "failed"),))] == 1
    assert after[("yolo_backend_predict_seconds_count", ())] == 2
    assert after[("yolo_backend_predict_seconds_bucket", (("le", "+Inf"),))] == 2


def test_prometheus_reports_training_outcomes_progress_queue_and_versions(trained):
    history.record_failure(trained / "models", PROJECT, RuntimeError("worker ran out of memory"), "START_TRAINING",
                           "job-4", 3.0)
    client, _ = make_app(trained, training=Training())
    samples = scrape(client)
    project = ("project", str(PROJECT))

    def jobs(outcome):
        return samples[("yolo_backend_training_jobs", (("outcome", outcome), project))]

    assert (jobs("published"), jobs("rejected"), jobs("failed"), jobs("skipped")) == (2, 1, 1, 0)
    assert samples[("yolo_backend_training_progress_ratio", (project,))] == pytest.approx(0.3)
    assert samples[("yolo_backend_serving_version_info", (project, ("version", "v2-20261201T110000")))] == 1
    assert samples[("yolo_backend_serving_version_number", (project,))] == 2
    assert samples[("yolo_backend_training_queue_jobs", (("state", "failed"),))] == 2
    assert samples[("yolo_backend_redis_up", ())] == 1


# --------------------------------------------------------------------------------------------------------------
# the run history and the server layer's imports
# --------------------------------------------------------------------------------------------------------------

def test_history_records_each_outcome_and_survives_a_torn_line(tmp_path, monkeypatch):
    history.record_run(tmp_path, 1, {"trained": False, "published": False, "reason": "no annotated task",
                                     "examples": 0}, "j1", 1.0)
    history.record_run(tmp_path, 1, {"trained": True, "published": True, "model_version": "v1-x", "decision": "ok",
                                     "examples": 5, "metrics": {"map50": float("nan")}}, "j2", 2.0)
    with open(history.history_path(tmp_path, 1), "a") as f:
        f.write('{"outcome": "published", "ti')  # a crash mid-write
    history.record_failure(tmp_path, 1, ValueError("bad label config"), "START_TRAINING", "j3", 0.5)
    runs = history.read_runs(tmp_path, 1)
    assert [(r["outcome"], r["reason"]) for r in runs[:1]] == [("skipped", "no annotated task")]
    assert runs[1]["version"] == "v1-x" and runs[1]["metrics"] == {"map50": None}
    assert [r["outcome"] for r in runs] == ["skipped", "published", "failed"]
    assert runs[2]["reason"] == "ValueError: bad label config"
    monkeypatch.setattr(history, "MAX_RUNS", 3)
    history.record_failure(tmp_path, 1, ValueError("again"), job_id="j4")
    assert [r["job"] for r in history.read_runs(tmp_path, 1)] == ["j3", "j4"]  # trimmed to the last 3 lines


def test_history_write_failure_does_not_raise(tmp_path, caplog):
    (tmp_path / "projects").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        assert history.record_run(tmp_path, 1, {"trained": True, "published": True}) is None
    assert "could not record the training run" in caplog.text


def test_dashboard_imports_no_torch():
    code = ("import sys; from yolo_backend.server.app import create_app; "
            "from yolo_backend.server import dashboard, charts, status, prometheus; "
            "from model_backend import YOLOv7Backend; create_app(YOLOv7Backend); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "MODEL_DIR": "/nonexistent"})
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------------------
# the training job writes the history (run_training_job in this process: no worker, no Redis)
# --------------------------------------------------------------------------------------------------------------

def failing_train(data, callback):
    raise RuntimeError("out of memory while training")


def run_job_in_process(tmp_path, monkeypatch, tasks, trainer) -> Path:
    from tests.support import LEGACY as TOKEN, FakeLabelStudio
    from yolo_backend.jobs.job import run_training_job

    label_studio = FakeLabelStudio(tasks, project_id=PROJECT)
    model_path = tmp_path / "start.pt"
    model_path.write_bytes(b"not loaded: the trainer fails or there is nothing to train")
    for key, value in {"MODEL_DIR": str(tmp_path / "models"), "MODEL_PATH": str(model_path),
                       "IMAGE_CACHE_DIR": str(tmp_path / "cache"), "LABEL_STUDIO_URL": label_studio.url,
                       "LABEL_STUDIO_API_KEY": TOKEN, "BACKEND_URL": FAKE_BACKEND_URL,
                       "MIN_ANNOTATIONS_FIRST_TRAINING": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("yolo_backend.jobs.training.fine_tune_trainer", trainer)
    try:
        run_training_job(PROJECT, "START_TRAINING", {}, {"settle_s": 0})
    finally:
        label_studio.close()
    return tmp_path / "models"


def test_training_job_records_a_run_that_failed(tmp_path, monkeypatch):
    from tests.test_jobs import make_tasks

    with pytest.raises(RuntimeError, match="out of memory"):
        run_job_in_process(tmp_path, monkeypatch, make_tasks(), failing_train)
    (run,) = history.read_runs(tmp_path / "models", PROJECT)
    assert run["outcome"] == "failed" and run["reason"] == "RuntimeError: out of memory while training"
    assert run["event"] == "START_TRAINING" and run["job_seconds"] >= 0


def test_training_job_records_a_run_with_nothing_to_train(tmp_path, monkeypatch):
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/img1.png"}, "annotations": []}]
    run_job_in_process(tmp_path, monkeypatch, tasks, failing_train)
    (run,) = history.read_runs(tmp_path / "models", PROJECT)
    assert run["outcome"] == "skipped" and run["images"] == 0
    assert "no annotated task" in run["reason"]
    client, _ = make_app(tmp_path)
    (project,) = client.get("/status").json["projects"]
    assert [(v["status"], v["reason"]) for v in project["versions"]] == [("skipped", run["reason"])]


def test_page_and_status_for_one_project(trained):
    Registry.for_project(trained / "models", 7).publish(trained / "model.pt", {"annotations": 2, "negatives": 0},
                                                        name="v1-20261201T120000")
    client, _ = make_app(trained, training=Training())
    assert [p["project"] for p in client.get("/status").json["projects"]] == [PROJECT, 7]
    assert [p["project"] for p in client.get("/status?project=7").json["projects"]] == [7]
    page = client.get("/dashboard?project=7").get_data(as_text=True)
    assert 'data-project="7"' in page and f'data-project="{PROJECT}"' not in page
    assert "2 (2 / 0)" in page and '<td class="n">–</td>' in page  # a version without metrics: dashes
    response = client.get("/dashboard?project=../etc")
    assert response.status_code == 400 and "not a project id" in response.json["error"]


def test_a_hand_written_meta_json_does_not_break_the_page(trained):
    version = Registry.for_project(trained / "models", PROJECT).publish(trained / "model.pt", name="v3-20261201T130000")
    (version.path / "meta.json").write_text(json.dumps({"created": "yesterday", "annotations": "many",
                                                        "metrics": {"map50": "high", "per_class": ["x"]}}))
    client, _ = make_app(trained, training=Training())
    response = client.get("/dashboard")
    assert response.status_code == 200 and "v3-20261201T130000" in response.get_data(as_text=True)
    assert len(client.get("/status").json["projects"][0]["learning_curve"]) == 3  # the bad one is left out


# --------------------------------------------------------------------------------------------------------------
# what a number rests on: a version validated on 2 images is "too few to say", not mAP 1.000
# --------------------------------------------------------------------------------------------------------------

def test_a_version_validated_on_two_images_is_too_few_to_say(trained):
    registry = Registry.for_project(trained / "models", PROJECT)
    registry.publish(trained / "model.pt", {"parent": "v2-20261201T110000", "metrics": metrics(1.0, 1.0, 1.0, images=2,
                                                                                               boxes=2),
                                            "decision": "only 2 validation image(s): too few to compare",
                                            "annotations": 44, "negatives": 6, "train_images": 42, "val_images": 2,
                                            "train_seconds": 80.0}, name="v3-20261201T120000")
    client, _ = make_app(trained, training=Training())
    (project,) = client.get("/status", query_string={"project": PROJECT}).json["projects"]
    newest = project["versions"][0]
    assert newest["name"] == "v3-20261201T120000" and newest["serving"]
    m = newest["metrics"]
    assert (m["val_images"], m["too_few"], m["note"]) == (2, True, "too few to say (2 validation images; needs 10)")
    assert m["map50"] == 1.0  # the measurement stays available to scripts, flagged
    assert [c["too_few"] for c in m["per_class"]] == [True, True]
    assert [(p["val_images"], p["too_few"]) for p in project["learning_curve"]][-1] == (2, True)

    page = client.get("/dashboard").get_data(as_text=True)
    row = page[page.index('<td class="name">v3-20261201T120000'):page.index('<td class="name">v2-20261201T110000')]
    assert '<td class="too-few metrics" colspan="4">too few to say (2 validation images; needs 10)</td>' in row
    assert ">1.000<" not in row and "mAP@0.5 1.0" not in row
    assert "per class: too few to say (2 validation images; needs 10)" in row
    # the curve leaves the point out and says so; the per-class chart of the serving v3 says too few
    curve, per_class = re.findall(r"<svg .*?</svg>", page, re.S)
    assert len(ET.fromstring(curve).findall(f"{SVG}circle")) == 6  # the 3 runs on 12 images, not v3's
    assert "Left out: 1 run validated on fewer than 10 images (on 2): too few to say." in page
    assert ET.fromstring(per_class).findall(f"{SVG}rect[@class='bar']") == []
    assert "Per class: too few to say (2 validation images; needs 10)." in per_class
    assert "mAP per class of v3-20261201T120000 (on 2 validation images)" in per_class


def test_every_run_too_few_leaves_an_empty_curve_that_says_why(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    registry = Registry.for_project(tmp_path / "models", PROJECT)
    # An older meta.json without the metrics' own image count: the version's val_images is used.
    old = metrics(0.9)
    del old["images"]
    registry.publish(checkpoint, {"metrics": old, "annotations": 6, "negatives": 1, "val_images": 1},
                     name="v1-20261201T100000")
    client, _ = make_app(tmp_path)
    page = client.get("/dashboard").get_data(as_text=True)
    assert "No run validated on 10 or more images yet: too few to say." in page
    assert "too few to say (1 validation image; needs 10)" in page and ">0.900<" not in page


def test_a_class_with_few_boxes_is_too_few_to_say_on_its_own(trained):
    few = metrics(0.6, images=20, boxes=3)  # enough images, but only 3 fire boxes among them
    Registry.for_project(trained / "models", PROJECT).publish(trained / "model.pt", {
        "metrics": few, "annotations": 60, "negatives": 6, "train_images": 40, "val_images": 20},
        name="v3-20261201T120000")
    client, _ = make_app(trained, training=Training())
    fire = client.get("/status").json["projects"][0]["versions"][0]["metrics"]["per_class"][0]
    assert (fire["too_few"], fire["note"], fire["map50"]) == (True, "too few to say (3 boxes)", 0.61)
    page = client.get("/dashboard").get_data(as_text=True)
    assert "per class (on 20 validation images): <span class=\"class\"><b>fire</b> too few to say (3 boxes)" in page
    assert ">0.600<" in page  # the overall number rests on 20 images: shown, with its count
    per_class = re.findall(r"<svg .*?</svg>", page, re.S)[1]
    assert ET.fromstring(per_class).findall(f"{SVG}rect[@class='bar']") == []
    assert ">too few to say (3 boxes)</text>" in per_class


def test_version_names_and_parents_can_wrap(tmp_path):
    """The table's layout is checked in a real browser (tests/e2e/test_dashboard_browser.py); here: the cells
    that hold names carry the class whose CSS lets them wrap, and no rule keeps them on one line."""
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    Registry.for_project(tmp_path / "models", PROJECT).publish(checkpoint, {
        "parent": "yolov7-tiny_fire-smoke_ref-trained-3f2a9c1d", "metrics": metrics(0.5), "annotations": 60,
        "negatives": 4}, name="v12-20261123T191000")
    client, _ = make_app(tmp_path)
    page = client.get("/dashboard").get_data(as_text=True)
    assert '<td class="name parent">yolov7-tiny_fire-smoke_ref-trained-3f2a9c1d</td>' in page
    css = page[page.index("<style>"):page.index("</style>")]
    assert re.search(r"td\.name \{[^}]*overflow-wrap: anywhere", css)
    assert not re.search(r"td\.name[^{]*\{[^}]*nowrap", css)


# --------------------------------------------------------------------------------------------------------------
# the pool card while the next version's run waits in the queue
# --------------------------------------------------------------------------------------------------------------

class PoolTraining(Training):
    """Training hooks whose pool scoring is what ``TrainingQueue.pool_status`` reads from Redis."""

    def __init__(self, pool: dict):
        super().__init__()
        self.pool = pool

    def pool_status(self, project_id):
        return dict(self.pool) if project_id == PROJECT else {}


DONE_V2 = {"version": "v2-20261201T110000", "state": "done", "total": 50, "done": 50, "failed": 0, "left": 0,
           "rate": 4.2, "eta_s": None, "started_at": 1795461800.0, "updated_at": 1795461812.0}
QUEUED_V3 = {"job": "pool-3-0123456789ab", "reason": "published v3-20261201T120000",
             "version": "v3-20261201T120000", "enqueued_at": 1795461900.0}


def test_pool_card_says_the_new_versions_run_is_queued(trained):
    Registry.for_project(trained / "models", PROJECT).publish(trained / "model.pt", {"annotations": 50},
                                                              name="v3-20261201T120000")
    client, _ = make_app(trained, training=PoolTraining({**DONE_V2, "queued": QUEUED_V3}))
    pool = client.get("/status", query_string={"project": PROJECT}).json["projects"][0]["pool"]
    assert pool["state"] == "done" and pool["version"] == "v2-20261201T110000"  # the run the numbers are of
    assert pool["queued"] == {**QUEUED_V3, "enqueued_iso": "2026-11-23T19:25:00Z"}
    assert pool["state_text"] == "queued for v3-20261201T120000 (previous run v2-20261201T110000: done)"
    card = client.get("/dashboard").get_data(as_text=True)
    card = card[card.index('<div class="card pool"'):card.index('<div class="charts">')]
    assert ('class="pool-state">queued for v3-20261201T120000 (previous run v2-20261201T110000: done)</b>'
            in card)
    assert 'class="pool-version">v2-20261201T110000 (previous run)</b>' in card and ">50 of 50<" in card


def test_a_queued_run_names_the_version_it_will_score(trained):
    """v3's publish joined the run v2's publish queued (the worker was busy training v3): the waiting job's reason
    still says v2, but it scores what serves when it starts, v3."""
    Registry.for_project(trained / "models", PROJECT).publish(trained / "model.pt", {"annotations": 50},
                                                              name="v3-20261201T120000")
    joined = {**QUEUED_V3, "reason": "published v2-20261201T110000", "version": "v2-20261201T110000"}
    client, _ = make_app(trained, training=PoolTraining({**DONE_V2, "version": "v1-20261201T100000",
                                                          "queued": joined}))
    pool = client.get("/status").json["projects"][0]["pool"]
    assert pool["queued"]["version"] == "v3-20261201T120000" and pool["queued"]["reason"] == joined["reason"]
    assert pool["state_text"] == "queued for v3-20261201T120000 (previous run v1-20261201T100000: done)"


def test_pool_card_before_any_run_and_after_the_queued_one_starts(trained):
    alone = {"queued": {**QUEUED_V3, "reason": "requested", "version": None}}
    client, _ = make_app(trained, training=PoolTraining(alone))
    pool = client.get("/status").json["projects"][0]["pool"]
    assert pool["state_text"] == "queued for v2-20261201T110000" and pool["state"] is None  # what serves now
    assert (pool["done"], pool["total"], pool["fraction"]) == (0, 0, 0.0)
    page = client.get("/dashboard").get_data(as_text=True)
    assert 'class="pool-state">queued for v2-20261201T110000</b>' in page and 'class="pool-version">–<' in page
    assert pool_state_text(None, None, {"reason": "requested", "version": None}) == "queued (requested)"  # no model
    client, _ = make_app(trained, training=PoolTraining(DONE_V2))  # nothing waits: the state as it is
    pool = client.get("/status").json["projects"][0]["pool"]
    assert pool["queued"] is None and pool["state_text"] == "done"


def test_pool_status_reads_the_waiting_coordinator_from_redis(tmp_path, redis_server):
    """The whole path with a real Redis and RQ: v2's run done in the hash, v3's coordinator queued by the publish
    (``enqueue_pool_run``, no worker takes it) -> /status and the page say queued; once the job starts (the
    coordinator deletes the waiting key) the card shows the hash again."""
    from redis import Redis
    from rq.job import Job

    from yolo_backend.jobs.keys import Keys
    from yolo_backend.jobs.pool import RunStatus, enqueue_pool_run, queued_run
    from yolo_backend.jobs.queue import TrainingQueue
    from yolo_backend.jobs.slots import SlotKind, WaitingSlots

    queue_name = f"dashboard-pool-{time.monotonic_ns()}"
    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), image_cache_dir=str(tmp_path / "c"),
                                 redis_url=redis_server.url, rq_queue_name=queue_name)
    connection, keys = Redis.from_url(redis_server.url), Keys(queue_name)
    run = RunStatus(connection, keys, PROJECT)
    run.start("v2-20261201T110000", total=5, done=0, reason="published v2-20261201T110000", job_id="pool-3-a")
    run.add("v2-20261201T110000", stored=5)
    run.done()
    queued = enqueue_pool_run(connection, queue_name, PROJECT, "published v3-20261201T120000", max_waiting=5)
    training = TrainingQueue(settings)
    try:
        context = BackendContext.from_settings(settings, loader=empty_detector_loader, training=training)
        client = create_app(YOLOv7Backend, context=context).test_client()
        pool = client.get("/status", query_string={"project": PROJECT}).json["projects"][0]["pool"]
        assert pool["queued"]["job"] == queued["job"] and pool["queued"]["version"] == "v3-20261201T120000"
        assert abs(pool["queued"]["enqueued_at"] - time.time()) < 60
        assert pool["state_text"] == "queued for v3-20261201T120000 (previous run v2-20261201T110000: done)"
        page = client.get("/dashboard", query_string={"project": PROJECT}).get_data(as_text=True)
        assert "queued for v3-20261201T120000 (previous run v2-20261201T110000: done)" in page
        # A started job is no longer waiting, even before it deletes the key.
        job = Job.fetch(queued["job"], connection=connection)
        job.set_status("started")
        assert queued_run(connection, keys, PROJECT) is None
        WaitingSlots(connection, keys, SlotKind.POOL).release(PROJECT, queued["job"])  # as the coordinator does
        pool = client.get("/status", query_string={"project": PROJECT}).json["projects"][0]["pool"]
        assert pool["queued"] is None and pool["state_text"] == "done"
    finally:
        training.close()


# --------------------------------------------------------------------------------------------------------------
# what a version rests on: compared or not, the size the model it replaced was compared at; the serving size;
# a project waiting for its first training
# --------------------------------------------------------------------------------------------------------------

def test_a_version_published_without_a_comparison_is_marked_so_everywhere(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    registry = Registry.for_project(tmp_path / "models", PROJECT)
    measured = {"size": 320, "reason": "measured on 12 annotated images of project 3: mAP@0.5 0.747 at 320, 0.181 "
                "at 640", "guess": False, "measured_now": True}
    registry.publish(checkpoint, {"parent": "best-4d19862a", "metrics": metrics(0.4, images=2),
                                  "decision": "not compared: only 2 validation image(s), too few to compare (need 4)",
                                  "compared": False, "parent_img_size": measured, "annotations": 10,
                                  "val_images": 2, "train_images": 8}, name="v1-20261201T100000")
    registry.publish(checkpoint, {"parent": "v1-20261201T100000", "metrics": metrics(0.5), "decision": "better",
                                  "compared": True, "parent_img_size": {"size": 320, "reason": "trained at 320"},
                                  "annotations": 60, "val_images": 12, "train_images": 48},
                     name="v2-20261201T110000")
    client, _ = make_app(tmp_path)
    (project,) = client.get("/status", query_string={"project": PROJECT}).json["projects"]
    v2, v1 = project["versions"]
    assert (v1["compared"], v1["not_compared"], v2["compared"], v2["not_compared"]) == (False, True, True, False)
    assert v1["parent_img_size"] == 320 and v1["parent_img_size_measured_now"] is True
    details = {d["name"]: d for d in client.get("/versions", query_string={"project": PROJECT}).json["details"]}
    assert details["v1-20261201T100000"]["not_compared"] is True
    assert details["v2-20261201T110000"]["not_compared"] is False
    page = client.get("/dashboard").get_data(as_text=True)
    rows = re.findall(r'<td class="why">(.*?)</td>\s*<td class="name parent">(.*?)</td>', page, re.S)
    assert len(rows) == 2
    assert '<span class="tag not-compared">not compared</span>: not compared: only 2' in rows[1][0]
    assert "not compared" not in rows[0][0]
    assert "at 320, measured on 12 annotated images of project 3" in rows[1][1]
    assert 'at 320</span>' in rows[0][1]   # the size the replaced version was compared at, no measurement
    assert "published and marked “not compared”" in page   # the rule, in the page's own words


def test_the_page_says_the_serving_size_is_a_guess_until_measured(tmp_path, start_checkpoint):
    import shutil

    from yolo_backend.serving_size import MeasuredSize, SizeScore, record_size

    best = shutil.copy(start_checkpoint, tmp_path / "best.pt")
    client, settings = make_app(tmp_path, model_path=str(best))
    client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG})
    (project,) = client.get("/status", query_string={"project": PROJECT}).json["projects"]
    guess = ("a guess: the checkpoint records no training size; set IMG_SIZE to the size it was trained at, or let "
             "the first training measure it")
    assert project["serving_img_size"] == {"size": 640, "reason": guess, "guess": True, "text": f"640 ({guess})"}
    page = client.get("/dashboard").get_data(as_text=True)
    assert f'<p class="img-size guess" id="img-size-{PROJECT}">Inference size: <b>640</b> ({guess})</p>' in page
    record_size(settings.model_dir, best, MeasuredSize(
        320, (SizeScore(320, 0.7, 0.3, 0.34), SizeScore(640, 0.2, 0.1, 0.11)), 12, "best", PROJECT))
    (project,) = client.get("/status", query_string={"project": PROJECT}).json["projects"]
    assert project["serving_img_size"]["size"] == 320 and project["serving_img_size"]["guess"] is False
    assert "Inference size: <b>320</b> (measured on 12 annotated images" in client.get("/dashboard").get_data(
        as_text=True)


def test_a_project_waiting_for_its_first_training_says_how_many_more(tmp_path):
    model_dir = tmp_path / "models"
    history.record_run(model_dir, PROJECT, {"trained": False, "published": False, "waiting": True,
                                            "annotations": 3, "annotations_needed": 10,
                                            "reason": "waiting for 7 more annotations: ..."}, "job-1", 0.5)
    client, _ = make_app(tmp_path)
    (project,) = client.get("/status", query_string={"project": PROJECT}).json["projects"]
    assert project["versions"] == [] and project["waiting_for_annotations"]["more"] == 7
    page = client.get("/dashboard").get_data(as_text=True)
    assert "<b>Waiting for 7 more annotations</b> before the first training: 3 of 10 annotated tasks" in page
    assert "Nothing trained or published yet." in page
    # the next request saw 9: one more to go, and the page reloads (its stamp changed)
    stamp = project["stamp"]
    history.record_run(model_dir, PROJECT, {"trained": False, "published": False, "waiting": True,
                                            "annotations": 9, "annotations_needed": 10, "reason": "..."}, "job-2")
    (project,) = client.get("/status", query_string={"project": PROJECT}).json["projects"]
    assert project["waiting_for_annotations"]["text"].startswith("waiting for 1 more annotation before")
    assert project["stamp"] != stamp
    assert "yolo_backend_training_jobs{outcome=\"waiting\",project=\"3\"} 2.0" in \
        client.get("/prometheus").get_data(as_text=True)
