"""Talking to Label Studio: credentials and one authenticated session (image bytes, the key rules); the API calls
go through label-studio-sdk in ``api.py``, with the keys of this session.

Label Studio accepts two kinds of API key:
- a legacy token (40 hex characters): sent as ``Authorization: Token <key>``;
- a personal access token (PAT), which is a JWT *refresh* token: exchanged at ``POST /api/token/refresh/``
  ``{"refresh": key}`` for a short-lived access token, sent as ``Authorization: Bearer <access>`` and refreshed
  when it expires or is refused.

Keys come from two places: the settings (``LABEL_STUDIO_URL`` + ``LABEL_STUDIO_API_KEY``) and what Label Studio
sends to ``/setup`` (``hostname`` + ``access_token``, always the project creator's *legacy* token, which a JWT-only
organisation refuses with 401). ``LabelStudioSession`` tries the configured key first, then the /setup one,
remembers the one that works, and logs once when it has to fall back, so images download in both kinds of
organisation.

The session only ever sends a key to the origin it belongs to (see ``LabelStudioSession``), never to other URLs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Optional
from urllib.parse import urljoin, urlsplit

import requests

from .deadline import DeadlineAdapter, deadline_session
from .urls import Origin, UnsafeURL, _origin_of_prepared, checked_url, normalise_url, origin_of, shorten

log = logging.getLogger(__name__)

# Refresh a JWT access token this many seconds before it says it expires.
_ACCESS_TOKEN_MARGIN_S = 30.0


class LabelStudioAuthError(RuntimeError):
    """No configured key is accepted by Label Studio; the message says what to set."""


def _jwt_payload(token: str) -> Optional[dict]:
    """The payload of a well-formed JWT (not verified: only used to tell token kinds apart and read ``exp``)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        header = json.loads(base64.urlsafe_b64decode((parts[0] + "=" * (-len(parts[0]) % 4)).encode()))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict) or not isinstance(header, dict):
        return None
    return payload


def is_personal_access_token(key: str) -> bool:
    """True for a JWT (a personal access token, i.e. a refresh token), False for a legacy token."""
    return _jwt_payload(key) is not None


class Credential:
    """One Label Studio base URL + API key, producing the ``Authorization`` header value.

    ``source`` names where it came from ("LABEL_STUDIO_API_KEY" or "/setup") for log lines.
    """

    def __init__(self, base_url: str, key: str, source: str, timeout: float = 10.0,
                 http: Optional[requests.Session] = None):
        self.base_url = normalise_url(base_url)
        self.origin = origin_of(self.base_url)  # the only origin this key is ever sent to
        self.key = key.strip()
        self.source = source
        self.timeout = timeout
        self.is_pat = is_personal_access_token(self.key)
        self._http = http or keyed_session()
        self._access: Optional[str] = None
        self._access_expires = 0.0
        self._lock = threading.Lock()
        self.refused = False  # Label Studio refused it last time it was tried

    def __repr__(self) -> str:
        kind = "personal access token" if self.is_pat else "legacy token"
        return f"<{kind} from {self.source} for {self.base_url}>"

    @property
    def identity(self) -> str:
        """Tells credentials apart in log bookkeeping without keeping the key itself around."""
        return f"{self.source}|{self.base_url}|{hashlib.sha256(self.key.encode()).hexdigest()[:16]}"

    def header(self, force_refresh: bool = False) -> str:
        if not self.is_pat:
            return f"Token {self.key}"
        with self._lock:
            if force_refresh or not self._access or time.time() >= self._access_expires:
                self._refresh()
            return f"Bearer {self._access}"

    def _refresh(self) -> None:
        url = f"{self.base_url}/api/token/refresh/"
        # Network errors propagate as they are: Label Studio being down is not a refused key. The refresh token is
        # the key itself: sent only if the connection is this credential's origin, and never along a redirect.
        request = self._http.prepare_request(requests.Request("POST", url, json={"refresh": self.key}))
        # read by our adapter (send); PreparedRequest does not declare them
        request.key_origin, request.key_required = self.origin, True  # type: ignore[attr-defined]
        response = self._http.send(request, timeout=self.timeout, allow_redirects=False)
        if response.status_code != 200:
            raise LabelStudioAuthError(
                f"Label Studio refused the personal access token from {self.source} at {url} "
                f"(HTTP {response.status_code}); create a new one under Account & Settings -> Personal Access "
                "Token and set LABEL_STUDIO_API_KEY")
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise LabelStudioAuthError(f"{url} answered without an access token; is {self.base_url} a "
                                       "Label Studio server?") from None
        payload = _jwt_payload(access) or {}
        exp = payload.get("exp")
        # Without an expiry claim, refresh every 5 minutes (and on 401 anyway).
        lifetime = (float(exp) - time.time()) if isinstance(exp, (int, float)) else 300.0
        self._access = access
        self._access_expires = time.time() + max(0.0, lifetime - _ACCESS_TOKEN_MARGIN_S)


