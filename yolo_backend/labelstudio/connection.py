"""Is this backend connected to a project? The backend acts with its key only where it is.

``/setup``, ``/predict``, ``/webhook`` and ``/score_pool`` need no key and name any project id they like; the backend
must not become a confused deputy that writes predictions, switches versions or reads images in projects that
never connected it. Label Studio knows which ML backends each project has (``/api/projects/<id>/model-versions/
?extended=true&include_live_models=true`` lists them with their URLs, without calling them); this backend is one
of them when

- ``BACKEND_URL`` is set and one of them has exactly that URL (the address Label Studio was given), or
- one of their URLs answers ``/health`` with this deployment's instance id (a random id kept in
  ``MODEL_DIR/instance-id``, the same for every server process and worker that share MODEL_DIR). Only the
  project's own backends are asked, with no key and no cookies; an attacker cannot add a backend to a project
  without Label Studio rights, and with them could simply connect this backend.

Answers are cached (connected: ``ttl_s``; not connected: ``negative_ttl_s``, so a project just connected is
not refused for long), for at most ``remember`` projects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Optional
from urllib.parse import urlsplit

import requests

from .client import LabelStudioAPIError, ProjectNotFound
from .deadline import Deadline, deadline_session
from .urls import UnsafeURL, checked_url, normalise_url, origin_of, shorten

if TYPE_CHECKING:
    from .api import LabelStudioClient

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


class Link(str, Enum):
    CONNECTED = "connected"
    NOT_CONNECTED = "not connected"
    UNKNOWN = "unknown"  # Label Studio could not be asked


@dataclass(frozen=True)
class LinkCheck:
    state: Link
    why: str

    @property
    def connected(self) -> bool:
        return self.state is Link.CONNECTED


class ProjectNotConnected(ProjectNotFound):
    """The project has not connected this backend (or does not exist): nothing is done there with the key. A
    ProjectNotFound, so every caller that drops work for a missing project drops it here too."""


def probe_instance(url: str, timeout: float = PROBE_TIMEOUT_S, http: Optional[requests.Session] = None) -> \
        Optional[str]:
    """The instance id a backend at ``url`` reports on ``/health`` (None when it does not answer with one)."""
    try:
        target = checked_url(url.rstrip("/") + "/health")
    except UnsafeURL:
        return None
    session = http or deadline_session(cookies=False)
    try:
        with Deadline(timeout):  # the whole answer, not each read: a dripping host cannot hold the caller
            response = session.get(target, timeout=timeout, allow_redirects=False)
            value = response.json().get("instance") if response.status_code == 200 else None
    except (requests.RequestException, ValueError, AttributeError, OSError):
        return None
    return value if isinstance(value, str) else None


class ConnectionCheck:
    """``check(project_id)``: whether the project has this backend among its ML backends (see the module doc).

    ``client_factory`` gives an ``api.LabelStudioClient`` or None (no LABEL_STUDIO_URL: nothing can be checked,
    and nothing is done with a key through the API either). ``instance`` gives this deployment's id."""

    def __init__(self, client_factory: Callable[[], Optional["LabelStudioClient"]], instance: Callable[[], str],
                 backend_url: Optional[str] = None, probe: Callable[[str], Optional[str]] = probe_instance,
                 ttl_s: float = 300.0, negative_ttl_s: float = 30.0, remember: int = 1000):
        self._client_factory = client_factory
        self._instance = instance
        self.backend_url = normalise_url(backend_url) if backend_url else None
        self._probe = probe
        self.ttl_s, self.negative_ttl_s, self.remember = ttl_s, negative_ttl_s, remember
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, tuple[float, LinkCheck]] = OrderedDict()  # project -> (expires, answer)

    def check(self, project_id: int, backends: Optional[list[dict]] = None) -> LinkCheck:
        """The project's link to this backend; ``backends``: its ML backends when the caller has just listed them."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(project_id)
            if cached and cached[0] > now:
                return cached[1]
        answer = self._ask(project_id, backends)
        if answer.state is not Link.UNKNOWN:
            ttl = self.ttl_s if answer.connected else self.negative_ttl_s
            with self._lock:
                self._cache[project_id] = (now + ttl, answer)
                self._cache.move_to_end(project_id)
                while len(self._cache) > self.remember:
                    self._cache.popitem(last=False)
        return answer

    def require(self, project_id: int) -> None:
        """ProjectNotConnected (or the API error) unless the project has connected this backend."""
        answer = self.check(project_id)
        if answer.state is Link.NOT_CONNECTED:
            raise ProjectNotConnected(answer.why)
        if answer.state is Link.UNKNOWN:
            raise LabelStudioAPIError(answer.why)

    def forget(self, project_id: int) -> None:
        with self._lock:
            self._cache.pop(project_id, None)

    def _ask(self, project_id: int, backends: Optional[list[dict]]) -> LinkCheck:
        client = self._client_factory()
        if client is None:
            return LinkCheck(Link.UNKNOWN, "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not set: the backend "
                                           "cannot ask Label Studio which projects it is connected to")
        if backends is None:
            try:
                backends = client.model_versions(project_id).backends
            except ProjectNotFound as exc:
                return LinkCheck(Link.NOT_CONNECTED, str(exc))
            except LabelStudioAPIError as exc:
                return LinkCheck(Link.UNKNOWN, f"could not ask Label Studio which ML backends project {project_id} "
                                               f"has: {exc}")
        urls = [str(b.get("url") or "") for b in backends if isinstance(b, dict) and b.get("url")]
        if self._is_ours(urls):
            return LinkCheck(Link.CONNECTED, f"project {project_id} has this backend connected")
        listed = ", ".join(shorten(u, 80) for u in urls[:5]) or "none"
        return LinkCheck(Link.NOT_CONNECTED,
                         f"project {project_id} has not connected this backend in Label Studio (its ML backends: "
                         f"{listed}); the backend does nothing there with its key. Connect it under the project's "
                         "Settings -> Model" + ("" if self.backend_url else ", or set BACKEND_URL to the URL Label "
                                                "Studio was given if this backend cannot reach that URL itself"))

    def _is_ours(self, urls: list[str]) -> bool:
        if self.backend_url:
            return any(_same_url(url, self.backend_url) for url in urls)
        mine = self._instance()
        return any(self._probe(url) == mine for url in urls)


def _same_url(a: str, b: str) -> bool:
    """Same origin and path (``http://Host:80/ml/`` is ``http://host/ml``)."""
    first, second = origin_of(a), origin_of(b)
    return first is not None and first == second and \
        urlsplit(a).path.rstrip("/") == urlsplit(b).path.rstrip("/")
