"""Safe on a network: keys go only to their own origin, inputs are bounded, failures are retried, not stored.

Two loopback servers play Label Studio and a foreign host; a dripping socket server plays a slow image host.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
import struct
import threading
import time
import zlib

import pytest
from flask import redirect, request

from tests.support import LEGACY, PAT, FakeLabelStudio, png_bytes, wait_for
from tests.test_server import CONFIG, make_client
from yolo_backend.image_header import ImageTooLargeError, checked_size
from yolo_backend.labelstudio.client import LabelStudioAuthError, LabelStudioSession
from yolo_backend.labelstudio.urls import Origin, origin_of
from yolo_backend.labelstudio.images import ImageFetchError, ImageFetcher, decode_image
from yolo_backend.server.base import parse_project_id

KEYS = pytest.mark.parametrize("key", [LEGACY, PAT], ids=["legacy-token", "personal-access-token"])


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "best.pt"
    path.write_text("weights-A")
    return path


def redirecting_ls(foreign_url: str) -> FakeLabelStudio:
    """A fake Label Studio with one more route: a redirect to ``foreign_url`` (as a presign answer would)."""
    ls = FakeLabelStudio()

    @ls.app.get("/data/upload/1/elsewhere.png")
    def elsewhere():
        ls.auth_seen.append(request.headers.get("Authorization"))
        return redirect(f"{foreign_url}/public/moved.png", 302)

    return ls


# --------------------------------------------------------------------------------------------------------------
# 1. Which key goes where
# --------------------------------------------------------------------------------------------------------------

def test_origin_is_scheme_host_and_port():
    assert origin_of("http://LS.example:80/x") == origin_of("http://ls.example/y") == Origin("http", "ls.example", 80)
    assert origin_of("https://ls.example/") == Origin("https", "ls.example", 443)
    assert origin_of("http://127.0.0.1:8080") != origin_of("http://127.0.0.1:8081")
    assert origin_of("/data/upload/1/a.png") is None and origin_of("ftp://host/x") is None
    session = LabelStudioSession("http://127.0.0.1:8080", LEGACY)
    assert session.is_label_studio_url("http://127.0.0.1:8080/data/upload/1/a.png")
    assert not session.is_label_studio_url("http://127.0.0.1:8081/data/upload/1/a.png")  # another port
    assert not session.is_label_studio_url("https://127.0.0.1:8080/x")                   # another scheme
    assert session.credentials("http://127.0.0.1:8081/") == []


@KEYS
def test_setup_naming_another_host_never_gets_the_configured_key(tmp_path, model_file, key, caplog):
    with FakeLabelStudio() as ls, FakeLabelStudio() as foreign:
        client, context, _ = make_client(tmp_path, model_file, label_studio_url=ls.url, label_studio_api_key=key)
        # An unauthenticated caller on the network names its own host as Label Studio.
        reply = client.post("/setup", json={"project": "1.1", "schema": CONFIG, "hostname": foreign.url,
                                            "access_token": "attacker-token"})
        assert reply.status_code == 200
        assert not context.session.is_label_studio_url(f"{foreign.url}/public/a.png")
        tasks = [{"id": 1, "data": {"image": f"{foreign.url}/public/a.png"}},
                 {"id": 2, "data": {"image": "/data/upload/1/b.png"}}]
        reply = client.post("/predict", json={"tasks": tasks, "project": "1.1", "label_config": CONFIG})
        assert reply.status_code == 200, reply.json
        assert all("result" in item and len(item["result"]) == 1 for item in reply.json["results"])
        # The foreign host was asked for its image, with no key; the upload path still went to LABEL_STUDIO_URL.
        assert foreign.auth_seen == [None]
        assert ls.hits.get("/data/upload/1/b.png?") == 1
        assert all(seen and "attacker-token" not in seen for seen in ls.auth_seen)
        assert "not used" in caplog.text and foreign.url in caplog.text


def test_without_label_studio_url_each_setup_token_stays_with_its_hostname(tmp_path):
    with FakeLabelStudio() as ls, FakeLabelStudio() as foreign:
        session = LabelStudioSession(None, None, timeout=5)
        session.update_from_setup(ls.url, LEGACY)
        fetcher = ImageFetcher(session, None, timeout=5)
        assert fetcher.load("/data/upload/1/a.png").shape == (48, 64, 3)
        # A later /setup names another host without a token: it changes nothing (relative paths stay with the
        # hostname that came with a token, and so does the token).
        session.update_from_setup(foreign.url, None)
        assert fetcher.load("/data/upload/1/b.png").shape == (48, 64, 3)
        assert fetcher.load(f"{ls.url}/data/upload/1/c.png").shape == (48, 64, 3)
        # With a token of its own it becomes the place for relative paths, with that token only.
        session.update_from_setup(foreign.url, "another-token")
        with pytest.raises(ImageFetchError, match="refused"):  # the foreign host does not know that token
            fetcher.load("/data/upload/1/d.png")
        assert foreign.auth_seen == ["Token another-token"]
        assert ls.auth_seen and all(h == f"Token {LEGACY}" for h in ls.auth_seen)


@KEYS
def test_no_authorization_follows_a_redirect_to_another_origin(tmp_path, key):
    with FakeLabelStudio() as foreign:
        with redirecting_ls(foreign.url) as ls:
            fetcher = ImageFetcher(LabelStudioSession(ls.url, key, timeout=5), None, timeout=5)
            assert fetcher.load("/data/upload/1/elsewhere.png").shape == (34, 12, 3)
            assert ls.auth_seen[-1] and ls.auth_seen[-1].startswith(("Token ", "Bearer "))
            assert foreign.auth_seen == [None]
            # A redirect on Label Studio's own origin keeps the key (presign -> signed URL on the same host).
            assert fetcher.load("s3://bucket/dir/c.png", task_id=5).shape == (20, 20, 3)


# --------------------------------------------------------------------------------------------------------------
# 2. Decompression bombs
# --------------------------------------------------------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (its pixel data is a few compressed rows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width * 3 + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_a_huge_image_is_refused_from_its_header_before_decoding(monkeypatch):
    import cv2

    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 1_000_000
    calls = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: calls.append(1))
    with pytest.raises(ImageFetchError, match=r"30000 x 30000 px .*MAX_IMAGE_PIXELS"):
        decode_image(bomb)
    assert calls == []  # nothing was decoded
    with pytest.raises(ImageTooLargeError):
        checked_size(bomb, max_pixels=120_000_000)
    assert checked_size(bomb, max_pixels=0) == (30000, 30000)  # 0: no cap
    monkeypatch.undo()
    assert decode_image(png_bytes(40, 20), max_pixels=800).shape == (20, 40, 3)  # exactly at the cap: fine
    with pytest.raises(ImageFetchError, match="MAX_IMAGE_PIXELS=799"):
        decode_image(png_bytes(40, 20), max_pixels=799)


def test_a_bomb_task_gets_no_prediction_and_a_log_line_naming_it(tmp_path, model_file, caplog):
    import base64

    client, _, _ = make_client(tmp_path, model_file)
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(30000, 30000)).decode()
    good = "data:image/png;base64," + base64.b64encode(png_bytes(64, 48)).decode()
    with caplog.at_level(logging.WARNING):
        reply = client.post("/predict", json={"tasks": [{"id": 7, "data": {"image": bomb}},
                                                        {"id": 8, "data": {"image": good}}], "label_config": CONFIG})
    assert reply.status_code == 200
    first, second = reply.json["results"]
    assert "result" not in first and len(second["result"]) == 1
    assert "task 7" in caplog.text and "MAX_IMAGE_PIXELS" in caplog.text
    assert client.get("/metrics").json["tasks_failed"] == 1


# --------------------------------------------------------------------------------------------------------------
# 3. A deadline for the whole download; /health stays fast while predictions wait
# --------------------------------------------------------------------------------------------------------------

class DrippingServer:
    """Answers every request with headers, then one body byte every ``interval`` seconds (for ``seconds``)."""

    def __init__(self, interval: float = 0.2, seconds: float = 30.0, in_headers: bool = False):
        self.interval, self.seconds, self.in_headers = interval, seconds, in_headers
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        with conn:
            try:
                conn.recv(65536)
                # Headers and all, or one never-ending header line: each byte comes well within a read timeout.
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: " if self.in_headers else
                             b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
                end = time.monotonic() + self.seconds
                while time.monotonic() < end and not self._stop.is_set():
                    conn.sendall(b"\0")
                    time.sleep(self.interval)
            except OSError:
                pass

    def close(self):
        self._stop.set()
        self.sock.close()


@pytest.fixture
def dripping():
    server = DrippingServer()
    yield server
    server.close()


def test_a_dripping_server_is_cut_off_at_the_deadline(dripping):
    fetcher = ImageFetcher(LabelStudioSession(None, None), None, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"timed out after 1 s \(IMAGE_TIMEOUT\)"):
        fetcher.load(f"{dripping.url}/slow.png")
    # Each byte comes well within the per-read timeout; only a deadline for the whole download ends it.
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("key", [None, LEGACY], ids=["web-url", "label-studio-url"])
def test_a_server_dripping_its_headers_is_cut_off_at_the_deadline(key):
    server = DrippingServer(in_headers=True)
    try:
        fetcher = ImageFetcher(LabelStudioSession(server.url if key else None, key), None, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(ImageFetchError, match=r"timed out after 1 s|download failed"):
            fetcher.load(f"{server.url}/slow.png" if key is None else "/data/upload/1/slow.png")
        assert time.monotonic() - started < 5.0
    finally:
        server.close()


def test_health_and_setup_answer_while_predictions_wait(tmp_path, model_file, dripping):
    from werkzeug.serving import make_server
    import requests

    client, _, _ = make_client(tmp_path, model_file, image_timeout=3.0, max_concurrent_predicts=1)
    app = client.application
    server = make_server("127.0.0.1", 0, app, threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        slow = {"tasks": [{"id": 1, "data": {"image": f"{dripping.url}/a.png"}}], "label_config": CONFIG}
        answers = []
        first = threading.Thread(target=lambda: answers.append(requests.post(f"{url}/predict", json=slow,
                                                                             timeout=30)))
        first.start()
        wait_for(lambda: dripping.connections == 1, 10, "the first prediction to be downloading its image")
        # While the slot is taken: a second /predict is told to come back, /health and /setup answer at once.
        busy = requests.post(f"{url}/predict", json=slow, timeout=10)
        assert busy.status_code == 503 and "MAX_CONCURRENT_PREDICTS" in busy.json()["error"]
        assert requests.get(f"{url}/health", timeout=1).status_code == 200
        assert requests.post(f"{url}/setup", json={"project": "1.1", "schema": CONFIG}, timeout=3).status_code == 200
        first.join(20)
        assert answers and answers[0].status_code == 200
        assert "result" not in answers[0].json()["results"][0]  # timed out: Label Studio asks again later
    finally:
        server.shutdown()


# --------------------------------------------------------------------------------------------------------------
# 4. A failed image is not stored as an empty prediction
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["missing.png", "page.png"], ids=["404", "not-an-image"])
def test_a_failed_image_gets_an_item_without_result(tmp_path, model_file, name, caplog):
    with FakeLabelStudio() as ls:
        client, _, _ = make_client(tmp_path, model_file, label_studio_url=ls.url, label_studio_api_key=LEGACY)
        tasks = [{"id": 1, "data": {"image": f"/data/upload/1/{name}"}},
                 {"id": 2, "data": {"image": "/data/upload/1/good.png"}}]
        reply = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1"})
        failed, good = reply.json["results"]
        assert failed == {"model_version": reply.json["model_version"]}
        assert len(good["result"]) == 1 and good["score"] is not None
        assert "task 1" in caplog.text and "asks again" in caplog.text
        metrics = client.get("/metrics").json
        assert (metrics["tasks_failed"], metrics["tasks_predicted"]) == (1, 1)


def test_label_studio_down_gives_no_result_for_every_task(tmp_path, model_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client, _, _ = make_client(tmp_path, model_file, label_studio_url=f"http://127.0.0.1:{port}",
                               label_studio_api_key=LEGACY)
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in range(3)]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1"})
    assert reply.status_code == 200 and all("result" not in item for item in reply.json["results"])


# --------------------------------------------------------------------------------------------------------------
# 5. Request limits
# --------------------------------------------------------------------------------------------------------------

def test_request_limits(tmp_path, model_file):
    client, _, _ = make_client(tmp_path, model_file, max_request_mb=0.01)
    big = client.post("/predict", data=b'{"tasks": [' + b'{"data": {}},' * 2000 + b'{}]}',
                      content_type="application/json")
    assert big.status_code == 413 and "MAX_REQUEST_MB=0.01" in big.json["error"]
    deep = client.post("/predict", data=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")
    assert deep.status_code in (400, 413)
    client, _, _ = make_client(tmp_path, model_file)
    deep = client.post("/webhook", data=b'{"a":' * 100_000 + b"1" + b"}" * 100_000, content_type="application/json")
    assert deep.status_code == 400 and "nested too deeply" in deep.json["error"]
    for job in ("../..", "a/b", "x" * 200, "..", "job\n1"):
        reply = client.get("/job_status", query_string={"job": job})
        assert reply.status_code == 400 and "not a job id" in reply.json["error"], job
    assert client.get("/job_status", query_string={"job": "train-3-1a2b3c4d5e6f"}).status_code == 200
    for project in (-1, 0, 10**30, "-1.123", "99999999999.1", True, 2.5):
        reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project}})
        assert reply.status_code == 400 and "not a project id" in reply.json["error"], project
    assert parse_project_id(2**31 - 1) == 2**31 - 1
    with pytest.raises(ValueError):
        parse_project_id(2**31)


# --------------------------------------------------------------------------------------------------------------
# 8. A model that cannot be loaded: refused at start, 503 later
# --------------------------------------------------------------------------------------------------------------

def test_a_model_damaged_after_start_answers_503_without_a_traceback(tmp_path, model_file, caplog):
    from yolo_backend.model_holder import ModelLoadError

    client, context, loader = make_client(tmp_path, model_file)

    def broken(path, settings):
        raise ValueError(f"{path}: is damaged: truncated or corrupt")

    context.models.loader = broken
    with caplog.at_level(logging.ERROR):
        reply = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "data:,"}}],
                                              "label_config": CONFIG})
    assert reply.status_code == 503
    assert "is damaged" in reply.json["error"] and "cannot be loaded" in reply.json["error"]
    assert not any(record.exc_info for record in caplog.records)
    assert client.get("/health").status_code == 200
    assert issubclass(ModelLoadError, Exception)


def test_start_check_covers_model_path_pinned_and_published_versions(tmp_path, model_file):
    from yolo_backend.registry import Registry, RegistryError
    from yolo_backend.model_holder import ModelLoadError, ModelHolder, NoModelError
    from yolo_backend.settings import Settings

    checked = []

    def validate(path):
        checked.append(path.name if path.name != "model.pt" else path.parent.name)
        if path.read_text() == "broken":
            raise ValueError(f"{path}: is damaged")

    models = tmp_path / "models"
    settings = Settings.from_env(env={}, model_dir=str(models), model_path=str(model_file))
    assert [s.version for s in ModelHolder(settings).check(validate)] == [ModelHolder(settings).source().version]
    bad = tmp_path / "bad.pt"
    bad.write_text("broken")
    Registry.for_project(models, 4).publish(bad, name="v2-20260101T000000")
    with pytest.raises(ModelLoadError, match=r"v2-20260101T000000 .*is damaged"):
        ModelHolder(settings).check(validate)
    with pytest.raises(RegistryError, match="MODEL_VERSION='v9'"):
        ModelHolder(Settings.from_env(env={}, model_dir=str(models), model_version="v9")).check(validate)
    with pytest.raises(NoModelError, match="does not exist"):
        ModelHolder(Settings.from_env(env={}, model_dir=str(tmp_path / "x"),
                                      model_path=str(tmp_path / "nope.pt"))).check(validate)
    assert ModelHolder(Settings.from_env(env={}, model_dir=str(tmp_path / "empty"))).check(validate) == []


def test_a_png_bomb_is_refused_without_reading_its_pixels_and_logged_briefly(tmp_path, model_file, caplog):
    """Pillow reads a PNG's EXIF only by decoding it: the header check must not ask for it."""
    import base64

    from PIL import Image

    calls = []
    original = Image.Image.load
    try:
        Image.Image.load = lambda self, *a, **k: calls.append(self.size) or original(self, *a, **k)
        with pytest.raises(ImageTooLargeError):
            checked_size(png_header_only(30000, 30000))
    finally:
        Image.Image.load = original
    assert calls == []
    client, _, _ = make_client(tmp_path, model_file)
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(20000, 20000)).decode()
    with caplog.at_level(logging.WARNING):
        client.post("/predict", json={"tasks": [{"id": 7, "data": {"image": bomb}}], "label_config": CONFIG})
    line = next(r.getMessage() for r in caplog.records if "task 7" in r.getMessage())
    assert "data:image/png;base64,..." in line and f"({len(bomb)} characters)" in line and len(line) < 600


