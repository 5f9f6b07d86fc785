"""Whole requests before threads: slow clients cannot hold the threads that serve the app.

gunicorn's gthread worker hands a new connection to one of its threads (8 here) as soon as a byte arrives, and the
thread then reads the request head, and the app the body, with no deadline: eight sockets that send a request line
and then nothing stop the server (gunicorn's advice is a buffering proxy such as nginx in front).

``BufferingThreadWorker`` (gunicorn.conf.py's ``worker_class``) is gthread with one change: the worker's event
loop reads each request, head and body, without blocking, and only a whole request goes to a thread, which then
parses it from memory. Everything else is gthread's own: its HTTP parser and error answers, access log,
keep-alive, graceful stop, ``worker_connections``. The bounds, per connection:

  read deadline   REQUEST_READ_TIMEOUT_S (30) from the connection's accept, or from a kept-alive connection's next
                  byte, to the request's last byte: then 408 and closed (closed silently when nothing came)
  head            64 KiB: 431
  body            MAX_REQUEST_MB: 413 before the body is read (the app's own bound)
  connections     worker_connections (GUNICORN_WORKER_CONNECTIONS): beyond it new ones wait in the listen backlog

It buffers plain HTTP/1.x only: with TLS, HTTP/2, the PROXY protocol or the uwsgi protocol it says so once and
works as gthread does. ``BufferingRequestHandler`` gives ``python _wsgi.py`` (Flask's development server, a thread
per connection) the same read deadline and the same whole-body read before the app runs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import selectors
import socket
import threading
import time
from enum import Enum
from functools import partial
from typing import Mapping, Optional

from gunicorn import http
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.serving import WSGIRequestHandler

MAX_HEAD_BYTES = 64 * 1024            # a Label Studio request's head is well under 2 KiB
MAX_CHUNK_LINE = 1024                 # a chunk-size line: hex digits and short extensions
RECV_BYTES = 256 * 1024
REFUSAL_LOG_EVERY_S = 10.0
FD_MARGIN = 64                        # descriptors kept for model files, logs, the broker, ...


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    read_timeout_s: float
    max_body_bytes: int
    max_head_bytes: int = MAX_HEAD_BYTES

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "ReadLimits":
        """From the settings in ``environ`` (default: the process environment); SettingsError says what is wrong."""
        from ..settings import Settings

        return cls.from_settings(Settings.from_env(env=os.environ if environ is None else environ))

    @classmethod
    def from_settings(cls, settings) -> "ReadLimits":
        """REQUEST_READ_TIMEOUT_S, and the body bound from MAX_REQUEST_MB."""
        return cls(float(settings.request_read_timeout_s), int(settings.max_request_mb * 1024 * 1024))


# --- HTTP/1.1 framing: is the whole request there? (RFC 9112 section 6) ----------------------------------------

class Verdict(str, Enum):
    MORE = "more"                  # wait for more bytes
    READY = "ready"                # whole, or refused by gunicorn's parser without reading more: give it a thread
    BAD_CHUNKS = "400"             # a chunked body whose framing is broken
    TIMED_OUT = "408"              # not whole by its deadline
    HEAD_TOO_LARGE = "431"
    BODY_TOO_LARGE = "413"


class PendingRequest:
    """The bytes of one request as they arrive, and whether they are all there. Only the framing is read here
    (where the head ends, Content-Length, chunked); a head that is whole but odd goes to gunicorn's parser, which
    answers it."""

    def __init__(self, deadline: float, limits: ReadLimits, data: bytes = b""):
        self.deadline, self.limits = deadline, limits
        self.data = bytearray()
        self.body_start = -1               # where the body starts, once the head is whole
        self.length: Optional[int] = None  # Content-Length; None while unknown or for chunked
        self.chunk_at = 0                  # chunked: where the next chunk-size line starts
        self.chunked_bytes = 0
        self.expects_continue = False
        self.continue_sent = False
        self.verdict = self.feed(data) if data else Verdict.MORE

    def feed(self, chunk: bytes) -> Verdict:
        searched = len(self.data)
        self.data += chunk
        if self.body_start < 0:
            verdict = self._head(searched)
            if verdict is not None:
                self.verdict = verdict
                return verdict
        if self.length is not None:
            self.verdict = Verdict.READY if len(self.data) - self.body_start >= self.length else Verdict.MORE
        else:
            self.verdict = self._chunks()
        return self.verdict

    @property
    def wants_continue(self) -> bool:
        """The client waits for "100 Continue" before it sends the body (Expect: 100-continue)."""
        return self.expects_continue and not self.continue_sent and self.verdict is Verdict.MORE

    def _head(self, searched: int) -> Optional[Verdict]:
        end = self.data.find(b"\r\n\r\n", max(0, searched - 3))
        if end < 0:
            if len(self.data) > self.limits.max_head_bytes:
                return Verdict.HEAD_TOO_LARGE
            # gunicorn refuses a bare LF at once; waiting for a CRLF CRLF that never comes would only time out.
            at = self.data.find(b"\n", max(0, searched))
            while at >= 0:
                if at == 0 or self.data[at - 1] != 13:
                    return Verdict.READY
                at = self.data.find(b"\n", at + 1)
            return Verdict.MORE
        if end > self.limits.max_head_bytes:
            return Verdict.HEAD_TOO_LARGE
        self.body_start = end + 4
        return self._framing(bytes(self.data[:end]).split(b"\r\n"))

    def _framing(self, lines: list[bytes]) -> Optional[Verdict]:
        """Content-Length or chunked, from the head's lines; None when the body is to be read."""
        if lines and not lines[0]:
            lines = lines[1:]  # one empty line before the request line is allowed
        http10 = bool(lines) and lines[0].endswith(b"HTTP/1.0")
        lengths, codings = [], []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.lower(), value.strip(b" \t")
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings += [c.strip(b" \t").lower() for c in value.split(b",")]
            elif name == b"expect" and value.lower() == b"100-continue" and not http10:
                self.expects_continue = True
        if codings:
            # Anything but one final "chunked" without Content-Length is refused by gunicorn as it stands.
            if lengths or http10 or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
                return Verdict.READY
            self.chunk_at = self.body_start
            return None
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return Verdict.READY  # gunicorn answers 400
        self.length = int(lengths[0]) if lengths else 0
        if self.length > self.limits.max_body_bytes:
            return Verdict.BODY_TOO_LARGE
        return None

    def _chunks(self) -> Verdict:
        while True:
            line_end = self.data.find(b"\r\n", self.chunk_at)
            if line_end < 0:
                return Verdict.BAD_CHUNKS if len(self.data) - self.chunk_at > MAX_CHUNK_LINE else Verdict.MORE
            size_text = bytes(self.data[self.chunk_at:line_end]).split(b";", 1)[0].rstrip(b" \t")
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                return Verdict.BAD_CHUNKS
            size = int(size_text, 16)
            if size == 0:
                return self._trailers(line_end + 2)
            if self.chunked_bytes + size > self.limits.max_body_bytes:
                return Verdict.BODY_TOO_LARGE
            chunk_end = line_end + 2 + size
            if len(self.data) < chunk_end + 2:
                return Verdict.MORE
            if self.data[chunk_end:chunk_end + 2] != b"\r\n":
                return Verdict.BAD_CHUNKS
            self.chunked_bytes += size
            self.chunk_at = chunk_end + 2

    def _trailers(self, start: int) -> Verdict:
        if self.data[start:start + 2] == b"\r\n" or self.data.find(b"\r\n\r\n", start) >= 0:
            return Verdict.READY
        return Verdict.HEAD_TOO_LARGE if len(self.data) - start > self.limits.max_head_bytes else Verdict.MORE


