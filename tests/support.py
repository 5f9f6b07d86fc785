"""Helpers shared by the fast tests (the end-to-end ones have tests/e2e/harness.py): the label config, waiting,
test images and tokens, and one fake Label Studio."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Sequence

import cv2
import numpy as np
from flask import Flask, Response, abort, jsonify, redirect, request
from werkzeug.serving import make_server

FIRE_SMOKE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="fire"/><Label value="smoke"/>
  </RectangleLabels>
</View>"""


# A bound for "answers at once" in unit tests: generous for a loaded CI machine, far below what the work it rules
# out takes there (training, or waiting for Label Studio / a dead Redis); the benchmarks measure real latencies.
ANSWERS_AT_ONCE_S = 5.0


def wait_for(predicate, timeout: float, message: str, interval: float = 0.1):
    """Poll ``predicate()`` until it returns something truthy and return that; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")


# --------------------------------------------------------------------------------------------------------------
# Images and tokens
# --------------------------------------------------------------------------------------------------------------

LEGACY = "0123456789abcdef0123456789abcdef01234567"  # a legacy Label Studio API token
# The URL the fake Label Studio lists as its project's ML backend; tests set BACKEND_URL to it, so the backend
# counts the project as connected (labelstudio/connection.py) without probing itself.
FAKE_BACKEND_URL = "http://ml-backend.test:9090"


def fake_jwt(payload: dict) -> str:
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


PAT = fake_jwt({"token_type": "refresh", "user_id": 1, "exp": 4102444800})  # a personal access token


def png_bytes(width=40, height=20, color=(255, 0, 0)) -> bytes:
    """A PNG of one RGB colour."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = color[::-1]  # cv2 writes BGR
    return _encode_png(image)


def noise_png_bytes(width: int, height: int, seed: int) -> bytes:
    """A PNG of random RGB pixels, the same for the same seed."""
    rgb = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return _encode_png(np.ascontiguousarray(rgb[..., ::-1]))