def test_the_same_pixel_cap_in_training_folders_and_conversion(tmp_path, monkeypatch, caplog):
    """A YOLO dataset with one bomb: training leaves it out with a log line, conversion reports it and converts
    the rest, reading a file refuses it; MAX_IMAGE_PIXELS moves the cap for readers without the app's settings."""
    import json
    import subprocess
    import sys

    from yolo_backend.image_header import default_max_pixels
    from yolo_backend.yolov7.dataset import load_data
    from yolo_backend.yolov7.image_files import ImageTooLargeError as FileTooLarge
    from yolo_backend.yolov7.preprocess import read_image

    root = tmp_path / "dataset"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "images" / "bomb.png").write_bytes(png_header_only(20000, 20000))
    (root / "images" / "good.png").write_bytes(png_bytes(64, 48))
    for name in ("bomb", "good"):
        (root / "labels" / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with caplog.at_level(logging.WARNING):
        spec = load_data(root)
    assert [s.name for s in spec.train + spec.val] == ["good.png"]
    assert "bomb.png" in caplog.text and "MAX_IMAGE_PIXELS" in caplog.text
    with pytest.raises(FileTooLarge, match="bomb.png.*MAX_IMAGE_PIXELS"):
        read_image(root / "images" / "bomb.png")
    done = subprocess.run([sys.executable, "YoloToLabelStudio.py", "dataset", str(root),
                           "--out", str(tmp_path / "t.json"),
                           "--labels", "fire", "--no-progress", "--url-prefix", "http://files.example/"],
                          cwd=str(Path(__file__).resolve().parents[1]), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tasks = json.loads((tmp_path / "t.json").read_text())
    assert len(tasks) == 1 and "good.png" in json.dumps(tasks)
    assert "bomb.png" in done.stderr and "MAX_IMAGE_PIXELS" in done.stderr
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "500000000")
    assert default_max_pixels() == 500_000_000
    assert load_data(root).train[0].name in ("bomb.png", "good.png") and len(load_data(root).train) == 2


def test_a_token_refresh_never_follows_a_redirect():
    """requests would re-send a 307's body (the refresh token: the key itself) to wherever it points."""
    from flask import Flask
    from werkzeug.serving import make_server

    seen = []
    foreign = Flask("foreign")

    @foreign.post("/steal")
    def steal():
        seen.append(request.get_data())
        return {"access": "x"}

    ls = Flask("ls")
    foreign_server = make_server("127.0.0.1", 0, foreign, threaded=True)
    ls_server = make_server("127.0.0.1", 0, ls, threaded=True)

    @ls.post("/api/token/refresh/")
    def refresh():
        return redirect(f"http://127.0.0.1:{foreign_server.server_port}/steal", 307)

    for server in (foreign_server, ls_server):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        session = LabelStudioSession(f"http://127.0.0.1:{ls_server.server_port}", PAT, timeout=5)
        with pytest.raises(LabelStudioAuthError, match="token refresh refused"):
            session.request("GET", "/api/projects/1/")
        assert seen == []
    finally:
        foreign_server.shutdown()
        ls_server.shutdown()


def test_setup_remembers_a_bounded_number_of_projects(tmp_path, monkeypatch):
    """/setup needs no key: a flood of made-up project ids must not grow the server's memory without bound."""
    from yolo_backend.backend import YOLOv7Backend
    from yolo_backend.runtime import BackendContext
    from yolo_backend.server import app as server_app, routes
    from yolo_backend.settings import Settings

    monkeypatch.setattr(routes, "MAX_REMEMBERED_PROJECTS", 5)
    settings = Settings.from_env({}, model_dir=str(tmp_path / "models"))
    context = BackendContext.from_settings(settings)
    client = server_app.create_app(YOLOv7Backend, settings, context=context).test_client()
    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
              '<Label value="fire"/></RectangleLabels></View>')
    for project in range(1, 21):
        assert client.post("/setup", json={"project": project, "schema": config}).status_code == 200
    client.post("/setup", json={"project": 17, "schema": config})  # seen again: the newest
    assert list(context.label_configs) == [16, 18, 19, 20, 17]


