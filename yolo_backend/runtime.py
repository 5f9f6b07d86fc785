"""What a server process and a training worker share, built from the settings once per process.

``BackendContext.from_settings(settings)`` gives the model holder (which checkpoint serves a project, loaded once
and swapped on a new version), the Label Studio session and image fetcher (keys only to their own origin), the
background sync of each project's ``model_version``, and the training hooks a server plugs its queue into.

Neutral ground: the HTTP server (``server/``), the training job (``jobs/``) and the backend class
(``yolo_backend.backend``) all build on it, and it imports none of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Protocol

from .labelstudio.api import LabelStudioClient
from .labelstudio.client import LabelStudioSession, ProjectVersionSync
from .labelstudio.images import ImageCache, ImageFetcher
from .model_holder import Loader, ModelHolder
from .settings import Settings


class TrainingHooks(Protocol):
    """What a training queue provides to the server (``jobs.queue.TrainingQueue`` is one)."""

    def request(self, project_id: Optional[int], event: str, payload: dict) -> dict: ...
    def status(self, project_id: Optional[int]) -> dict: ...
    def job_status(self, job_id: str) -> dict: ...
    def metrics(self) -> dict: ...
    def request_pool_scoring(self, project_id: Optional[int], reason: str = "requested") -> dict: ...
    def pool_status(self, project_id: int) -> dict: ...


@dataclass
class BackendContext:
    """What a server process shares between requests."""

    settings: Settings
    models: ModelHolder
    session: LabelStudioSession
    images: ImageFetcher
    version_sync: ProjectVersionSync
    training: Optional[TrainingHooks] = None
    label_configs: dict = field(default_factory=dict)  # project id -> last label config seen (from /setup)

    @classmethod
    def from_settings(cls, settings: Optional[Settings] = None, loader: Optional[Loader] = None,
                      training: Optional[TrainingHooks] = None) -> "BackendContext":
        settings = settings or Settings.from_env()
        session = LabelStudioSession(settings.label_studio_url, settings.label_studio_api_key,
                                     timeout=settings.image_timeout)
        cache = ImageCache(settings.image_cache_dir, settings.image_cache_mb * 1024 * 1024)
        context = cls(settings=settings, models=ModelHolder(settings, loader=loader), session=session,
                      images=ImageFetcher(session, cache, timeout=settings.image_timeout,
                                          max_pixels=settings.max_image_pixels),
                      version_sync=ProjectVersionSync(lambda: None), training=training)
        context.version_sync = ProjectVersionSync(context.client, uncertainty_sampling=settings.uncertainty_sampling)
        return context

    def client(self) -> Optional[LabelStudioClient]:
        """A Label Studio API client (label-studio-sdk) when LABEL_STUDIO_URL is set and a key may go there, else
        None (a /setup hostname alone gets no API calls)."""
        return LabelStudioClient.for_session(self.session)


_default_context: Optional[BackendContext] = None
_default_lock = threading.Lock()


def default_context() -> BackendContext:
    """The process-wide context from the environment (used when a backend is made without one)."""
    global _default_context
    with _default_lock:
        if _default_context is None:
            _default_context = BackendContext.from_settings()
        return _default_context
