"""What a server process and a training worker share, built from the settings once per process.

``BackendContext.from_settings(settings)`` gives the model holder (which checkpoint serves a project, loaded once
and swapped on a new version), the Label Studio session and image fetcher (keys only to their own origin), the
background sync of each project's ``model_version``, and the training hooks a server plugs its queue into.

Neutral ground: the HTTP server (``server/``), the training job (``jobs/``) and the backend class
(``yolo_backend.backend``) all build on it, and it imports none of them.
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

from .labelstudio.api import LabelStudioClient
from .labelstudio.client import LabelStudioSession
from .labelstudio.connection import ConnectionCheck
from .labelstudio.images import ImageCache, ImageFetcher
from .labelstudio.version_sync import ProjectVersionSync
from .model_holder import Loader, ModelHolder
from .settings import Settings


class TrainingHooks(Protocol):
    """What a training queue provides to the server (``jobs.queue.TrainingQueue`` is one)."""

    def request(self, project_id: Optional[int], event: str, payload: dict) -> dict: ...
    def status(self, project_id: Optional[int]) -> dict: ...
    def job_status(self, job_id: str) -> dict: ...
    def metrics(self) -> dict: ...
    def request_pool_scoring(self, project_id: Optional[int], reason: str = "requested",
                             reply_stored: int = 0) -> dict: ...
    def pool_status(self, project_id: int) -> dict: ...


INSTANCE_FILE = "instance-id"


def instance_id(model_dir: str | os.PathLike) -> str:
    """This deployment's id: ``MODEL_DIR/instance-id``, made once (by whichever process comes first) and then the
    same for every server process and worker sharing MODEL_DIR. /health reports it, so the backend can tell which
    of a project's ML backends in Label Studio is itself (``labelstudio.connection``)."""
    path = Path(model_dir) / INSTANCE_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f".{INSTANCE_FILE}.{secrets.token_hex(4)}")
    candidate.write_text(secrets.token_hex(16))
    try:
        os.link(candidate, path)  # fails when another process made it first: theirs is the id
    except FileExistsError:
        pass
    finally:
        candidate.unlink(missing_ok=True)
    return path.read_text().strip()


@dataclass
class BackendContext:
    """What a server process shares between requests."""

    settings: Settings
    models: ModelHolder
    session: LabelStudioSession
    images: ImageFetcher
    connection: ConnectionCheck
    version_sync: ProjectVersionSync
    training: Optional[TrainingHooks] = None
    label_configs: dict = field(default_factory=dict)  # project id -> last label config seen (from /setup)
    _instance: Optional[str] = None
    _client: Optional[LabelStudioClient] = None

    @classmethod
    def from_settings(cls, settings: Optional[Settings] = None, loader: Optional[Loader] = None,
                      training: Optional[TrainingHooks] = None) -> "BackendContext":
        settings = settings or Settings.from_env()
        session = LabelStudioSession(settings.label_studio_url, settings.label_studio_api_key,
                                     timeout=settings.image_timeout)
        cache = ImageCache(settings.image_cache_dir, settings.image_cache_mb * 1024 * 1024)
        images = ImageFetcher(session, cache, timeout=settings.image_timeout, max_pixels=settings.max_image_pixels)
        context = cls(settings=settings, models=ModelHolder(settings, loader=loader), session=session,
                      images=images, connection=None, version_sync=None, training=training)  # type: ignore[arg-type]
        context.connection = ConnectionCheck(context.client, context.instance, backend_url=settings.backend_url)
        context.version_sync = ProjectVersionSync(context.client, context.connection,
                                                  uncertainty_sampling=settings.uncertainty_sampling)
        return context

    def instance(self) -> str:
        """This deployment's id (``instance_id``), read once per process."""
        if self._instance is None:
            self._instance = instance_id(self.settings.model_dir)
        return self._instance

    def client(self) -> Optional[LabelStudioClient]:
        """A Label Studio API client (label-studio-sdk) when LABEL_STUDIO_URL is set and a key may go there, else
        None (a /setup hostname alone gets no API calls). One per process: it keeps its SDK clients (a personal
        access token is exchanged once, not per call)."""
        if self._client is None:
            self._client = LabelStudioClient.for_session(self.session)
        return self._client


_default_context: Optional[BackendContext] = None
_default_lock = threading.Lock()


def default_context() -> BackendContext:
    """The process-wide context from the environment (used when a backend is made without one)."""
    global _default_context
    with _default_lock:
        if _default_context is None:
            _default_context = BackendContext.from_settings()
        return _default_context
