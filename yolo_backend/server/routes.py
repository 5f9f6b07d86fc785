"""The endpoints of the classic ML-backend contract (see ``app.py`` for the list), as one Flask blueprint.

Each route reads its request (``http.py``), asks the backend instance of the request, and answers; what happens
around a prediction (the model-version sync, pool scoring for deadline leftovers) and which projects the backend
may act for are the small policy functions below the routes.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from flask import Blueprint, jsonify, request

from ..errors import RequestRefused
from ..labelstudio.config import parse_label_config
from ..labelstudio.controls import check_control_attributes, read_controls
from ..labelstudio.connection import Link
from ..labelstudio.results import is_failed_prediction
from ..labelstudio.video_controls import check_video_attributes, is_video_config, read_video_control
from .base import NO_MODEL_VERSION, Answer
from .http import (PREDICT_ARGUMENTS, SETUP_ARGUMENTS, BadRequest, ServerState, checked_tasks, job_id_of,
                   json_body, keyword_arguments, optional_body, optional_string, project_id_of, state,
                   usable_config)

log = logging.getLogger(__name__)

# Label configs remembered from /setup (oldest forgotten first; Label Studio sends the config with every /predict).
MAX_REMEMBERED_PROJECTS = 1000
# How long a /predict waits for a free slot before answering 503 (smooths bursts without holding threads long).
PREDICT_SLOT_WAIT_S = 1.0

api = Blueprint("ml_backend", __name__)


def error(status: int, message: str):
    return jsonify(error=message, status=status), status


# --- endpoints -------------------------------------------------------------------------------------------------
@api.get("/health")
def health():
    s = state()
    try:  # which deployment this is: how the backend recognises itself among a project's ML backends
        return jsonify(status="UP", model_class=s.backend_class.__name__, instance=s.context.instance())
    except OSError as exc:  # MODEL_DIR not writable yet: still up
        log.debug("no instance id: %s", exc)
        return jsonify(status="UP", model_class=s.backend_class.__name__)


@api.post("/setup")
def setup():
    s, body = state(), json_body()
    project_id = project_id_of(body.get("project"))
    schema = optional_string(body, "schema", "the label config XML as a string") or \
        optional_string(body, "label_config", "the label config XML as a string")
    hostname = optional_string(body, "hostname", "a string URL")
    access_token = optional_string(body, "access_token", "a string")
    if schema:  # parsed before it is kept: LabelConfigError (400) says what is wrong
        parsed = parse_label_config(schema)
        check_control_attributes(parsed)
        check_video_attributes(parsed)
        if is_video_config(parsed):  # a video object tracking project: its VideoRectangle and labels
            read_video_control(parsed, s.context.settings.from_name)
        elif parsed:  # control tags, but none the model serves (polygons): Connect Model says what is
            read_controls(parsed, s.context.settings.from_name)  # supported. An empty <View/> is a new project.
    s.context.session.update_from_setup(hostname, access_token)
    remember_config(s, project_id, schema)
    # Extra params are free JSON typed by the user in Label Studio: never let them replace our own arguments.
    extra = keyword_arguments(body.get("extra_params"), SETUP_ARGUMENTS)
    backend = s.backend(project_id=body.get("project"), label_config=schema, hostname=hostname,
                        access_token=access_token, **extra)
    version = backend.model_version
    # Label Studio resets the project's version to the backend title on (re)connect: check again.
    if version != NO_MODEL_VERSION:
        s.context.version_sync.request(project_id, version, recheck=True)
    return jsonify(model_version=version)


@api.post("/predict")
def predict():
    s = state()
    request.get_data(cache=True)  # the whole body first: a slow sender must not hold a prediction slot
    if not s.predict_slots.acquire(timeout=PREDICT_SLOT_WAIT_S):
        s.counters.add(predict_busy=1)
        limit = s.context.settings.max_concurrent_predicts
        log.warning("503 /predict: %d predictions already running (MAX_CONCURRENT_PREDICTS)", limit)
        return error(503, f"busy: {limit} predictions are already running (MAX_CONCURRENT_PREDICTS); try again "
                          "in a moment")
    try:
        return _predict(s)
    finally:
        s.predict_slots.release()


def _predict(s: ServerState):
    started = time.perf_counter()
    body = json_body()
    tasks = checked_tasks(body.get("tasks"))
    project_id = project_id_of(body.get("project"))
    label_config = body.get("label_config") or s.context.label_configs.get(project_id)
    if not isinstance(label_config, str) or not label_config.strip():
        raise BadRequest("'label_config' is missing: send the project's label config XML (Label Studio sends it "
                         "with every /predict) or call /setup with 'schema' first")
    params = keyword_arguments(body.get("params"), PREDICT_ARGUMENTS)
    require_connected(s, project_id, "predict with its key")
    backend = s.backend(project_id=body.get("project"), label_config=label_config)
    answer = backend.answer(tasks, **params)
    if not isinstance(answer.items, list) or len(answer.items) != len(tasks):
        count = len(answer.items) if isinstance(answer.items, list) else type(answer.items).__name__
        raise RuntimeError(f"{s.backend_class.__name__}.predict returned {count} predictions for {len(tasks)} "
                           "tasks; it must return one per task, in task order")
    after_prediction(s, project_id, answer, time.perf_counter() - started)
    return jsonify(results=answer.items, model_version=answer.model_version)


@api.post("/score_pool")
def score_pool():
    """Score every task of the project with the serving version and store the predictions (``jobs.pool``)."""
    s, body = state(), json_body()
    project_id = project_id_of(body.get("project"))
    if project_id is None:
        raise BadRequest("send the project id: {\"project\": <id>}")
    if s.context.training is None:
        return error(503, "this server has no training queue (Redis): run `python -m yolo_backend score-pool "
                          f"--project {project_id} --here` instead")
    require_connected(s, project_id, "score its tasks")
    result = s.context.training.request_pool_scoring(project_id, "requested over HTTP")
    return jsonify(result), (202 if result.get("job") else 503)


@api.post("/webhook")
def webhook():
    s, body = state(), json_body()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("'action' is missing: a Label Studio webhook body looks like "
                         "{\"action\": \"START_TRAINING\", \"project\": {...}}")
    project = body.get("project")
    label_config = project.get("label_config") if isinstance(project, dict) else None
    backend = s.backend(project_id=project_id_of(project), label_config=usable_config(label_config))
    return jsonify(backend.on_training_request(action, body) or {})


@api.post("/train")
def train():
    s, body = state(), json_body()
    project_id = project_id_of(body.get("project"))
    annotations = body.get("annotations", [])
    if not isinstance(annotations, list):
        raise BadRequest("'annotations' must be a list of tasks with their annotations")
    backend = s.backend(project_id=body.get("project"), label_config=usable_config(body.get("label_config")))
    result = backend.on_training_request("START_TRAINING", {**body, "source": "/train"}) or {}
    log.info("/train for project %s (%d annotated tasks) -> job %s", project_id, len(annotations),
             result.get("job"))
    return jsonify({"job": result.get("job"), **result})


@api.route("/versions", methods=["GET", "POST"])
def versions():
    from .dashboard import version_details  # prometheus-client: only to serve

    s, body = state(), optional_body()
    backend = s.backend(project_id=project_id_of(body.get("project", request.args.get("project"))))
    names = backend.versions()
    # Without a project (Label Studio's model list) and no model for such requests: null, not a version name that
    # is not in the list.
    version = None if backend.model_version == NO_MODEL_VERSION else backend.model_version
    return jsonify(versions=names, model_version=version,
                   details=version_details(s.context.settings, backend.project_id, names))


@api.route("/is_training", methods=["GET", "POST"])
def is_training():
    s, body = state(), optional_body()
    backend = s.backend(project_id=project_id_of(body.get("project", request.args.get("project"))))
    return jsonify(backend.training_status())


@api.route("/job_status", methods=["GET", "POST"])
def job_status():
    s, body = state(), optional_body()
    job = job_id_of(body.get("job", body.get("job_id", request.args.get("job"))))
    backend = s.backend(project_id=project_id_of(body.get("project", request.args.get("project"))))
    return jsonify(backend.job_status(job))


@api.get("/metrics")
def metrics():
    s = state()
    return jsonify({**s.counters.snapshot(), "models_loaded": s.context.models.loaded_versions(),
                    "model_loads": s.context.models.loads, "training": s.backend().training_metrics()})


@api.post("/validate")
def validate():
    s, body = state(), json_body()
    config = body.get("config") or body.get("label_config") or body.get("schema")
    if not isinstance(config, str):
        raise BadRequest("send the label config XML as 'config'")
    parsed = parse_label_config(config)
    if is_video_config(parsed):
        video = read_video_control(parsed, s.context.settings.from_name)
        return jsonify(status="ok", from_name=video.name, to_name=video.to_name, labels=list(video.labels),
                       controls=[video.name], media="video")
    controls = read_controls(parsed, s.context.settings.from_name)
    served = [*controls.rectangles, *controls.choices]
    return jsonify(status="ok", from_name=served[0].name, to_name=served[0].to_name, labels=list(controls.labels),
                   controls=[c.name for c in served])


# --- policy ----------------------------------------------------------------------------------------------------
def remember_config(s: ServerState, project_id: Optional[int], schema: Optional[str]) -> None:
    """Keep a project's label config from /setup for a /predict that comes without one; bounded, since /setup
    needs no key (made-up ids must not grow it)."""
    if project_id is None or not schema:
        return
    configs = s.context.label_configs
    configs.pop(project_id, None)
    configs[project_id] = schema
    while len(configs) > MAX_REMEMBERED_PROJECTS:
        configs.pop(next(iter(configs)))


def require_connected(s: ServerState, project_id: Optional[int], what: str) -> None:
    """With a key for Label Studio's API, the backend acts only for projects that have it connected: 403
    otherwise, and 400 for a request that does not say which project (Label Studio always does)."""
    if s.context.client() is None:
        return
    if project_id is None:
        raise BadRequest(f"send the project id (\"project\": <id>, as Label Studio does) to {what}: with "
                         "LABEL_STUDIO_URL set the backend acts only for projects that have it connected")
    answer = s.context.connection.check(project_id)
    if answer.state is Link.NOT_CONNECTED:
        raise RequestRefused(403, answer.why)


def after_prediction(s: ServerState, project_id: Optional[int], answer: Answer, elapsed: float) -> None:
    """Count and log a /predict, ask for the project's model_version to follow (Label Studio stores the reply
    after it; then the switch can succeed), and queue pool scoring for tasks left undone (PREDICT_DEADLINE_S)."""
    results, version, leftovers = answer.items, answer.model_version, answer.unfinished
    s.predict_metrics.predicted(results)
    failed = sum(1 for item in results if is_failed_prediction(item))
    s.counters.add(predict_requests=1, tasks_predicted=len(results) - failed, tasks_failed=failed)
    s.counters.set(last_predict_seconds=round(elapsed, 4))
    unavailable = failed - leftovers
    log.info("predicted %d task(s) for project %s with %s in %.2f s%s%s", len(results) - failed, project_id,
             version, elapsed, f"; {leftovers} left at PREDICT_DEADLINE_S" if leftovers else "",
             f"; {unavailable} without prediction (image or video not available, see above)" if unavailable else "")
    if version != NO_MODEL_VERSION and failed < len(results):
        s.context.version_sync.request(project_id, version)
    if leftovers and s.context.training is not None and project_id is not None:
        queue_leftovers(s, project_id, leftovers, answered=sum(1 for item in results if "result" in item))


def queue_leftovers(s: ServerState, project_id: int, leftovers: int, answered: int) -> None:
    """Tasks left at PREDICT_DEADLINE_S: a pool-scoring run stores their predictions (it skips what is stored, and
    first waits for Label Studio to store the ``answered`` items of this reply; it stores empty ones too)."""
    training = s.context.training
    assert training is not None  # the caller checks
    try:
        queued = training.request_pool_scoring(project_id, "predict deadline", reply_stored=answered)
        log.info("%d task(s) past PREDICT_DEADLINE_S: pool scoring of project %s %s (job %s)", leftovers,
                 project_id, queued.get("status"), queued.get("job"))
    except RequestRefused as exc:
        log.warning("tasks past PREDICT_DEADLINE_S not queued for pool scoring: %s", exc)
