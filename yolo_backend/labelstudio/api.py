"""The Label Studio API calls the backend makes (projects, tasks, predictions), through label-studio-sdk.

The key rules of ``LabelStudioSession`` hold here too:
- the SDK is only ever built for ``LABEL_STUDIO_URL``, never for a ``/setup`` hostname: without LABEL_STUDIO_URL
  there is no API client (``LabelStudioClient.for_session`` gives None) and only images download;
- the keys are the session's for that origin, in its order: LABEL_STUDIO_API_KEY, then a /setup token Label
  Studio sent with that same hostname; one refused (401/403) is marked refused in the session (which logs the
  fallback once) and the next is tried;
- a personal access token (a JWT refresh token) is exchanged for access tokens by the SDK itself (2.x: a JWT key
  is refreshed at ``/api/token/refresh/``, a legacy key is sent as ``Token``); on a refusal the client is rebuilt
  once, so a revoked access token is refreshed;
- redirects are not followed, so no key leaves its origin.

SDK and network errors become ``LabelStudioAPIError`` (``ProjectNotFound`` for a missing project,
``LabelStudioAuthError`` when every key is refused) with a message that says what to do.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, TypeVar

import httpx
from label_studio_sdk.core.api_error import ApiError

from .client import Credential, LabelStudioAPIError, LabelStudioAuthError, LabelStudioSession, ProjectNotFound

if TYPE_CHECKING:
    from label_studio_sdk.client import LabelStudio

log = logging.getLogger(__name__)

PAGE_SIZE = 100
# The project sampling that serves the next task by cluster and prediction score (open-source 1.23 implements it).
UNCERTAINTY_SAMPLING = "Uncertainty sampling"
T = TypeVar("T")


@dataclass(frozen=True)
class ModelVersions:
    """What ``/api/projects/<id>/model-versions/`` says: versions with their prediction counts, live backends."""

    versions: dict[str, int]
    backends: list[dict]


class LabelStudioClient:
    """The backend's Label Studio API calls for ``LABEL_STUDIO_URL`` (see the module doc)."""

    def __init__(self, session: LabelStudioSession, url: str):
        self.session = session
        self.url = url.rstrip("/")
        self._sdk: dict[str, "LabelStudio"] = {}  # credential identity -> its SDK client

    @classmethod
    def for_session(cls, session: LabelStudioSession) -> Optional["LabelStudioClient"]:
        """A client when LABEL_STUDIO_URL is set and a key may go there, else None."""
        url = session.configured_url
        if url and session.credentials(url):
            return cls(session, url)
        return None

    # --- the calls --------------------------------------------------------------------------------------------
    def get_project(self, project_id: int) -> dict:
        what = f"GET project {int(project_id)}"
        try:
            return self._call(what, lambda sdk: _as_dict(sdk.projects.get(id=int(project_id))))
        except LabelStudioAPIError as exc:
            if getattr(exc, "status_code", None) == 404:
                raise ProjectNotFound(f"Label Studio at {self.url} has no project {int(project_id)} (HTTP 404)") \
                    from None
            raise

    def set_project_model_version(self, project_id: int, model_version: str) -> dict:
        return self._call(f"PATCH project {int(project_id)} model_version={model_version!r}",
                          lambda sdk: _as_dict(sdk.projects.update(id=int(project_id), model_version=model_version)))

    def export_tasks(self, project_id: int) -> list[dict]:
        """The project's JSON export (``/api/projects/<id>/export``: every task with an annotation)."""
        def export(sdk: "LabelStudio") -> list[dict]:
            body = b"".join(sdk.projects.exports.download_sync(int(project_id), export_type="JSON"))
            try:
                tasks = json.loads(body)
            except ValueError:
                raise LabelStudioAPIError(f"the export of project {project_id} is not JSON: {body[:200]!r}") from None
            if not isinstance(tasks, list):
                raise LabelStudioAPIError(f"the export of project {project_id} is not a list of tasks")
            return tasks

        return self._call(f"export of project {int(project_id)}", export)

    def tasks(self, project_id: int, with_annotations: bool) -> list[dict]:
        """Every task of the project, page by page; ``with_annotations`` includes annotations and predictions."""
        fields = "all" if with_annotations else "task_only"
        def listed(sdk: "LabelStudio") -> list[dict]:
            pages: Iterable[Any] = sdk.tasks.list(project=int(project_id), fields=fields, page_size=PAGE_SIZE)
            return [_as_dict(task) for task in pages]

        return self._call(f"GET tasks of project {int(project_id)}", listed)

    def get_task(self, task_id: int) -> dict:
        return self._call(f"GET task {int(task_id)}", lambda sdk: _as_dict(sdk.tasks.get(id=str(int(task_id)))))

    def create_prediction(self, task_id: int, result: list, score: Optional[float], model_version: str,
                          cluster: Optional[int] = None) -> dict:
        """One prediction (``/api/predictions`` keeps ``cluster``; the bulk import and ``/predict`` replies drop
        it)."""
        extra = {} if cluster is None else {"cluster": int(cluster)}
        return self._call(f"POST prediction for task {int(task_id)}", lambda sdk: _as_dict(sdk.predictions.create(
            task=int(task_id), result=result, score=score, model_version=model_version, **extra)))

    def predictions(self, project_id: int) -> list[dict]:
        """Every prediction of the project as ``{"id", "task", "model_version", "cluster"}`` (results left out)."""
        def listing(sdk: "LabelStudio") -> list[dict]:
            return [{"id": p.id, "task": p.task, "model_version": p.model_version, "cluster": p.cluster}
                    for p in sdk.predictions.list(project=int(project_id))]

        return self._call(f"GET predictions of project {int(project_id)}", listing)

    def prediction_records(self, project_id: int) -> list[dict]:
        """Every prediction of the project in full (id, task, model_version, created_at, result, ...): Label
        Studio 1.23's task export lists a task's predictions by id only."""
        return self._call(f"GET predictions of project {int(project_id)}", lambda sdk: [
            _as_dict(p) for p in sdk.predictions.list(project=int(project_id))])

    def delete_prediction(self, prediction_id: int) -> None:
        def delete(sdk: "LabelStudio") -> None:
            try:
                sdk.predictions.delete(id=int(prediction_id))
            except ApiError as exc:
                if exc.status_code != 404:  # already gone: what we wanted
                    raise

        self._call(f"DELETE prediction {int(prediction_id)}", delete)

    def model_versions(self, project_id: int) -> "ModelVersions":
        """The model versions the project's predictions carry (with counts) and its ML backends (URLs), in one
        call that makes Label Studio call no backend (``/api/ml`` would refresh every backend's state)."""
        path = f"api/projects/{int(project_id)}/model-versions/"

        def fetch(sdk: "LabelStudio") -> ModelVersions:
            response = sdk._client_wrapper.httpx_client.request(
                path, method="GET", params={"extended": "true", "include_live_models": "true"})
            if response.status_code >= 300:
                raise ApiError(status_code=response.status_code, headers=dict(response.headers),
                               body=response.text[:300])
            try:
                body = response.json()
            except ValueError:
                raise LabelStudioAPIError(f"{path} did not answer JSON: {response.text[:200]!r}") from None
            static = body.get("static") if isinstance(body, dict) else None
            live = body.get("live") if isinstance(body, dict) else None
            versions = {str(v.get("model_version")): int(v.get("count") or 0) for v in static or []
                        if isinstance(v, dict) and v.get("model_version")}
            return ModelVersions(versions, [b for b in live or [] if isinstance(b, dict)])

        try:
            return self._call(f"GET model versions of project {int(project_id)}", fetch)
        except LabelStudioAPIError as exc:
            if getattr(exc, "status_code", None) == 404:
                raise ProjectNotFound(f"Label Studio at {self.url} has no project {int(project_id)} (HTTP 404)") \
                    from None
            raise

    def set_project_sampling(self, project_id: int, sampling: str) -> dict:
        return self._call(f"PATCH project {int(project_id)} sampling={sampling!r}",
                          lambda sdk: _as_dict(sdk.projects.update(id=int(project_id), sampling=sampling)))

    def ensure_uncertainty_sampling(self, project_id: int, project: Optional[dict] = None) -> bool:
        """Set the project's sampling to uncertainty sampling unless it is; True when it was changed."""
        project = project if project is not None else self.get_project(project_id)
        if project.get("sampling") == UNCERTAINTY_SAMPLING:
            return False
        self.set_project_sampling(project_id, UNCERTAINTY_SAMPLING)
        log.info("project %s sampling %r -> %r (UNCERTAINTY_SAMPLING is on)", project_id, project.get("sampling"),
                 UNCERTAINTY_SAMPLING)
        return True

    # --- keys and errors ------------------------------------------------------------------------------------
    def _call(self, what: str, call: Callable[["LabelStudio"], T]) -> T:
        """``call`` with each key that may go to LABEL_STUDIO_URL in turn until one is not refused."""
        refusals = []
        for cred in self.session.credentials(self.url):
            for attempt in range(2 if cred.is_pat else 1):  # a PAT: once more with a freshly refreshed token
                if attempt:
                    self._sdk.pop(cred.identity, None)
                try:
                    result = call(self._client(cred))
                except ApiError as exc:
                    if _is_refusal(exc):
                        refused = f"HTTP {exc.status_code}"
                        continue
                    raise _api_error(what, self.url, exc) from None
                except httpx.HTTPError as exc:
                    raise LabelStudioAPIError(
                        f"{what}: Label Studio at {self.url} did not answer ({type(exc).__name__}: {exc}); check "
                        "LABEL_STUDIO_URL and that Label Studio is running") from None
                cred.refused = False
                return result
            refusals.append(f"{cred!r}: {refused}")
            self.session.mark_refused(cred, f"{refused} on {what}")
        raise LabelStudioAuthError(
            f"{what}: Label Studio at {self.url} refused every API key ({'; '.join(refusals) or 'none set'}). Set "
            "LABEL_STUDIO_API_KEY to a personal access token (Account & Settings; JWT-only organisations refuse "
            "legacy tokens) or to a legacy token if legacy tokens are enabled for the organisation")

    def _client(self, cred: Credential) -> "LabelStudio":
        sdk = self._sdk.get(cred.identity)
        if sdk is None:
            from label_studio_sdk.client import LabelStudio  # seconds to import: only when a call is made

            # The SDK checks a PAT when it is built (an expired one raises ApiError 401: refused, as above).
            http = httpx.Client(timeout=max(60.0, self.session.timeout), follow_redirects=False)
            sdk = LabelStudio(base_url=self.url + "/", api_key=cred.key, httpx_client=http)
            self._sdk[cred.identity] = sdk
        return sdk