def _encode_png(bgr: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", bgr)
    assert ok
    return data.tobytes()


# --------------------------------------------------------------------------------------------------------------
# A fake Label Studio
# --------------------------------------------------------------------------------------------------------------

class FakeLabelStudio:
    """Label Studio 1.23 on loopback (Flask in a thread), as much of it as the tests use. Serving from creation
    (routes added to ``app`` before the first request count) until ``close()`` or the end of a ``with``.

    Auth: ``Token <token>`` (refused when ``legacy_enabled`` is False, as in a JWT-only organisation) or
    ``Bearer <access token>`` from ``POST /api/token/refresh/`` with ``PAT``; bump ``generation`` to revoke the
    access tokens issued so far. Everything but the token refresh, ``/signed/`` and ``/public/`` needs it.

    Images: ``/data/upload/<project>/<name>`` serves ``images[name]`` (each task's ``img<id>.png``, 200x100
    noise; tests add clips there too); any other name is a 64x48 red PNG, except ``missing.*`` (404),
    ``page.png`` (an HTML page) and ``slow.png`` (1.5 s late). ``/data/local-files/?d=photos/a.png`` (30x10),
    ``/tasks/<id>/presign/?fileuri=`` for ``s3://bucket/dir/c.png`` (a redirect to a 20x20 PNG),
    ``/public/<name>`` (12x34, no key needed).

    API: one project (``project``); ``tasks`` (with their ``annotations``) listed by ``/api/tasks`` and exported
    by ``/api/projects/<id>/export`` (their ``predictions`` by id, as 1.23 does; ``GET /api/predictions`` lists
    them in full); ``POST /api/predictions`` kept in ``predictions``; ``model-versions``
    (extended: the versions of ``predictions`` and ``ml_backends``, by default one at FAKE_BACKEND_URL);
    PATCHing the project's ``model_version`` is refused until a prediction of that version is stored
    (``patch_attempts``: every PATCH asked, ``patches``: the accepted ones); clearing ``api_open`` holds the
    project API's answers until it is set.

    Recorded: ``hits`` (per path and query), ``auth_seen`` (the Authorization header of each image request),
    ``refreshes``.
    """

    def __init__(self, tasks: Sequence[dict] = (), project_id: int = 1, model_version: str = "yolov7 backend",
                 token: str = LEGACY, legacy_enabled: bool = True):
        self.token = token
        self.legacy_enabled = legacy_enabled
        self.generation = 0
        self.refreshes = 0
        self.hits: dict[str, int] = {}
        self.auth_seen: list = []
        self.project = {"id": project_id, "label_config": FIRE_SMOKE_CONFIG, "model_version": model_version}
        self.tasks = list(tasks)
        self.images = {f"img{t['id']}.png": noise_png_bytes(200, 100, t["id"]) for t in self.tasks}
        self.predictions: list[dict] = []
        self.patch_attempts: list[str] = []
        self.patches: list[str] = []
        self.ml_backends: list[dict] = [{"id": 1, "url": FAKE_BACKEND_URL, "project": project_id}]
        self.api_open = threading.Event()  # clear it to hold the project API's answers (a slow Label Studio)
        self.api_open.set()
        self.app = self._build_app()
        self._start()

    # --- auth -----------------------------------------------------------------------------------------------
    def authorised(self) -> bool:
        header = request.headers.get("Authorization", "")
        if header == f"Token {self.token}":
            return self.legacy_enabled
        if header.startswith("Bearer "):
            try:
                payload = json.loads(base64.urlsafe_b64decode(header[7:].split(".")[1] + "=="))
            except (IndexError, ValueError):
                return False
            return payload.get("gen") == self.generation and payload.get("token_type") == "access"
        return False

    @staticmethod
    def refused() -> Response:
        return Response('{"detail":"Authentication credentials were not provided."}', 401,
                        mimetype="application/json")

    def _build_app(self) -> Flask:
        app = Flask("fake-label-studio")
        open_paths = ("/api/token/refresh/", "/signed/", "/public/")

        @app.before_request
        def count_and_guard():
            self.hits[request.full_path] = self.hits.get(request.full_path, 0) + 1
            if request.path.startswith(open_paths) or request.path.endswith("/missing.png"):
                return None
            if request.path.startswith("/data/"):
                self.auth_seen.append(request.headers.get("Authorization"))
            return None if self.authorised() else self.refused()

        @app.post("/api/token/refresh/")
        def refresh():
            self.refreshes += 1
            if (request.get_json(silent=True) or {}).get("refresh") != PAT:
                return Response('{"detail":"Token is invalid"}', 401, mimetype="application/json")
            return {"access": fake_jwt({"token_type": "access", "gen": self.generation, "exp": time.time() + 300})}

        @app.get("/data/upload/<int:project>/<name>")
        def upload(project, name):
            if name in self.images:
                return Response(self.images[name], mimetype="image/png")
            if name.startswith("missing."):
                return Response("not found", 404)
            if name == "page.png":
                return Response(b"<!DOCTYPE html><html>login</html>", mimetype="text/html")
            if name == "slow.png":
                time.sleep(1.5)
            return Response(png_bytes(64, 48), mimetype="image/png")

        @app.get("/data/local-files/")
        def local_files():
            return Response(png_bytes(30, 10) if request.args.get("d") == "photos/a.png" else b"",
                            mimetype="image/png")

        @app.get("/tasks/<int:task>/presign/")
        def presign(task):
            uri = base64.urlsafe_b64decode(request.args["fileuri"]).decode()
            assert uri == "s3://bucket/dir/c.png"
            return redirect(f"/signed/{task}/c.png?sig=xyz", 302)

        @app.get("/signed/<int:task>/c.png")
        def signed(task):
            return Response(png_bytes(20, 20), mimetype="image/png")

        @app.get("/public/<name>")
        def public(name):
            self.auth_seen.append(request.headers.get("Authorization"))
            return Response(png_bytes(12, 34), mimetype="image/png")

        @app.route("/api/projects/<int:pid>/", methods=["GET", "PATCH"], strict_slashes=False)
        def project(pid):
            self.api_open.wait(30)
            if pid != self.project["id"]:
                abort(404)
            if request.method == "PATCH":
                version = request.get_json()["model_version"]
                self.patch_attempts.append(version)
                if not any(p.get("model_version") == version for p in self.predictions):
                    return jsonify(detail="Validation error",
                                   validation_errors={"model_version": ["Model version doesn't exist"]}), 400
                self.patches.append(version)
                self.project["model_version"] = version
            return jsonify(self.project)

        @app.get("/api/projects/<int:pid>/model-versions/", strict_slashes=False)
        def model_versions(pid):
            self.api_open.wait(30)
            if pid != self.project["id"]:
                abort(404)
            counts: dict = {}
            for p in self.predictions:
                counts[p.get("model_version")] = counts.get(p.get("model_version"), 0) + 1
            static = [{"model_version": v, "count": n, "latest": None} for v, n in counts.items()]
            return jsonify(static=static, live=self.ml_backends) if request.args.get("extended") == "true" \
                else jsonify(counts)

        @app.get("/api/projects/<int:pid>/export", strict_slashes=False)
        def export(pid):  # as 1.23 exports them: a task's predictions by id
            return jsonify([{**t, "predictions": [p.get("id") for p in t.get("predictions") or []]}
                            for t in self.tasks if t["annotations"]])

        @app.get("/api/predictions", strict_slashes=False)
        def prediction_list():  # the tasks' own predictions in full (``?project=``), with their task's id
            return jsonify([{**p, "task": t["id"]} for t in self.tasks for p in t.get("predictions") or []])

        @app.get("/api/tasks", strict_slashes=False)
        def task_list():
            page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
            listed = [{"id": t["id"], "data": t["data"], "is_labeled": bool(t["annotations"]),
                       "total_annotations": len(t["annotations"])} for t in self.tasks]
            return jsonify(tasks=listed[(page - 1) * size:page * size], total=len(listed))

        @app.post("/api/predictions", strict_slashes=False)
        def predictions():
            self.predictions.append(request.get_json())
            return jsonify(id=len(self.predictions)), 201

        return app

    # --- running --------------------------------------------------------------------------------------------
    def _start(self) -> None:
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.other_host_url = f"http://localhost:{self.server.server_port}"  # the same server, another host name
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)

    def __enter__(self) -> "FakeLabelStudio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# A foreign host that records everything it is sent
# --------------------------------------------------------------------------------------------------------------

class RecordingServer:
    """A host that is not Label Studio, on loopback: answers any GET with a small PNG and any other method with
    ``{}``, and keeps each request's raw head and body in ``requests`` (bytes), whatever its path, so a test can
    look for a key anywhere in what arrived. ``url``; ``close()`` or a ``with`` ends it."""

    def __init__(self, host: str = "127.0.0.1"):
        import http.server

        recorded = self.requests = []
        image = png_bytes(16, 16)

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bytes, mime: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(min(length, 1 << 20)) if length else b""
                recorded.append(self.requestline.encode() + b"\r\n" + bytes(self.headers) + payload)
                self.send_response(200)
                self.send_header("Content-Type", mime)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._answer(image, "image/png")

            def do_POST(self):
                self._answer(b"{}", "application/json")

            do_PATCH = do_PUT = do_DELETE = do_POST

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def saw(self, secret: str) -> bool:
        """Whether ``secret`` (a key, or a token derived from it) arrived in any request."""
        return any(secret.encode() in raw for raw in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def __enter__(self) -> "RecordingServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
