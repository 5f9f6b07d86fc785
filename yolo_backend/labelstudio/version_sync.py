"""Keeping each project's ``model_version`` equal to the version our predictions carry: the one rule
(``switch_version``) and the bounded background worker the server uses (``ProjectVersionSync``).

Label Studio sorts tasks by prediction score (and samples by uncertainty) only over predictions whose
model_version equals the project's, and it refuses (400) to switch a project to a version until a prediction
carrying it is stored. So the rule asks first which versions the project's predictions carry and switches only to
one that is there: no request that is bound to be refused. It acts only on projects that have this backend
connected (``connection.ConnectionCheck``), and with UNCERTAINTY_SAMPLING also sets the project's sampling.
The training job (after a publish), pool scoring and the server (after a /predict or /setup) all use it.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Optional

from .client import ProjectNotFound
from .connection import ConnectionCheck, Link

log = logging.getLogger(__name__)


class Switch(str, Enum):
    """What ``switch_version`` did."""

    SET = "set"                        # the project now uses the version
    ALREADY = "already"                # it did already
    NOT_STORED_YET = "not stored yet"  # no stored prediction carries the version: Label Studio would refuse it
    NOT_CONNECTED = "not connected"    # the project has not connected this backend: nothing done
    NO_PROJECT = "no project"          # Label Studio has no such project


def switch_version(client: Any, connection: ConnectionCheck, project_id: int, version: str,
                   uncertainty_sampling: bool = False) -> Switch:
    """Switch the project's model_version (and with ``uncertainty_sampling`` its sampling) to ``version`` when it
    is connected to this backend and a prediction of ``version`` is stored. LabelStudioAPIError when Label Studio
    fails to answer."""
    try:
        listed = client.model_versions(project_id)
    except ProjectNotFound:
        return Switch.NO_PROJECT
    link = connection.check(project_id, listed.backends)
    if link.state is Link.NOT_CONNECTED:
        return Switch.NOT_CONNECTED
    if version not in listed.versions:
        return Switch.NOT_STORED_YET
    project = client.get_project(project_id)
    if uncertainty_sampling:
        client.ensure_uncertainty_sampling(project_id, project)
    current = project.get("model_version")
    if current == version:
        return Switch.ALREADY
    client.set_project_model_version(project_id, version)
    log.info("project %s model_version %r -> %r (so sorting by prediction score sees our predictions)", project_id,
             current, version)
    return Switch.SET


@dataclass
class _Wanted:
    version: str
    attempt: int = 0


class ProjectVersionSync:
    """Runs ``switch_version`` for the projects the server asks about, in one background thread.

    Never blocks a request. Per project only the newest version asked for is kept (a burst coalesces); at most
    ``max_pending`` projects wait (a request for one more is dropped, counted in the next summary line), and the
    versions known to be set and the projects known not to be connected are remembered for ``remember`` projects,
    so made-up project ids cost one Label Studio call each and no memory that stays. A version not stored yet
    (Label Studio stores a /predict reply after it was sent) is asked again after 1, 2, 4 ... s, ``attempts``
    times; then it is left until the next request (said at INFO: it is expected before any prediction exists).
    """

    def __init__(self, client_factory: Callable[[], Optional[Any]], connection: ConnectionCheck,
                 uncertainty_sampling: bool = False, attempts: int = 5, first_delay: float = 1.0,
                 backoff: float = 2.0, max_pending: int = 200, remember: int = 1000):
        self._client_factory = client_factory
        self.connection = connection
        self.uncertainty_sampling = uncertainty_sampling
        self.attempts, self.first_delay, self.backoff = attempts, first_delay, backoff
        self.max_pending, self.remember = max_pending, remember
        self._lock = threading.Condition()
        self._wanted: OrderedDict[int, _Wanted] = OrderedDict()  # project -> what to do, oldest first
        self._due: list[tuple[float, int]] = []                   # (when, project) heap; stale entries skipped
        self._synced: OrderedDict[int, str] = OrderedDict()      # project -> version known to be set
        self._busy = False
        self._dropped = 0
        self._said: OrderedDict[str, None] = OrderedDict()  # what was logged once already
        self._thread: Optional[threading.Thread] = None
        self.calls = 0  # switch_version runs (tests, /metrics)

    # --- asking ------------------------------------------------------------------------------------------
    def request(self, project_id: Optional[int], model_version: Optional[str], recheck: bool = False) -> bool:
        """Schedule a sync; False when nothing new needs doing. ``recheck`` ignores what we believe is set
        (Label Studio resets the project's version to the backend title when the backend is reconnected)."""
        if project_id is None or not model_version:
            return False
        with self._lock:
            if recheck:
                self._synced.pop(project_id, None)
            if self._synced.get(project_id) == model_version:
                return False
            wanted = self._wanted.get(project_id)
            if wanted is not None and wanted.version == model_version and wanted.attempt == 0:
                return True  # already waiting for its first try
            if wanted is None and len(self._wanted) >= self.max_pending:
                self._dropped += 1  # a burst of project ids: the ones already waiting keep their turn
                return False
            self._wanted[project_id] = _Wanted(model_version)
            heapq.heappush(self._due, (time.monotonic() + self.first_delay, project_id))
            self._ensure_thread()
            self._lock.notify()
        return True

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is due or running (tests); True when idle."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (self._wanted or self._busy) and time.monotonic() < deadline:
                self._lock.wait(0.05)
            return not (self._wanted or self._busy)

    def pending(self) -> int:
        with self._lock:
            return len(self._wanted)

    # --- the worker --------------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        """Started on first use, in the process that uses it (after any gunicorn fork)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="model-version-sync", daemon=True)
            self._thread.start()

    def _next(self) -> tuple[int, _Wanted]:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._due and self._due[0][1] not in self._wanted:
                    heapq.heappop(self._due)  # asked again or dropped meanwhile
                if self._due and self._due[0][0] <= now:
                    _, project_id = heapq.heappop(self._due)
                    self._busy = True
                    return project_id, self._wanted[project_id]
                self._lock.wait(self._due[0][0] - now if self._due else None)

    def _loop(self) -> None:
        while True:
            project_id, wanted = self._next()
            outcome, error = self._attempt(project_id, wanted)
            if outcome is Switch.NOT_CONNECTED:  # said before settling (waiters see it), outside the lock
                self._say_once(f"not-connected:{project_id}", logging.WARNING,
                               self.connection.check(project_id).why)
            with self._lock:
                self._busy = False
                self._settle(project_id, wanted, outcome, error)
                self._lock.notify_all()

    def _attempt(self, project_id: int, wanted: _Wanted) -> tuple[Optional[Switch], Optional[Exception]]:
        client = self._client_factory()
        if client is None:
            self._say_once("no-client", logging.INFO, "not syncing project model_version: set LABEL_STUDIO_URL and "
                      "LABEL_STUDIO_API_KEY so the backend can keep it equal to its own (needed for sorting by "
                      "prediction score)")
            return Switch.NO_PROJECT, None
        self.calls += 1
        try:
            return switch_version(client, self.connection, project_id, wanted.version,
                                  self.uncertainty_sampling), None
        except Exception as exc:  # Label Studio unreachable, or it refused: try again later
            return None, exc

    def _settle(self, project_id: int, wanted: _Wanted, outcome: Optional[Switch], error: Optional[Exception]) -> \
            None:
        """With the lock held: record the outcome, or schedule the next try."""
        if self._wanted.get(project_id) is not wanted:
            return  # asked again meanwhile: that request has its own turn
        if outcome in (Switch.SET, Switch.ALREADY):
            self._wanted.pop(project_id)
            self._synced[project_id] = wanted.version
            self._synced.move_to_end(project_id)
            while len(self._synced) > self.remember:
                self._synced.popitem(last=False)
        elif outcome in (Switch.NOT_CONNECTED, Switch.NO_PROJECT):
            self._wanted.pop(project_id)
        else:
            self._retry_or_give_up(project_id, wanted, error)
        if self._dropped:
            log.warning("model-version sync: %d project request(s) dropped (more than %d projects waiting)",
                        self._dropped, self.max_pending)
            self._dropped = 0

    def _retry_or_give_up(self, project_id: int, wanted: _Wanted, error: Optional[Exception]) -> None:
        wanted.attempt += 1
        if wanted.attempt < self.attempts:
            delay = self.first_delay * self.backoff ** wanted.attempt
            heapq.heappush(self._due, (time.monotonic() + delay, project_id))
            return
        self._wanted.pop(project_id)
        if error is not None:
            log.warning("could not set project %s model_version to %r after %d attempts: %s", project_id,
                        wanted.version, self.attempts, error)
        else:
            log.info("project %s: no stored prediction carries %r yet, so Label Studio's model_version is left as "
                     "it is until the next prediction", project_id, wanted.version)

    def _say_once(self, key: str, level: int, message: str) -> None:
        """Log ``message`` once per ``key`` (at most ``remember`` keys kept)."""
        with self._lock:
            if key in self._said:
                return
            self._said[key] = None
            while len(self._said) > self.remember:
                self._said.popitem(last=False)
        log.log(level, message)
