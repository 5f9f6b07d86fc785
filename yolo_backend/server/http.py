"""What the routes share: reading a request's JSON into checked values (``BadRequest`` says what is wrong), the
server's per-app state (``ServerState``) and its counters. No routes here (``routes.py``), no app (``app.py``)."""

from __future__ import annotations

import inspect
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from flask import current_app, request

from ..labelstudio.config import LabelConfigError, parse_label_config
from ..labelstudio.urls import shorten
from ..runtime import BackendContext
from .base import LabelStudioMLBase, parse_project_id

# The backend constructor's own arguments: user JSON never replaces them.
SETUP_ARGUMENTS = frozenset(inspect.signature(LabelStudioMLBase.__init__).parameters) - {"kwargs"}
# predict(tasks, **kwargs): ``tasks`` is ours.
PREDICT_ARGUMENTS = frozenset({"self", "tasks"})
# RQ's own rule for job ids (letters, digits, '_' and '-'): train-<project>-<hex>, pool-<project>-<hex>, uuids.
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class BadRequest(ValueError):
    """The request body is not what the endpoint expects; the message says what is wrong."""


# --- the request's values --------------------------------------------------------------------------------------
def json_body(required: bool = True) -> dict:
    """The request's JSON object ({} for an empty body when not ``required``)."""
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


def optional_body() -> dict:
    """A POST's JSON object, or {} for a GET (whose arguments are in the query string)."""
    return json_body(required=False) if request.method == "POST" else {}


def project_id_of(value: Any) -> Optional[int]:
    try:
        return parse_project_id(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def job_id_of(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise BadRequest("'job' must be a job id string")
    job = str(value)
    if not _JOB_ID.match(job):
        raise BadRequest(f"'job' {shorten(job, 80)!r} is not a job id (letters, digits, '_' and '-'; a job id "
                         "looks like train-3-1a2b3c4d5e6f)")
    return job


def keyword_arguments(value: Any, reserved: frozenset) -> dict:
    """Free JSON a user typed (``extra_params``, ``params``) as keyword arguments for the backend: only names that
    can be keywords and are not the server's own arguments (those would clash with them)."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and k.isidentifier() and k not in reserved}


def checked_tasks(tasks: Any) -> list[dict]:
    if not isinstance(tasks, list):
        raise BadRequest(f"'tasks' must be a list of tasks, got {type(tasks).__name__}")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise BadRequest(f"tasks[{i}] must be an object, got {type(task).__name__}")
        if not isinstance(task.get("data"), dict):
            raise BadRequest(f"tasks[{i}] has no 'data' object (a task looks like "
                             "{\"id\": 1, \"data\": {\"image\": \"/data/upload/...\"}})")
    return tasks


def optional_string(body: dict, key: str, what: str) -> Optional[str]:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"'{key}' must be {what}")
    return value


def usable_config(config: Any) -> Optional[str]:
    """A label config for a training event's backend, or None when it cannot be parsed (training events are
    acknowledged regardless; the training job reports config problems)."""
    if not isinstance(config, str):
        return None
    try:
        parse_label_config(config)
    except LabelConfigError:
        return None
    return config


# --- the server's state ----------------------------------------------------------------------------------------
class Counters:
    """The request counters /metrics shows (thread-safe)."""

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


@dataclass
class ServerState:
    """One per app (``app.extensions["ml_backend"]``): the process's context, the backend class it serves and what
    the routes count and bound."""

    context: BackendContext
    backend_class: type[LabelStudioMLBase]
    backend_kwargs: dict
    predict_slots: threading.BoundedSemaphore
    predict_metrics: Any  # dashboard.PredictMetrics (prometheus-client: imported only to serve)
    counters: Counters = field(default_factory=Counters)
    warmed: threading.Event = field(default_factory=threading.Event)

    def backend(self, **kwargs: Any) -> LabelStudioMLBase:
        """A backend instance for one request (the classic contract: one per request)."""
        return self.backend_class(context=self.context, **{**self.backend_kwargs, **kwargs})


def state() -> ServerState:
    """The current app's ServerState."""
    return current_app.extensions["ml_backend"]
