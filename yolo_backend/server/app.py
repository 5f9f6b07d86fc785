"""The classic ML-backend HTTP contract as Label Studio 1.23 speaks it (see docs/label-studio-contract.md).

    GET  /health          {"status": "UP", "model_class": ...}        fast, never loads a model
    GET  /                the same JSON; a browser (Accept: text/html) gets the dashboard (dashboard.py)
    GET  /dashboard, /status, /prometheus                             dashboard page, its JSON, Prometheus metrics
    POST /setup           {"model_version": ...}                      fast, never loads a model
    POST /predict         {"results": [one item per task], "model_version": ...}
    POST /webhook         {} (training triggers go to the backend's training seam)
    POST /train           {"job": id or null}                          legacy training trigger
    GET|POST /versions    {"versions": [...], "model_version": ...}
    GET|POST /is_training, /job_status, GET /metrics, POST /validate

Bad input answers 400 with a message saying what is wrong; unexpected errors answer 500 JSON and are logged with
the traceback; the process never dies on a request. Optional HTTP Basic Auth (BASIC_AUTH_USER / BASIC_AUTH_PASS)
guards everything except /health (container health checks); a refusal is logged, one line per AUTH_LOG_EVERY_S.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from typing import Any, Optional

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..errors import RequestRefused
from ..labelstudio.config import LabelConfigError
from ..model_holder import NoModelError
from ..registry import RegistryError
from ..runtime import BackendContext
from ..settings import Settings
from .base import LabelStudioMLBase
from .http import BadRequest, ServerState, state
from .routes import api, error

log = logging.getLogger(__name__)

# Security headers on every answer: browsers take JSON as JSON only, and no page of ours leaks its URL onwards.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
AUTH_LOG_EVERY_S = 10.0  # refused Basic Auth: one WARNING line per this many seconds (a scanner must not flood)


class Every:
    """``now()`` is True at most once per ``seconds`` (for a log line that a flood of requests must not repeat)."""

    def __init__(self, seconds: float):
        self.seconds, self._lock = seconds, threading.Lock()
        self._last: Optional[float] = None

    def now(self) -> bool:
        with self._lock:
            at = time.monotonic()
            if self._last is not None and at - self._last < self.seconds:
                return False
            self._last = at
            return True


def create_app(backend_class: type[LabelStudioMLBase], settings: Optional[Settings] = None,
               context: Optional[BackendContext] = None, **backend_kwargs: Any) -> Flask:
    """The Flask app serving ``backend_class`` (handed in, as the classic ``init_app(model_class=...)`` is: e.g.
    ``yolo_backend.backend.YOLOv7Backend``; the server layer knows no backend of its own).

    Creating it loads no model and touches no CUDA (gunicorn imports it in the master). ``backend_kwargs`` go to
    every backend instance (``_wsgi.py --with KEY=VALUE``).
    """
    if not isinstance(backend_class, type) or not issubclass(backend_class, LabelStudioMLBase):
        raise TypeError(f"create_app needs the backend class (a LabelStudioMLBase subclass), got {backend_class!r}")
    context = context or BackendContext.from_settings(settings)
    from .dashboard import PredictMetrics, register_dashboard  # prometheus-client: only to serve

    app = Flask(__name__)
    # keep Label Studio's field order readable in logs (Flask's DefaultJSONProvider has sort_keys)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["MAX_CONTENT_LENGTH"] = int(context.settings.max_request_mb * 1024 * 1024)
    # Predictions wait on downloads and the CPU; bounding them keeps threads free for /health and /setup.
    app.extensions["ml_backend"] = ServerState(
        context, backend_class, dict(backend_kwargs),
        predict_slots=threading.BoundedSemaphore(context.settings.max_concurrent_predicts),
        predict_metrics=PredictMetrics())
    app.extensions["ml_backend_auth_refusals"] = Every(AUTH_LOG_EVERY_S)
    app.before_request(_guard)
    app.after_request(_security_headers)
    _register_error_handlers(app)
    app.register_blueprint(api)
    register_dashboard(app, context, health_view=app.view_functions["ml_backend.health"],
                       predict_metrics=app.extensions["ml_backend"].predict_metrics)  # GET / for browsers
    return app


# --- around every request ------------------------------------------------------------------------------------
def _guard() -> Optional[Response]:
    """Count the request, warm the model version up once, and ask for Basic Auth (all but /health)."""
    s = state()
    s.counters.add(requests=1)
    if not s.warmed.is_set():
        # Hash the checkpoint for its version name in the background, so the first /setup is fast. Done here,
        # after any gunicorn fork, never at import.
        s.warmed.set()
        threading.Thread(target=_warm_up, args=(s.context,), name="model-version-warm-up", daemon=True).start()
    settings = s.context.settings
    if not settings.basic_auth_user or request.path == "/health":
        return None
    auth = request.authorization
    ok = (auth is not None and auth.type == "basic"
          and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
          and hmac.compare_digest((auth.password or "").encode(), (settings.basic_auth_pass or "").encode()))
    if ok:
        return None
    if current_app.extensions["ml_backend_auth_refusals"].now():
        # A refused /webhook is a training that never starts, and Label Studio's UI does not say why.
        log.warning("401 %s %s: %s; set the same user and password as BASIC_AUTH_USER/BASIC_AUTH_PASS in Label "
                    "Studio's model connection (Settings -> Model -> edit -> Basic Auth); at most one such line "
                    "per %g s", request.method, request.path[:200],
                    "no Basic Auth credentials" if auth is None else "wrong Basic Auth user or password",
                    AUTH_LOG_EVERY_S)
    response = jsonify(error="authentication required: this ML backend uses HTTP Basic Auth; set the same user "
                             "and password in Label Studio's model connection (Basic Auth)")
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
    return response


def _warm_up(context: BackendContext) -> None:
    try:
        context.models.version(None)
    except Exception as exc:  # reported properly when a request needs it
        log.debug("model version warm-up: %s", exc)


def _security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# --- errors ----------------------------------------------------------------------------------------------------
def _register_error_handlers(app: Flask) -> None:
    app.register_error_handler(BadRequest, _bad_request)
    app.register_error_handler(LabelConfigError, _bad_config)
    app.register_error_handler(NoModelError, _no_model)
    app.register_error_handler(RequestRefused, _refused)
    app.register_error_handler(RequestEntityTooLarge, _too_large)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)


def _bad_request(exc: BadRequest):
    log.warning("400 %s %s: %s", request.method, request.path, exc)
    return error(400, str(exc))


def _bad_config(exc: LabelConfigError):
    log.warning("400 %s %s: label config: %s", request.method, request.path, exc)
    return error(400, f"label config: {exc}")


def _no_model(exc: NoModelError):
    log.error("503 %s %s: %s", request.method, request.path, exc)
    return error(503, str(exc))


def _refused(exc: RequestRefused):
    log.warning("%d %s %s: %s", exc.status, request.method, request.path, exc)
    return error(exc.status, str(exc))


def _too_large(exc: RequestEntityTooLarge):
    limit = state().context.settings.max_request_mb
    log.warning("413 %s %s: body of %s bytes is larger than MAX_REQUEST_MB=%g", request.method, request.path,
                request.content_length, limit)
    return error(413, f"the request body is larger than MAX_REQUEST_MB={limit:g} MiB; send fewer tasks at once or "
                      "raise MAX_REQUEST_MB")


def _http_error(exc: HTTPException):
    return error(exc.code or 500, f"{exc.name}: {exc.description}")


def _unexpected(exc: Exception):
    state().counters.add(errors=1)
    if isinstance(exc, RegistryError):
        log.error("500 %s %s: %s", request.method, request.path, exc)
    else:
        log.exception("500 %s %s: unexpected error", request.method, request.path)
    return error(500, f"{type(exc).__name__}: {exc}")