def _as_dict(item: Any) -> dict:
    if isinstance(item, dict):
        return item
    return item.model_dump(mode="json", exclude_unset=True)


def _api_error(what: str, url: str, exc: ApiError) -> LabelStudioAPIError:
    status = exc.status_code
    body = exc.body if isinstance(exc.body, str) else json.dumps(exc.body, default=str)
    hints: dict[Optional[int], str] = {
        400: "Label Studio refused the request as it is",
        404: "check that LABEL_STUDIO_URL is Label Studio's address and the key's user can see the project",
    }
    hint = hints.get(status, "")
    if status is not None and status >= 500:
        hint = "Label Studio failed on it: see Label Studio's log; the next training tries again"
    elif status is not None and 300 <= status < 400:
        hint = "Label Studio redirected the API call: set LABEL_STUDIO_URL to the address it redirects to"
    return LabelStudioAPIError(f"{what}: Label Studio at {url} answered HTTP {status}: {body[:300]}"
                               + (f" ({hint})" if hint else ""), status_code=status)


def _is_refusal(exc: ApiError) -> bool:
    """Label Studio refused the key: 401/403, or it sent us to its login page."""
    location = str((exc.headers or {}).get("location", ""))
    return exc.status_code in (401, 403) or (exc.status_code in (301, 302, 303, 307) and "/user/login" in location)