@pytest.mark.parametrize("url", ["redis://:s3cret@host:6379/0", "redis://user:s3cret@host:6379/0",
                                 "redis://host:6379/0?password=s3cret", "redis://host/0?db=1&Password=s3cret",
                                 "rediss://u:s3cret@h/0?password=s3cret", "redis://[::1:6379/0?password=s3cret"])
def test_every_form_of_redis_password_is_masked(url):
    from yolo_backend.settings import mask_password

    masked = mask_password(url)
    assert "s3cret" not in masked and "***" in masked


def test_a_task_id_that_is_not_a_number_is_one_clear_line(tmp_path, model_file, caplog):
    client, _, _ = make_client(tmp_path, model_file, label_studio_url="http://127.0.0.1:1",
                               label_studio_api_key=LEGACY)
    tasks = [{"id": "abc", "data": {"image": "s3://bucket/a.png"}}, {"id": [1], "data": {"image": "gs://b/x.png"}}]
    with caplog.at_level(logging.WARNING):
        reply = client.post("/predict", json={"tasks": tasks, "project": "1.1", "label_config": CONFIG})
    assert reply.status_code == 200 and all("result" not in item for item in reply.json["results"])
    lines = [r for r in caplog.records if "integer id" in r.getMessage()]
    assert len(lines) == 2 and not any(r.exc_info for r in caplog.records)


