"""A deadline for a whole HTTP download: requests' timeout applies to each socket read, so a server sending one
byte every few seconds (headers or body) would otherwise hold a request, and a server thread, for minutes.

``with Deadline(seconds):`` makes every socket that a session from ``deadline_session()`` uses in this thread
known to the deadline (our urllib3 connection classes report it when they connect or send a request); when the
time is up a timer shuts those sockets down, which ends a read blocked on them. Reads then fail, and
``Deadline.passed`` says why.
"""

from __future__ import annotations

import http.cookiejar
import socket
import threading
from typing import Optional

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_active = threading.local()


class DeadlinePassed(Exception):
    """Raised by ``Deadline.check`` once the time is up."""


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.passed = False
        self._lock = threading.Lock()
        self._sockets: list = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "Deadline":
        _active.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _active.deadline = None

    def attach(self, sock) -> None:
        """Watch ``sock``: it is shut down when the time is up (at once when it already is)."""
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            passed = self.passed
        if passed:
            _shutdown(sock)

    def watch(self, response: requests.Response) -> None:
        """Also watch the socket under a streamed response (for sessions whose pools are not ours, e.g. a proxy)."""
        self.attach(_socket_of(response))

    def check(self) -> None:
        if self.passed:
            raise DeadlinePassed()

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _report(sock) -> None:
    deadline: Optional[Deadline] = getattr(_active, "deadline", None)
    if deadline is not None:
        deadline.attach(sock)


def _socket_of(response: requests.Response):
    """The socket under a streamed response (urllib3 2.x keeps the connection on the response), or None."""
    raw = getattr(response, "raw", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:  # older layouts: the socket behind the file object http.client reads from
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock


class _ReportingHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _report(self.sock)

    def request(self, *args, **kwargs) -> None:  # a reused keep-alive connection does not connect again
        _report(self.sock)
        super().request(*args, **kwargs)


class _ReportingHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _report(self.sock)

    def request(self, *args, **kwargs) -> None:
        _report(self.sock)
        super().request(*args, **kwargs)


class _Pool(HTTPConnectionPool):
    ConnectionCls = _ReportingHTTPConnection


class _SecurePool(HTTPSConnectionPool):
    ConnectionCls = _ReportingHTTPSConnection


class DeadlineAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _SecurePool}


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Keeps no cookie: downloads authenticate with a header, and a cookie set by one host must never be sent to
    another (or along a redirect)."""

    def set_ok(self, cookie, request) -> bool:
        return False

    def return_ok(self, cookie, request) -> bool:
        return False


def deadline_session(adapter_class: type[DeadlineAdapter] = DeadlineAdapter, cookies: bool = True) -> requests.Session:
    """A requests session whose connections report their sockets to the current thread's ``Deadline``;
    ``cookies=False`` keeps none."""
    session = requests.Session()
    if not cookies:
        session.cookies.set_policy(_NoCookies())
    adapter = adapter_class()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