# --- answers given without a thread -------------------------------------------------------------------------------

REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
           431: "Request Header Fields Too Large"}


def refusal(status: int, message: str) -> bytes:
    """A complete "Connection: close" answer with the app's JSON error shape."""
    body = json.dumps({"error": message, "status": status}).encode()
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def refusal_message(verdict: Verdict, limits: ReadLimits) -> tuple[int, str]:
    if verdict is Verdict.BODY_TOO_LARGE:
        mb = limits.max_body_bytes / 1024 / 1024
        return 413, (f"the request body is larger than MAX_REQUEST_MB={mb:g} MiB; send fewer tasks at once or raise "
                     "MAX_REQUEST_MB")
    if verdict is Verdict.HEAD_TOO_LARGE:
        return 431, f"the request head (request line and headers) is larger than {limits.max_head_bytes} bytes"
    if verdict is Verdict.BAD_CHUNKS:
        return 400, "the chunked request body is malformed (RFC 9112 section 7.1)"
    if verdict is Verdict.TIMED_OUT:
        return 408, (f"the request was not complete within REQUEST_READ_TIMEOUT_S={limits.read_timeout_s:g} s; send "
                     "it whole, or raise the server's REQUEST_READ_TIMEOUT_S for slow links")
    raise ValueError(f"{verdict!r} is not a refusal")


