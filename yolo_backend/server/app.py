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
guards everything except /health (container health checks).
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import re
import threading
import time
from typing import Any, Optional

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..errors import RequestRefused
from ..labelstudio.config import LabelConfigError, find_rectangle_target, parse_label_config
from ..labelstudio.connection import Link
from ..labelstudio.results import is_failed_prediction
from ..labelstudio.urls import shorten
from ..registry import RegistryError
from ..settings import Settings
from ..runtime import BackendContext
from .base import NO_MODEL_VERSION, LabelStudioMLBase, parse_project_id
from ..model_holder import NoModelError

log = logging.getLogger(__name__)


# Label configs remembered from /setup (oldest forgotten first; Label Studio sends the config with every /predict).
MAX_REMEMBERED_PROJECTS = 1000
# How long a /predict waits for a free slot before answering 503 (smooths bursts without holding threads long).
PREDICT_SLOT_WAIT_S = 1.0


class BadRequest(ValueError):
    """The request body is not what the endpoint expects; the message says what is wrong."""


def _json_body(required: bool = True) -> dict:
    raw = request.get_data(cache=True)
    if not raw.strip():
        if required:
            raise BadRequest("the request body is empty; send a JSON object (Content-Type: application/json)")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply to be a Label Studio request") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _project_id(value: Any) -> Optional[int]:
    try:
        return parse_project_id(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


# RQ's own rule for job ids (letters, digits, '_' and '-'): train-<project>-<hex>, pool-<project>-<hex>, uuids.
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _job_id(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise BadRequest("'job' must be a job id string")
    job = str(value)
    if not _JOB_ID.match(job):
        raise BadRequest(f"'job' {shorten(job, 80)!r} is not a job id (letters, digits, '_' and '-'; a job id "
                         "looks like train-3-1a2b3c4d5e6f)")
    return job


def _keyword_arguments(value: Any, reserved: frozenset) -> dict:
    """Free JSON a user typed (``extra_params``, ``params``) as keyword arguments for the backend: only names that
    can be keywords and are not the server's own arguments (those would clash with them)."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and k.isidentifier() and k not in reserved}


def _validate_tasks(tasks: Any) -> list[dict]:
    if not isinstance(tasks, list):
        raise BadRequest(f"'tasks' must be a list of tasks, got {type(tasks).__name__}")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise BadRequest(f"tasks[{i}] must be an object, got {type(task).__name__}")
        if not isinstance(task.get("data"), dict):
            raise BadRequest(f"tasks[{i}] has no 'data' object (a task looks like "
                             "{\"id\": 1, \"data\": {\"image\": \"/data/upload/...\"}})")
    return tasks


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, float] = {"requests": 0, "predict_requests": 0, "tasks_predicted": 0,
                                         "tasks_failed": 0, "predict_busy": 0, "errors": 0,
                                         "last_predict_seconds": 0.0}

    def add(self, **amounts: float) -> None:
        with self._lock:
            for key, amount in amounts.items():
                self.values[key] = self.values.get(key, 0) + amount

    def set(self, **values: float) -> None:
        with self._lock:
            self.values.update(values)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.values)


# The backend constructor's own arguments: user JSON never replaces them.
_SETUP_ARGUMENTS = frozenset(inspect.signature(LabelStudioMLBase.__init__).parameters) - {"kwargs"}
# predict(tasks, **kwargs): ``tasks`` is ours.
_PREDICT_ARGUMENTS = frozenset({"self", "tasks"})
# Security headers on every answer: browsers take JSON as JSON only, and no page of ours leaks its URL onwards.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def create_app(backend_class: type[LabelStudioMLBase], settings: Optional[Settings] = None,
               context: Optional[BackendContext] = None, **backend_kwargs: Any) -> Flask:
    """The Flask app serving ``backend_class`` (handed in, as the classic ``init_app(model_class=...)`` is: e.g.
    ``yolo_backend.backend.YOLOv7Backend``; the server layer knows no backend of its own).

    Creating it loads no model and touches no CUDA (gunicorn imports it in the master). ``backend_kwargs`` go to
    every backend instance (``_wsgi.py --with KEY=VALUE``).
    """
    if not isinstance(backend_class, type) or not issubclass(backend_class, LabelStudioMLBase):
        raise TypeError(f"create_app needs the backend class (a LabelStudioMLBase subclass), got {backend_class!r}")
    if context is None:
        context = BackendContext.from_settings(settings)
    settings = context.settings
    app = Flask(__name__)
    app.json.sort_keys = False  # keep Label Studio's field order readable in logs
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_request_mb * 1024 * 1024)
    # Predictions wait on downloads and the CPU; bounding them keeps threads free for /health and /setup.
    predict_slots = threading.BoundedSemaphore(settings.max_concurrent_predicts)
    app.extensions["ml_backend"] = {"context": context, "backend_class": backend_class}
    counters = _Counters()
    from .dashboard import PredictMetrics, register_dashboard, version_details  # prometheus-client: only to serve

    predict_metrics = PredictMetrics()
    warmed = threading.Event()

    def make_backend(**kwargs: Any) -> LabelStudioMLBase:
        return backend_class(context=context, **{**backend_kwargs, **kwargs})

    # --- cross-cutting ------------------------------------------------------------------------------------
    @app.before_request
    def _guard() -> Optional[Response]:
        counters.add(requests=1)
        if not warmed.is_set():
            # Hash the checkpoint for its version name in the background, so the first /setup is fast. Done
            # here, after any gunicorn fork, never at import.
            warmed.set()
            threading.Thread(target=_warm_up, name="model-version-warm-up", daemon=True).start()
        if settings.basic_auth_user and request.path != "/health":
            auth = request.authorization
            ok = (auth is not None and auth.type == "basic"
                  and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
                  and hmac.compare_digest((auth.password or "").encode(), (settings.basic_auth_pass or "").encode()))
            if not ok:
                response = jsonify(error="authentication required: this ML backend uses HTTP Basic Auth; set the "
                                         "same user and password in Label Studio's model connection (Basic Auth)")
                response.status_code = 401
                response.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
                return response
        return None

    @app.after_request
    def _security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _check_connected(project_id: Optional[int], what: str) -> None:
        """With a key for Label Studio's API, the backend acts only for projects that have it connected: 403
        otherwise, and 400 for a request that does not say which project (Label Studio always does)."""
        if context.client() is None:
            return
        if project_id is None:
            raise BadRequest(f"send the project id (\"project\": <id>, as Label Studio does) to {what}: with "
                             "LABEL_STUDIO_URL set the backend acts only for projects that have it connected")
        answer = context.connection.check(project_id)
        if answer.state is Link.NOT_CONNECTED:
            raise RequestRefused(403, answer.why)

    def _warm_up() -> None:
        try:
            context.models.version(None)
        except Exception as exc:  # reported properly when a request needs it
            log.debug("model version warm-up: %s", exc)

    def _error(status: int, message: str) -> tuple[Response, int]:
        return jsonify(error=message, status=status), status

    @app.errorhandler(BadRequest)
    def _bad_request(exc: BadRequest):
        log.warning("400 %s %s: %s", request.method, request.path, exc)
        return _error(400, str(exc))

    @app.errorhandler(LabelConfigError)
    def _bad_config(exc: LabelConfigError):
        log.warning("400 %s %s: label config: %s", request.method, request.path, exc)
        return _error(400, f"label config: {exc}")

    @app.errorhandler(NoModelError)
    def _no_model(exc: NoModelError):
        log.error("503 %s %s: %s", request.method, request.path, exc)
        return _error(503, str(exc))

    @app.errorhandler(RequestRefused)
    def _refused(exc: RequestRefused):
        log.warning("%d %s %s: %s", exc.status, request.method, request.path, exc)
        return _error(exc.status, str(exc))

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge):
        log.warning("413 %s %s: body of %s bytes is larger than MAX_REQUEST_MB=%g", request.method, request.path,
                    request.content_length, settings.max_request_mb)
        return _error(413, f"the request body is larger than MAX_REQUEST_MB={settings.max_request_mb:g} MiB; send "
                           "fewer tasks at once or raise MAX_REQUEST_MB")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return _error(exc.code or 500, f"{exc.name}: {exc.description}")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        counters.add(errors=1)
        if isinstance(exc, RegistryError):
            log.error("500 %s %s: %s", request.method, request.path, exc)
        else:
            log.exception("500 %s %s: unexpected error", request.method, request.path)
        return _error(500, f"{type(exc).__name__}: {exc}")

    # --- endpoints ------------------------------------------------------------------------------------------
    @app.get("/health")
    def health():
        try:  # which deployment this is: how the backend recognises itself among a project's ML backends
            return jsonify(status="UP", model_class=backend_class.__name__, instance=context.instance())
        except OSError as exc:  # MODEL_DIR not writable yet: still up
            log.debug("no instance id: %s", exc)
            return jsonify(status="UP", model_class=backend_class.__name__)

    @app.post("/setup")
    def setup():
        body = _json_body()
        project_id = _project_id(body.get("project"))
        schema = body.get("schema") or body.get("label_config")
        if schema is not None and not isinstance(schema, str):
            raise BadRequest("'schema' must be the label config XML as a string")
        hostname, access_token = body.get("hostname"), body.get("access_token")
        if hostname is not None and not isinstance(hostname, str):
            raise BadRequest("'hostname' must be a string URL")
        if access_token is not None and not isinstance(access_token, str):
            raise BadRequest("'access_token' must be a string")
        if schema:
            parse_label_config(schema)  # parsed before it is kept: LabelConfigError (400) says what is wrong
        context.session.update_from_setup(hostname, access_token)
        if project_id is not None and schema:
            context.label_configs.pop(project_id, None)
            context.label_configs[project_id] = schema
            while len(context.label_configs) > MAX_REMEMBERED_PROJECTS:  # /setup needs no key: made-up ids
                context.label_configs.pop(next(iter(context.label_configs)))
        # Extra params are free JSON typed by the user in Label Studio: never let them replace our own arguments.
        extra = _keyword_arguments(body.get("extra_params"), _SETUP_ARGUMENTS)
        backend = make_backend(project_id=body.get("project"), label_config=schema, hostname=hostname,
                               access_token=access_token, **extra)
        version = backend.model_version
        # Label Studio resets the project's version to the backend title on (re)connect: check again.
        if version != NO_MODEL_VERSION:
            context.version_sync.request(project_id, version, recheck=True)
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict():
        request.get_data(cache=True)  # the whole body first: a slow sender must not hold a prediction slot
        if not predict_slots.acquire(timeout=PREDICT_SLOT_WAIT_S):
            counters.add(predict_busy=1)
            log.warning("503 /predict: %d predictions already running (MAX_CONCURRENT_PREDICTS)",
                        settings.max_concurrent_predicts)
            return _error(503, f"busy: {settings.max_concurrent_predicts} predictions are already running "
                               "(MAX_CONCURRENT_PREDICTS); try again in a moment")
        try:
            return _predict()
        finally:
            predict_slots.release()

    def _predict():
        started = time.perf_counter()
        body = _json_body()
        tasks = _validate_tasks(body.get("tasks"))
        project_id = _project_id(body.get("project"))
        label_config = body.get("label_config") or context.label_configs.get(project_id)
        if not isinstance(label_config, str) or not label_config.strip():
            raise BadRequest("'label_config' is missing: send the project's label config XML (Label Studio "
                             "sends it with every /predict) or call /setup with 'schema' first")
        params = _keyword_arguments(body.get("params"), _PREDICT_ARGUMENTS)
        _check_connected(project_id, "predict with its key")
        backend = make_backend(project_id=body.get("project"), label_config=label_config)
        results = backend.predict(tasks, **params)
        if not isinstance(results, list) or len(results) != len(tasks):
            count = len(results) if isinstance(results, list) else type(results).__name__
            raise RuntimeError(f"{backend_class.__name__}.predict returned {count} predictions for {len(tasks)} "
                               "tasks; it must return one per task, in task order")
        predict_metrics.predicted(results)
        version = backend.model_version
        elapsed = time.perf_counter() - started
        failed = sum(1 for item in results if is_failed_prediction(item))
        counters.add(predict_requests=1, tasks_predicted=len(tasks) - failed, tasks_failed=failed)
        counters.set(last_predict_seconds=round(elapsed, 4))
        leftovers = getattr(backend, "deadline_leftovers", 0)
        unavailable = failed - leftovers
        log.info("predicted %d task(s) for project %s with %s in %.2f s%s%s", len(tasks) - failed, project_id,
                 version, elapsed, f"; {leftovers} left at PREDICT_DEADLINE_S" if leftovers else "",
                 f"; {unavailable} without prediction (image not available, see above)" if unavailable else "")
        # Label Studio stores these after our reply; then the project's version can be switched to ours.
        if version != NO_MODEL_VERSION and failed < len(tasks):
            context.version_sync.request(project_id, version)
        # Tasks left at PREDICT_DEADLINE_S: pool scoring stores their predictions (it skips what is stored).
        if leftovers and context.training is not None and project_id is not None:
            try:
                answered = sum(1 for item in results if "result" in item)  # Label Studio stores empty ones too
                queued = context.training.request_pool_scoring(project_id, "predict deadline", reply_stored=answered)
                log.info("%d task(s) past PREDICT_DEADLINE_S: pool scoring of project %s %s (job %s)",
                         backend.deadline_leftovers, project_id, queued.get("status"), queued.get("job"))
            except RequestRefused as exc:
                log.warning("tasks past PREDICT_DEADLINE_S not queued for pool scoring: %s", exc)
        return jsonify(results=results, model_version=version)

    @app.post("/score_pool")
    def score_pool():
        """Score every task of the project with the serving version and store the predictions (``jobs.pool``)."""
        body = _json_body()
        project_id = _project_id(body.get("project"))
        if project_id is None:
            raise BadRequest("send the project id: {\"project\": <id>}")
        if context.training is None:
            return _error(503, "this server has no training queue (Redis): run `python -m yolo_backend score-pool "
                               f"--project {project_id} --here` instead")
        _check_connected(project_id, "score its tasks")
        result = context.training.request_pool_scoring(project_id, "requested over HTTP")
        return jsonify(result), (202 if result.get("job") else 503)

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("'action' is missing: a Label Studio webhook body looks like "
                             "{\"action\": \"START_TRAINING\", \"project\": {...}}")
        project = body.get("project")
        project_id = _project_id(project)
        label_config = project.get("label_config") if isinstance(project, dict) else None
        backend = make_backend(project_id=project_id, label_config=_usable_config(label_config))
        result = backend.on_training_request(action, body)
        return jsonify(result or {})

    @app.post("/train")
    def train():
        body = _json_body()
        project_id = _project_id(body.get("project"))
        annotations = body.get("annotations", [])
        if not isinstance(annotations, list):
            raise BadRequest("'annotations' must be a list of tasks with their annotations")
        backend = make_backend(project_id=body.get("project"),
                               label_config=_usable_config(body.get("label_config")))
        result = backend.on_training_request("START_TRAINING", {**body, "source": "/train"}) or {}
        log.info("/train for project %s (%d annotated tasks) -> job %s", project_id, len(annotations),
                 result.get("job"))
        return jsonify({"job": result.get("job"), **result})

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        body = _json_body(required=False) if request.method == "POST" else {}
        project = body.get("project", request.args.get("project"))
        backend = make_backend(project_id=_project_id(project))
        names = backend.versions()
        # Without a project (Label Studio's model list) and no model for such requests: null, not a version name
        # that is not in the list.
        version = None if backend.model_version == NO_MODEL_VERSION else backend.model_version
        return jsonify(versions=names, model_version=version,
                       details=version_details(settings, backend.project_id, names))

    @app.route("/is_training", methods=["GET", "POST"])
    def is_training():
        body = _json_body(required=False) if request.method == "POST" else {}
        project = body.get("project", request.args.get("project"))
        backend = make_backend(project_id=_project_id(project))
        return jsonify(backend.training_status())

    @app.route("/job_status", methods=["GET", "POST"])
    def job_status():
        body = _json_body(required=False) if request.method == "POST" else {}
        job = _job_id(body.get("job", body.get("job_id", request.args.get("job"))))
        backend = make_backend(project_id=_project_id(body.get("project", request.args.get("project"))))
        return jsonify(backend.job_status(job))

    @app.get("/metrics")
    def metrics():
        backend = make_backend()
        return jsonify({**counters.snapshot(), "models_loaded": context.models.loaded_versions(),
                        "model_loads": context.models.loads, "training": backend.training_metrics()})

    @app.post("/validate")
    def validate():
        body = _json_body()
        config = body.get("config") or body.get("label_config") or body.get("schema")
        if not isinstance(config, str):
            raise BadRequest("send the label config XML as 'config'")
        target = find_rectangle_target(parse_label_config(config), settings.from_name)
        return jsonify(status="ok", from_name=target.from_name, to_name=target.to_name, labels=list(target.labels))

    register_dashboard(app, context, health_view=health, predict_metrics=predict_metrics)  # GET / for browsers
    return app


def _usable_config(config: Any) -> Optional[str]:
    """A label config for a training event's backend, or None when it cannot be parsed (training events are
    acknowledged regardless; the training job reports config problems)."""
    if not isinstance(config, str):
        return None
    try:
        parse_label_config(config)
    except LabelConfigError:
        return None
    return config