def _is_refused(response: requests.Response) -> bool:
    """Label Studio refused the credential: 401/403, or it bounced us to its login page."""
    if response.status_code in (401, 403):
        return True
    return "/user/login" in urlsplit(response.url or "").path


# Redirects followed by hand (so no key follows one to another origin).
MAX_REDIRECTS = 5
# /setup hostnames remembered when LABEL_STUDIO_URL is not set (each with its own token).
MAX_SETUP_ORIGINS = 8


class KeyedAdapter(DeadlineAdapter):
    """The one place a key is put on a request: only when the connection the adapter is about to use is the
    key's origin, read from the same prepared URL and the same connection pool that then connects.

    A request carries ``credential`` (its Authorization header is added here, or not) or ``key_origin`` with
    ``key_required`` (the body holds a key: refused unless the connection is that origin). Proxied plain-http
    connections never carry a key (the pool is the proxy's); add Label Studio to NO_PROXY."""

    def send(self, request: requests.PreparedRequest, stream=False, timeout=None, verify=True, cert=None,
             proxies=None):
        credential = getattr(request, "credential", None)
        wanted = credential.origin if credential is not None else getattr(request, "key_origin", None)
        request.headers.pop("Authorization", None)  # never one set anywhere else
        if wanted is not None:
            reached = self._connection_origin(request, verify, cert, proxies)
            if reached == wanted and credential is not None:
                request.headers["Authorization"] = credential.header(force_refresh=getattr(request, "refresh",
                                                                                           False))
            elif reached != wanted and getattr(request, "key_required", False):
                raise UnsafeURL(f"{shorten(request.url)} would connect to {reached}, not to {wanted}: the key "
                                "is not sent")
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)

    def _connection_origin(self, request, verify, cert, proxies) -> Optional[Origin]:
        pool = self.get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        via_proxy = getattr(pool, "proxy", None) is not None and pool.scheme == "http"
        target = _origin_of_prepared(request.url)
        assert pool.port is not None  # a pool made for a URL: urllib3 fills in the scheme's port
        reached = Origin(pool.scheme, str(pool.host).strip("[]").lower(), int(pool.port))
        return None if via_proxy or target != reached else reached


def keyed_session() -> requests.Session:
    """A requests session for keyed and plain downloads: keys through ``KeyedAdapter`` only, sockets under the
    thread's ``Deadline``, and no cookies kept (a Set-Cookie from one host is never sent to another)."""
    return deadline_session(KeyedAdapter, cookies=False)