class _Throttled:
    """One log line per REFUSAL_LOG_EVERY_S at most (a flood of slow sockets must not flood the log); the lines
    left out are counted in the next one."""

    def __init__(self, log):
        self.log, self.last, self.skipped = log, float("-inf"), 0

    def warning(self, line: str) -> None:
        now = time.monotonic()
        if now - self.last < REFUSAL_LOG_EVERY_S:
            self.skipped += 1
            return
        more = f" (and {self.skipped} more refusals since the last such line)" if self.skipped else ""
        self.log.warning(line + more)
        self.last, self.skipped = now, 0


# --- gunicorn ---------------------------------------------------------------------------------------------------

class BufferingThreadWorker(ThreadWorker):
    """gthread, but the event loop reads each request whole (within the read deadline) before a thread takes it."""

    worker_connections: int  # ThreadWorker's (gunicorn has no type hints)

    def init_process(self) -> None:
        self.limits = ReadLimits.from_env()
        self.reading: dict = {}  # TConn -> PendingRequest; insertion order is deadline order (one timeout)
        self.refusals = _Throttled(self.log)
        self.buffering = self._plain_http()
        self._raise_fd_limit()
        super().init_process()  # runs the worker until it stops

    def _plain_http(self) -> bool:
        cfg = self.cfg
        other = [name for name, on in (("TLS", cfg.is_ssl), ("HTTP/2", "h2" in cfg.http_protocols),
                                       ("the PROXY protocol", cfg.proxy_protocol != "off"),
                                       ("the uwsgi protocol", getattr(cfg, "protocol", "http") != "http")) if on]
        if other:
            self.log.warning("%s: requests are not read whole before a thread takes them, so slow clients can "
                             "hold threads as with gthread; put a buffering proxy (nginx) in front",
                             ", ".join(other))
        return not other

    def _raise_fd_limit(self) -> None:
        """Every open connection is a descriptor: a soft limit under worker_connections would make accept() fail
        and stop the worker, so raise it as far as the hard limit allows, else accept fewer connections."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.worker_connections + FD_MARGIN
        if soft != resource.RLIM_INFINITY and soft < wanted:
            new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (ValueError, OSError):
                pass
            if soft < wanted:
                self.worker_connections = max(self.cfg.threads + 1, soft - FD_MARGIN)
                self.log.warning("open files limit %d: accepting at most %d connections, not worker_connections=%d",
                                 soft, self.worker_connections, self.cfg.worker_connections)

    # gthread calls this for a new connection, a kept-alive one that became readable, and read-ahead bytes left
    # after a response: the one place where a connection goes to the thread pool.
    def enqueue_req(self, conn):
        if not self.buffering:
            return super().enqueue_req(conn)
        held = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        pending = PendingRequest(time.monotonic() + self.limits.read_timeout_s, self.limits, held)
        if pending.verdict is Verdict.MORE:
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
            self.reading[conn] = pending
            self._continue_if_asked(conn, pending)
        else:
            self._settle(conn, pending)

    def _on_readable(self, conn, _sock) -> None:
        pending = self.reading[conn]
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._stop_reading(conn)
            self._close(conn)
        elif pending.feed(data) is Verdict.MORE:
            self._continue_if_asked(conn, pending)
        else:
            self._stop_reading(conn)
            self._settle(conn, pending)

    def _continue_if_asked(self, conn, pending: PendingRequest) -> None:
        # The body is read here, before gunicorn would say "100 Continue": say it now (a second one from gunicorn
        # later is allowed: clients read any number of 1xx answers, RFC 9110 section 15.2).
        if pending.wants_continue:
            pending.continue_sent = True
            self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _settle(self, conn, pending: PendingRequest) -> None:
        if pending.verdict is not Verdict.READY:
            return self._refuse(conn, pending)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(pending.data))
        conn.data_ready = True  # gthread's thread must not wait for more bytes first
        super().enqueue_req(conn)

    def _refuse(self, conn, pending: PendingRequest) -> None:
        status, message = refusal_message(pending.verdict, self.limits)
        self._send(conn, refusal(status, message))
        self.refusals.warning(f"{status} to {_peer(conn.client)}: {message}")
        self._close(conn)

    @staticmethod
    def _send(conn, data: bytes) -> None:
        try:
            conn.sock.send(data)  # small, on a socket with nothing else to send: no need to wait
        except OSError:
            pass

    def _stop_reading(self, conn) -> None:
        self.reading.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _close(self, conn) -> None:
        self.nr_conns -= 1
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()

    # gthread calls this once a second (and while it stops): expire requests past their deadline too.
    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn, pending in list(self.reading.items()):
            idle_while_stopping = not self.alive and not pending.data
            if pending.deadline > now and not idle_while_stopping:
                if self.alive:
                    break  # the rest expire later (insertion order is deadline order)
                continue
            self._stop_reading(conn)
            if pending.data:
                pending.verdict = Verdict.TIMED_OUT
                self._refuse(conn, pending)
            else:
                self._close(conn)


def _peer(client) -> str:
    if isinstance(client, (tuple, list)) and client:
        return f"{client[0]}:{client[1]}" if len(client) > 1 else str(client[0])
    return str(client or "unix socket")[:200]


# --- Flask's development server (python _wsgi.py) ---------------------------------------------------------------

class BufferingRequestHandler(WSGIRequestHandler):
    """werkzeug's handler (a thread per connection, so slow clients do not starve other requests there), with the
    worker's bounds: the request head and body must arrive within the read deadline, counted from the start of the
    connection or of the wait for its next request, and the body is read whole before the app runs (a slow body
    would hold a /predict slot otherwise). Past the deadline the connection gets 408 and is shut."""

    limits: ReadLimits = ReadLimits(30.0, 100 * 1024 * 1024)  # _wsgi.py sets the configured ones

    @classmethod
    def with_limits(cls, limits: ReadLimits) -> type:
        return type(cls.__name__, (cls,), {"limits": limits})

    def handle_one_request(self) -> None:
        self._lock = threading.Lock()
        self._reading = True
        self.raw_requestline = b""  # set once a request line arrived: then a cut-off gets a 408
        timer = threading.Timer(self.limits.read_timeout_s, self._cut_off)
        timer.daemon = True
        timer.start()
        try:
            super().handle_one_request()
        finally:
            timer.cancel()

    def make_environ(self):
        environ = super().make_environ()
        length = environ.get("CONTENT_LENGTH", "")
        if environ.get("wsgi.input_terminated"):  # chunked: werkzeug's reader ends at the last chunk
            body = environ["wsgi.input"].read(self.limits.max_body_bytes + 1)
        elif length.isascii() and length.isdigit() and int(length) <= self.limits.max_body_bytes:
            body = self.rfile.read(int(length))
            if len(body) < int(length):
                raise ConnectionError("the client sent less than its Content-Length")
        else:
            body = None  # none, or larger than the app takes: the app answers without reading it
        with self._lock:
            if not self._reading:
                raise ConnectionError("the request was cut off at its read deadline")
            self._reading = False  # the app runs: the deadline was for reading
        if body is not None:
            environ["wsgi.input"] = io.BytesIO(body)
        return environ

    def _cut_off(self) -> None:
        with self._lock:
            if not self._reading:
                return
            self._reading = False
        if self.raw_requestline:  # an idle kept-alive connection is closed without a word
            status, message = refusal_message(Verdict.TIMED_OUT, self.limits)
            try:
                self.connection.sendall(refusal(status, message))
            except OSError:
                pass
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns: the thread ends
        except OSError:
            pass