def test_a_redis_password_in_the_query_shows_nowhere(tmp_path, model_file, caplog):
    from yolo_backend.jobs.queue import TrainingQueue
    from yolo_backend.settings import Settings

    url = "redis://127.0.0.1:1/0?password=s3cret"
    queue = TrainingQueue(Settings.from_env(env={}, model_dir=str(tmp_path / "models"), redis_url=url),
                          retry_interval=3600)
    client, _, _ = make_client(tmp_path, model_file, training=queue, redis_url=url)
    with caplog.at_level(logging.INFO):
        answers = [client.get(path).get_data(as_text=True) for path in ("/metrics", "/status", "/prometheus")]
        answers.append(client.post("/webhook", json={"action": "START_TRAINING", "project": 3}).get_data(True))
    queue.close()
    assert all("s3cret" not in text for text in answers) and "s3cret" not in caplog.text
    assert "password=***" in answers[0]


def test_megabyte_user_strings_stay_out_of_logs_and_status(tmp_path, model_file, caplog):
    """20 tasks with 1 MiB image URLs (and ids, and field names) grow neither the log nor /status by megabytes."""
    from yolo_backend.logs import CapLength
    from yolo_backend.server.status import recent_warnings

    client, _, _ = make_client(tmp_path, model_file)
    recent_warnings()  # the handler /status reads, as a server has it
    big = "a" * (1 << 20)
    tasks = [{"id": i, "data": {"image": f"http://127.0.0.1:1/{big}{i}.png"}} for i in range(10)]
    tasks += [{"id": f"{big}{i}", "data": {"image": f"/data/upload/1/{big}.png"}} for i in range(5)]
    tasks += [{"id": i, "data": {big: "x"}} for i in range(5)]
    with caplog.at_level(logging.INFO):
        reply = client.post("/predict", json={"tasks": tasks, "project": "1.1", "label_config": CONFIG})
        client.post("/setup", json={"hostname": f"http://{big}.example", "access_token": "t"})
    assert reply.status_code == 200
    assert len(caplog.text) < 100_000, len(caplog.text)
    status = client.get("/status").get_data()
    assert len(status) < 100_000 and b"aaaa" * 200 not in status
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "%s", (big,), None)
    assert CapLength().filter(record) and len(record.getMessage()) < 5000