class LabelStudioSession:
    """Authenticated requests to Label Studio with the configured key and the /setup key as fallback.

    Which key goes where (anyone on the network can call ``/setup``, so it must never widen this):
    - ``LABEL_STUDIO_API_KEY`` only to ``LABEL_STUDIO_URL``'s origin (scheme, host, port);
    - a ``/setup`` token only to the origin of the ``hostname`` sent with it;
    - with ``LABEL_STUDIO_URL`` set, relative paths resolve against it and ``/setup`` hostnames are not trusted
      (a /setup token is used only when its hostname is that same origin); without it, relative paths resolve
      against the hostname of the latest /setup that came with a token (a token-less /setup moves nothing);
    - every URL is checked first (``urls.checked_url``: no parser-dependent authority), redirects are followed
      here, each hop checked the same way, and the key is attached by ``KeyedAdapter`` only where the connection
      is the key's origin.

    Thread-safe; one per process (gunicorn threads share it).
    """

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, timeout: float = 10.0,
                 http: Optional[requests.Session] = None):
        self.timeout = timeout
        self._http = http or keyed_session()
        self._lock = threading.Lock()
        self._configured: Optional[Credential] = None
        self._configured_url = normalise_url(url)
        if self._configured_url and api_key and api_key.strip():
            self._configured = Credential(self._configured_url, api_key, "LABEL_STUDIO_API_KEY", timeout, self._http)
        self._setup: OrderedDict[Origin, Credential] = OrderedDict()  # origin -> the /setup token for it
        self._setup_url: Optional[str] = None  # hostname of the latest /setup with a token (no LABEL_STUDIO_URL)
        self._warned: set[str] = set()

    # --- configuration ------------------------------------------------------------------------------------
    def update_from_setup(self, hostname: Optional[str], access_token: Optional[str]) -> None:
        """Remember what /setup sent (Label Studio sends it before every prediction batch): the token, bound to the
        origin of the hostname that came with it."""
        try:
            hostname = normalise_url(hostname)
        except ValueError as exc:
            self._warn_once(f"bad-setup:{shorten(hostname)}", f"ignoring the hostname from /setup: {exc}")
            return
        key = (access_token or "").strip()
        configured = origin_of(self._configured_url)
        if hostname and configured and origin_of(hostname) != configured:
            self._warn_once(f"foreign-setup:{hostname}",
                            f"/setup named {shorten(hostname)} as Label Studio, but LABEL_STUDIO_URL is "
                            f"{self._configured_url}: images and API calls go to LABEL_STUDIO_URL only, and that "
                            "/setup token is not used")
            return
        base = hostname or self._configured_url or (self._setup_url if not configured else None)
        where = origin_of(base)
        if not key or not base or where is None:
            return  # a /setup without a token changes nothing: no key, and no new place for relative paths
        with self._lock:
            if hostname and not configured:
                self._setup_url = hostname
            current = self._setup.get(where)
            if current is None or current.key != key:
                self._setup.pop(where, None)
                self._setup[where] = Credential(base, key, "/setup", self.timeout, self._http)
                while len(self._setup) > MAX_SETUP_ORIGINS:
                    self._setup.popitem(last=False)

    @property
    def configured_url(self) -> Optional[str]:
        """LABEL_STUDIO_URL (normalised), the only place API calls go; None when it is not set."""
        return self._configured_url

    @property
    def base_url(self) -> Optional[str]:
        """Where relative URLs (/data/upload/...) and API calls go: LABEL_STUDIO_URL, else /setup's hostname."""
        return self._configured_url or self._setup_url

    def credentials(self, url: Optional[str] = None) -> list[Credential]:
        """Keys that may go to ``url``'s origin (default: ``base_url``'s), in order: the ones not refused yet
        first, configured before /setup."""
        where = origin_of(url or self.base_url)
        if where is None:
            return []
        with self._lock:
            creds = [c for c in (self._configured, self._setup.get(where)) if c is not None and c.origin == where]
        return sorted(creds, key=lambda c: c.refused)

    def is_label_studio_url(self, url: str) -> bool:
        """True for an absolute URL on Label Studio's origin (LABEL_STUDIO_URL's; without it, a /setup
        hostname's)."""
        where = origin_of(url)
        if where is None:
            return False
        if self._configured_url:
            return where == origin_of(self._configured_url)
        with self._lock:
            return where in self._setup or where == origin_of(self._setup_url)

    def absolute(self, path_or_url: str) -> str:
        """An absolute, checked URL (UnsafeURL when it is not safe to fetch)."""
        if path_or_url.lower().startswith(("http://", "https://")):
            return checked_url(path_or_url)
        base = self.base_url
        if not base:
            raise LabelStudioAuthError(
                f"cannot resolve {shorten(path_or_url)!r}: the Label Studio URL is unknown; set LABEL_STUDIO_URL "
                "(e.g. http://localhost:8080) and LABEL_STUDIO_API_KEY")
        return checked_url(base + "/" + path_or_url.lstrip("/"))

    # --- requests -----------------------------------------------------------------------------------------
    def request(self, method: str, path_or_url: str, **kwargs) -> requests.Response:
        """``method`` on a Label Studio URL (or path), authenticated; falls back between keys on 401/403.

        Raises LabelStudioAuthError when no key may go to that URL or every key is refused (after one refresh
        of a JWT access token), UnsafeURL for a URL (or redirect) that is not safe to fetch; other HTTP errors are
        returned as responses for the caller to judge.
        """
        url = self.absolute(path_or_url)
        creds = self.credentials(url)
        if not creds:
            raise LabelStudioAuthError(
                f"no Label Studio API key for {shorten(url)}: set LABEL_STUDIO_API_KEY (a personal access token "
                "or legacy token from Account & Settings) together with LABEL_STUDIO_URL")
        refusals = []
        for cred in creds:
            response = self._send(cred, method, url, kwargs)
            if response is not None and _is_refused(response) and cred.is_pat:
                # The access token may have been revoked or expired early: refresh once and retry.
                response.close()
                response = self._send(cred, method, url, kwargs, force_refresh=True)
            if response is None:
                refusals.append(f"{cred!r}: token refresh refused")
                self._mark_refused(cred, "its token refresh was refused")
                continue
            if not _is_refused(response):
                cred.refused = False
                return response
            response.close()
            refusals.append(f"{cred!r}: HTTP {response.status_code}")
            self._mark_refused(cred, f"HTTP {response.status_code} on {shorten(urlsplit(url).path)}")
        raise LabelStudioAuthError(
            f"Label Studio refused every API key for {shorten(url)} ({'; '.join(refusals)}). Set "
            "LABEL_STUDIO_API_KEY to a personal access token (JWT-only organisations refuse legacy tokens) or to a "
            "legacy token if legacy tokens are enabled for the organisation")

    def _send(self, cred: Credential, method: str, url: str, kwargs: dict,
              force_refresh: bool = False) -> Optional[requests.Response]:
        """One request with ``cred``, redirects followed by hand, each hop checked; the adapter adds the key only
        where the connection is its origin (a presigned S3 hop goes without it). None when the credential could
        not even produce a header (its token refresh was refused)."""
        send = {k: kwargs[k] for k in _SEND_ARGUMENTS if k in kwargs}
        send.setdefault("timeout", self.timeout)
        fields = {k: v for k, v in kwargs.items() if k not in _SEND_ARGUMENTS}
        for _ in range(MAX_REDIRECTS + 1):
            request = self._http.prepare_request(requests.Request(method, url, **fields))
            request.credential, request.refresh = cred, force_refresh  # type: ignore[attr-defined]  # as above
            assert request.url is not None  # prepare_request set it
            options = self._http.merge_environment_settings(request.url, send.get("proxies") or {},
                                                            send.get("stream"), send.get("verify"), send.get("cert"))
            try:
                response = self._http.send(request, allow_redirects=False, timeout=send["timeout"], **options)
            except LabelStudioAuthError as exc:  # raised by the credential while the adapter asked for a header
                self._warn_once(f"refresh:{cred.identity}", str(exc))
                return None
            location = response.headers.get("Location") if response.is_redirect else None
            if not location:
                return response
            response.close()
            url = checked_url(urljoin(response.url or url, location))
            force_refresh = False
            if response.status_code in (301, 302, 303) and method != "HEAD":
                method = "GET"
                fields = {k: v for k, v in fields.items() if k not in ("json", "data", "files")}
        raise LabelStudioAuthError(f"more than {MAX_REDIRECTS} redirects from {shorten(urlsplit(url).netloc)}")

    def mark_refused(self, cred: Credential, why: str) -> None:
        """Remember that Label Studio refused ``cred`` (it is tried last from now on); logs the fallback once."""
        self._mark_refused(cred, why)

    def _mark_refused(self, cred: Credential, why: str) -> None:
        others = [c for c in self.credentials(cred.base_url) if c is not cred and not c.refused]
        cred.refused = True
        if others:
            self._warn_once(f"refused:{cred.identity}",
                            f"Label Studio refused the {cred!r} ({why}); falling back to the {others[0]!r}"
                            + (" (in JWT-only organisations the /setup token is a legacy token that does not "
                               "work: LABEL_STUDIO_API_KEY should be a personal access token)"
                               if cred.source == "/setup" else ""))
        else:
            self._warn_once(f"refused:{cred.identity}", f"Label Studio refused the {cred!r} ({why})")

    def _warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            if len(self._warned) >= MAX_WARNED:  # made-up hostnames must not grow it
                self._warned.clear()
            self._warned.add(key)
        log.warning(message)

    def get(self, path_or_url: str, **kwargs) -> requests.Response:
        return self.request("GET", path_or_url, **kwargs)

    def fetch_plain(self, url: str, **kwargs) -> requests.Response:
        """GET a URL that is not Label Studio's, without any key; redirects followed by hand, each hop checked."""
        kwargs.setdefault("timeout", self.timeout)
        url = checked_url(url)
        for _ in range(MAX_REDIRECTS + 1):
            response = self._http.get(url, allow_redirects=False, **kwargs)
            location = response.headers.get("Location") if response.is_redirect else None
            if not location:
                return response
            response.close()
            url = checked_url(urljoin(response.url or url, location))
        raise UnsafeURL(f"more than {MAX_REDIRECTS} redirects from {shorten(urlsplit(url).netloc)}")


# requests' arguments for sending (the rest build the request).
_SEND_ARGUMENTS = ("timeout", "stream", "verify", "cert", "proxies")
# Warnings said once each; the set is emptied when it reaches this size.
MAX_WARNED = 1000


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed; the message names the call, the answer and what to do."""

    def __init__(self, message: str, status_code: Optional[int] = None):
        super().__init__(message)
        self.status_code = status_code


class ProjectNotFound(LabelStudioAPIError):
    """Label Studio has no such project (404); the message names it and the Label Studio URL."""
