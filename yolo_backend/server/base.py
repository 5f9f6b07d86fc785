"""``LabelStudioMLBase``: the classic ML-backend class API, so classic backends port over.

A backend subclasses it and implements ``predict(tasks, **kwargs)`` (and ``fit`` for training); see
``examples/minimal_backend.py``. The signatures are label-studio-ml 1.0.x's: ``LabelStudioMLBase(label_config=None,
train_output=None, **kwargs)``, ``fit(tasks, workdir=None, **kwargs)`` (``event``/``data``/``job_id`` as keywords for
a webhook event), ``get_local_path(url, project_dir=None)``. The server makes one instance per request, passing
``project_id``, ``hostname``, ``access_token`` and ``context`` by name; what must live longer than a request (the
loaded model, the image cache, Label Studio credentials) sits in a ``BackendContext`` shared by the process
(``yolo_backend.runtime``).

Classic attributes: ``project_id``, ``label_config``, ``parsed_label_config``, ``train_output``, ``hostname``,
``access_token``, ``model_version``; methods ``setup()``, ``predict()``, ``fit()``, ``get_local_path()``. The server
calls ``answer()`` (``predict()`` plus how many tasks were left undone, ``Answer``).

Seams for training (the queue/worker plugs in through ``BackendContext.training``): ``on_training_request``,
``training_status``, ``job_status``, ``training_metrics``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from ..labelstudio.config import parse_label_config
from ..model_holder import NoModelError
from ..registry import Registry, RegistryError
from ..runtime import BackendContext, default_context

log = logging.getLogger(__name__)

# The version a backend reports when it has no usable model (never synced to Label Studio).
NO_MODEL_VERSION = "no-model"


# Label Studio's project ids are positive database ids (a 32-bit signed integer column).
MAX_PROJECT_ID = 2**31 - 1


def parse_project_id(project: Any) -> Optional[int]:
    """Label Studio sends ``project`` as ``"<id>.<created_at epoch>"`` in ML calls, as an int or a dict with ``id``
    elsewhere. Returns the id (1 .. 2^31-1), or None when absent. Anything else -> ValueError saying what was
    expected."""
    if project is None or project == "":
        return None
    if isinstance(project, dict):
        return parse_project_id(project.get("id"))
    value: Optional[int] = None
    if isinstance(project, int) and not isinstance(project, bool):
        value = project
    elif isinstance(project, str):
        head = project.strip().split(".", 1)[0]
        if head.isascii() and head.isdigit() and len(head) <= 10:
            value = int(head)
    if value is None or not 1 <= value <= MAX_PROJECT_ID:
        raise ValueError(f"project {str(project)[:40]!r} is not a project id (expected a positive integer below "
                         "2^31, or \"<id>.<epoch>\" as Label Studio sends it)")
    return value


@dataclass
class Answer:
    """What a /predict answers: one item per task (in task order), the version they carry, and how many tasks the
    backend left undone (e.g. not reached by a deadline: their items have no ``result``, and the server queues pool
    scoring for them)."""

    items: list[dict]
    model_version: str
    unfinished: int = 0


class LabelStudioMLBase:
    """Base class of ML backends, with the classic constructor and attributes."""

    INITIAL_MODEL_VERSION = "0.0.1"

    def __init__(self, label_config: Optional[str] = None, train_output: Optional[dict] = None, *,
                 project_id: Any = None, hostname: Optional[str] = None, access_token: Optional[str] = None,
                 model_version: Optional[str] = None, context: Optional[BackendContext] = None, **kwargs: Any):
        """The classic constructor: ``label_config`` and ``train_output`` by position (label-studio-ml 1.0.x
        order), the rest by name. ``train_output`` None: the summary of the version serving the project."""
        self.context = context or default_context()
        settings = self.context.settings
        self.project = project_id                      # as Label Studio sent it ("<id>.<epoch>")
        self.project_id = parse_project_id(project_id)
        self.label_config = label_config or ""
        self.parsed_label_config = parse_label_config(self.label_config)
        self._train_output = train_output
        self.hostname = hostname or settings.label_studio_url or ""
        self.access_token = access_token or settings.label_studio_api_key or ""
        self.model_version = model_version or self.INITIAL_MODEL_VERSION
        self.extra_params = kwargs
        self.setup()

    @property
    def train_output(self) -> dict:
        """What training left for this project (classic): the dict given to the constructor, else the meta.json of
        the registry version serving the project (read on first use); {} when none serves from the registry."""
        if self._train_output is None:
            self._train_output = self._serving_version_meta()
        return self._train_output

    @train_output.setter
    def train_output(self, value: Optional[dict]) -> None:
        self._train_output = value or {}

    def _serving_version_meta(self) -> dict:
        try:
            source = self.context.models.source(self.project_id)
        except (NoModelError, RegistryError):
            return {}
        # A registry version is <registry>/<version name>/model.pt; a MODEL_PATH checkpoint has no summary.
        if source is None or source.path.parent.name != source.version:
            return {}
        try:
            return Registry(source.path.parent.parent).get(source.version).meta()
        except RegistryError:
            return {}

    # --- to override ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Called after construction: set ``self.model_version`` cheaply here (no model loading)."""

    def predict(self, tasks: list[dict], **kwargs: Any) -> list[dict]:
        """One prediction per task, in task order: ``{"result": [...], "score": float, "model_version": str}``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict()")

    def answer(self, tasks: list[dict], **kwargs: Any) -> Answer:
        """What the server's /predict answers: ``predict`` as the classic contract has it. A backend that can leave
        tasks undone overrides this to say how many."""
        items = self.predict(tasks, **kwargs)
        return Answer(items, self.model_version)

    def fit(self, tasks: Any = (), workdir: Optional[str] = None, **kwargs: Any) -> dict:
        """Train; returns a dict (the next ``train_output``). The classic signature: label-studio-ml's ``/train``
        calls ``fit(tasks, workdir)``, its ``process_event`` calls ``fit((), event=..., data=..., job_id=...)``
        for a webhook event (``training_event`` reads either). The base class does not train."""
        return {}

    # --- helpers --------------------------------------------------------------------------------------------
    @staticmethod
    def training_event(tasks: Any = (), workdir: Any = None, event: Optional[str] = None,
                       data: Optional[dict] = None) -> tuple[str, dict]:
        """The webhook action and payload a ``fit()`` call is for: ``event``/``data`` as the classic
        ``process_event`` passes them, or our worker's ``fit(event, data)`` by position; a plain classic
        ``fit(tasks, workdir)`` is START_TRAINING with no payload."""
        if isinstance(tasks, str):
            event = event or tasks
        if isinstance(workdir, dict):
            data = data if data is not None else workdir
        return event or "START_TRAINING", data if isinstance(data, dict) else {}

    def get_local_path(self, url: str, project_dir: Optional[str] = None, task_id: Optional[int] = None,
                       **kwargs: Any) -> str:
        """A local file with the content of a task's URL (uploads, local files, http(s), cloud via presign, which
        needs ``task_id``), downloaded with the Label Studio key and cached. The classic signature;
        ``project_dir`` is accepted and not needed (Label Studio serves uploads, LOCAL_FILES_DOCUMENT_ROOT
        locates local files)."""
        return self.context.images.local_path(url, task_id)

    def versions(self) -> list[str]:
        return [self.model_version] if self.model_version else []

    # --- training seams (the queue plugs in via context.training) ------------------------------------------
    def on_training_request(self, event: str, payload: dict) -> dict:
        """A training trigger arrived (/webhook action, or /train). Must answer at once: enqueue, never train
        here. Without a training queue it is acknowledged and logged."""
        if self.context.training is not None:
            return self.context.training.request(self.project_id, event, payload)
        log.info("training request %s for project %s acknowledged; this server has no training queue",
                 event, self.project_id)
        return {}

    def training_status(self) -> dict:
        if self.context.training is not None:
            return self.context.training.status(self.project_id)
        return {"is_training": False, "job": None}

    def job_status(self, job_id: Optional[str]) -> dict:
        if self.context.training is not None and job_id:
            return self.context.training.job_status(job_id)
        return {"job": job_id, "status": "unknown"}

    def training_metrics(self) -> dict:
        if self.context.training is not None:
            return self.context.training.metrics()
        return {}
