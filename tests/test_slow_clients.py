"""Slow clients: gunicorn's worker (gunicorn.conf.py's BufferingThreadWorker) reads each request whole before a
thread takes it, within REQUEST_READ_TIMEOUT_S; Flask's development server (`python _wsgi.py`) gets the same
deadline. The framing is checked on its own, then real servers are attacked from outside with slow sockets
(the benchmark's attacker: benchmarks/bench_slow_clients.py measures the latencies)."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from yolo_backend.server import request_buffering
from yolo_backend.server.request_buffering import (
    MAX_HEAD_BYTES, PendingRequest, ReadLimits, Verdict, refusal, refusal_message)

ROOT = Path(__file__).resolve().parents[1]
READ_TIMEOUT_S = 3.0
LIMITS = ReadLimits(read_timeout_s=READ_TIMEOUT_S, max_body_bytes=1000)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_slow_clients", ROOT / "benchmarks" / "bench_slow_clients.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _bench()


def pending(*pieces: bytes) -> PendingRequest:
    request = PendingRequest(time.monotonic() + 10, LIMITS)
    for piece in pieces:
        request.feed(piece)
    return request


# --- framing -----------------------------------------------------------------------------------------------------

def test_a_head_dribbled_byte_by_byte_is_ready_at_its_blank_line():
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    request = pending()
    verdicts = [request.feed(head[i:i + 1]) for i in range(len(head))]
    assert verdicts[:-1] == [Verdict.MORE] * (len(head) - 1) and verdicts[-1] is Verdict.READY
    assert bytes(request.data) == head


def test_a_body_is_ready_when_content_length_bytes_are_there_and_pipelined_bytes_are_kept():
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
    request = pending(head, b"01234")
    assert request.verdict is Verdict.MORE
    assert request.feed(b"56789GET /health HTTP/1.1\r\n") is Verdict.READY
    assert bytes(request.data).endswith(b"56789GET /health HTTP/1.1\r\n")  # the next request goes to gunicorn too
    # Already whole when the connection is handed over (read-ahead left after the previous response).
    assert PendingRequest(0, LIMITS, head + b"0123456789").verdict is Verdict.READY


def test_chunked_bodies_are_read_to_their_last_chunk_and_trailers():
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    request = pending(head, b"5;ext=1\r\nhello\r\n", b"3\r\nab")
    assert request.verdict is Verdict.MORE
    assert request.feed(b"c\r\n0\r\n") is Verdict.MORE  # the trailer section is not over yet
    assert request.feed(b"\r\n") is Verdict.READY
    assert pending(head, b"0\r\nX-Trailer: 1\r\n\r\n").verdict is Verdict.READY
    assert pending(head, b"zz\r\n").verdict is Verdict.BAD_CHUNKS
    assert pending(head, b"5\r\nhelloXX").verdict is Verdict.BAD_CHUNKS  # no CRLF after the chunk's data
    assert pending(head, b"1" * 2000).verdict is Verdict.BAD_CHUNKS  # a chunk-size line that never ends
    assert pending(head, b"3e9\r\n").verdict is Verdict.BODY_TOO_LARGE  # 1001 bytes announced, 1000 allowed


def test_limits_are_answered_before_the_bytes_arrive():
    assert pending(b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n").verdict is Verdict.BODY_TOO_LARGE
    assert pending(b"POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n").verdict is Verdict.MORE
    too_long = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES
    assert pending(too_long).verdict is Verdict.HEAD_TOO_LARGE
    assert pending(too_long[:MAX_HEAD_BYTES - 10]).verdict is Verdict.MORE


def test_heads_gunicorn_refuses_at_once_go_to_gunicorn_at_once():
    """Conflicting framing, a bare LF: gunicorn's parser answers 400 without reading more, so they are handed
    over whole instead of waiting for a body that will not be read."""
    for head in (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                 b"POST / HTTP/1.1\r\nContent-Length: five\r\n\r\n",
                 b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                 b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"GET / HTTP/1.1\nHost: x\n"):
        assert pending(head).verdict is Verdict.READY, head
    assert pending(b"GET / HTTP/1.1\r\nHost: x\r\n").verdict is Verdict.MORE


def test_expect_100_continue_is_noticed_while_the_body_is_missing():
    request = pending(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert request.wants_continue
    request.continue_sent = True
    assert not request.wants_continue and request.feed(b"abc") is Verdict.READY
    assert not pending(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n").wants_continue


def test_refusals_are_complete_closing_json_answers():
    status, message = refusal_message(Verdict.TIMED_OUT, LIMITS)
    answer = refusal(status, message)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {"error": message, "status": 408} and "REQUEST_READ_TIMEOUT_S=3" in message
    assert refusal_message(Verdict.BODY_TOO_LARGE, ReadLimits(30, 100 * 1024 * 1024))[1].startswith(
        "the request body is larger than MAX_REQUEST_MB=100 MiB")
    with pytest.raises(ValueError):
        refusal_message(Verdict.READY, LIMITS)


def test_read_timeout_comes_from_the_settings_and_bad_values_say_what_to_set():
    assert ReadLimits.from_env({}).read_timeout_s == 30.0
    assert ReadLimits.from_env({"REQUEST_READ_TIMEOUT_S": "2.5"}).read_timeout_s == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="REQUEST_READ_TIMEOUT_S"):
            ReadLimits.from_env({"REQUEST_READ_TIMEOUT_S": bad})
    assert ReadLimits.from_env({"MAX_REQUEST_MB": "2"}).max_body_bytes == 2 * 1024 * 1024


class _Log:
    def __init__(self):
        self.lines = []

    def warning(self, line, *args):
        self.lines.append(line % args if args else line)


def test_refusals_are_logged_once_per_interval_with_a_count_of_the_rest(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(request_buffering.time, "monotonic", lambda: clock[0])
    log = _Log()
    throttled = request_buffering._Throttled(log)
    for line in ("408 a", "408 b", "408 c"):
        throttled.warning(line)
    clock[0] += request_buffering.REFUSAL_LOG_EVERY_S
    throttled.warning("431 d")
    assert log.lines == ["408 a", "431 d (and 2 more refusals since the last such line)"]


def test_the_open_files_limit_is_raised_for_worker_connections_or_fewer_are_accepted(monkeypatch):
    """An accept() that fails for want of descriptors would stop the worker (and drop its loaded model)."""
    import resource
    from types import SimpleNamespace

    def worker(soft, hard):
        limits = {"now": (soft, hard)}
        monkeypatch.setattr(request_buffering.resource, "getrlimit", lambda which: limits["now"])

        def setrlimit(which, value):
            if limits["now"][1] != resource.RLIM_INFINITY and value[0] > limits["now"][1]:
                raise ValueError("not allowed")
            limits["now"] = value
        monkeypatch.setattr(request_buffering.resource, "setrlimit", setrlimit)
        stub = SimpleNamespace(worker_connections=1000, cfg=SimpleNamespace(threads=8, worker_connections=1000),
                               log=_Log())
        request_buffering.BufferingThreadWorker._raise_fd_limit(stub)
        return stub, limits["now"]

    stub, now = worker(1024, resource.RLIM_INFINITY)
    assert now == (1000 + request_buffering.FD_MARGIN, resource.RLIM_INFINITY) and stub.worker_connections == 1000
    stub, now = worker(300, 300)
    assert stub.worker_connections == 300 - request_buffering.FD_MARGIN
    assert "at most 236 connections" in stub.log.lines[0]
    stub, now = worker(4096, 4096)
    assert now == (4096, 4096) and stub.worker_connections == 1000 and not stub.log.lines


# --- the real servers, from outside --------------------------------------------------------------------------------

def _exchange(server, data: bytes, timeout: float = 10.0, until_close: bool = True) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
            if not until_close and b"\r\n\r\n" in received:
                return received


def _answers(raw: bytes) -> list[int]:
    """The status codes of the final answers in a stream of HTTP/1.1 answers (1xx left out)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) if int(code) >= 200]


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory):
    """`gunicorn -c gunicorn.conf.py _wsgi:app` (the untrained model, no broker), a short read deadline, 1 MiB
    bodies."""
    server = bench.Server("gunicorn", tmp_path_factory.mktemp("gunicorn"),
                          {"REQUEST_READ_TIMEOUT_S": str(READ_TIMEOUT_S), "MAX_REQUEST_MB": "1",
                           "LOG_LEVEL": "INFO"})
    try:
        server.wait_healthy()
        server.warm_up()
        yield server
    finally:
        server.stop()


def _attack_and_check(server, sockets: int, seconds: float) -> None:
    """Both kinds of slow socket at once: /health keeps answering, a /predict is answered, and the server closes
    held sockets itself once their read deadline passed (408 when part of a request had come)."""
    with bench.SlowSockets(server.host, server.port, sockets // 2, "dribble", interval=0.5) as dribble, \
            bench.SlowSockets(server.host, server.port, sockets // 2, "body") as body, \
            bench.HealthProbe(server.host, server.port) as probe:
        time.sleep(1.0)
        status, predict_s = bench.timed_predict(server.host, server.port, timeout=30)
        time.sleep(max(0.0, seconds - 1.0 - predict_s))
    health = probe.summary()
    assert status == 200, server.log()[-3000:]
    assert health["asked"] >= 10 and health["failures"] == 0, health  # each /health answered within 5 s
    for slow in (dribble, body):
        assert slow.closed_by_server >= sockets // 2, (slow.mode, slow.closed_by_server)
        assert all(reply.startswith(b"HTTP/1.1 408 Request Timeout") for reply in slow.replies), slow.replies
        # Closed by the read deadline (checked once a second), not by anything sooner or much later.
        assert READ_TIMEOUT_S - 0.5 <= min(slow.lifetimes) and max(slow.lifetimes) <= READ_TIMEOUT_S + 3.0


def test_gunicorn_serves_while_slow_sockets_are_held_and_closes_them_at_the_deadline(gunicorn_server):
    _attack_and_check(gunicorn_server, sockets=40, seconds=10)
    assert "slow clients can hold threads" not in gunicorn_server.log()  # plain HTTP: buffering is on
    assert "408 to 127.0.0.1:" in gunicorn_server.log()  # one log line per refusal, throttled


def test_gunicorn_still_speaks_http_as_gthread_does(gunicorn_server):
    """Keep-alive, pipelining, chunked bodies, Expect: 100-continue and gunicorn's own 400s still work through
    the buffering; over-large heads and bodies are refused before they are read."""
    s = gunicorn_server
    pipelined = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"
    assert _answers(_exchange(s, pipelined)) == [200, 200, 200]
    with socket.create_connection((s.host, s.port), timeout=10) as sock:  # kept alive, the next one slow
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answers(sock.recv(65536)) == [200]
        time.sleep(0.3)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.3)
        sock.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        assert _answers(b"".join(iter(lambda: sock.recv(65536), b""))) == [200]
    body = json.dumps({"project": bench.PROJECT, "schema": bench.CONFIG}).encode()
    chunked = (b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    reply = _exchange(s, chunked)
    assert _answers(reply) == [200] and b"v0-untrained" in reply, reply

    with socket.create_connection((s.host, s.port), timeout=10) as sock:  # the body only after "100 Continue"
        sock.sendall(b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    assert _answers(reply) == [200] and b"v0-untrained" in reply, reply

    assert _answers(_exchange(s, b"POST /setup HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")) == [400]
    too_large = _exchange(s, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * 1024 * 1024))
    assert _answers(too_large) == [413] and b"MAX_REQUEST_MB=1 MiB" in too_large
    too_long = _exchange(s, b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n")
    assert _answers(too_long) == [431]


def test_gunicorn_stops_promptly_with_idle_sockets_held(tmp_path):
    """SIGTERM: connections that sent nothing do not hold up the graceful stop."""
    server = bench.Server("gunicorn", tmp_path, {"REQUEST_READ_TIMEOUT_S": "60"})
    try:
        server.wait_healthy()
        idle = [socket.create_connection((server.host, server.port)) for _ in range(20)]
        time.sleep(1.5)  # accepted and waiting for their first byte
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
        assert time.monotonic() - started < 15, "the stop waited for idle sockets"
        assert all(sock.recv(10) == b"" for sock in idle)  # closed by the server, without a word
        for sock in idle:
            sock.close()
    finally:
        server.stop()


def test_classic_entry_gets_the_same_deadline(tmp_path):
    """`python _wsgi.py` (Flask's threaded server): slow sockets do not stop /health or /predict (a slow body is
    read before the app, so it holds no /predict slot) and are closed at the read deadline."""
    server = bench.Server("classic", tmp_path, {"REQUEST_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
                                                "MAX_CONCURRENT_PREDICTS": "2"})
    try:
        server.wait_healthy()
        server.warm_up()
        _attack_and_check(server, sockets=20, seconds=8)
    finally:
        server.stop()


def test_a_bad_read_timeout_stops_gunicorn_before_it_binds(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "--chdir",
                             str(ROOT), "--bind", f"127.0.0.1:{bench.free_port()}", "_wsgi:app"],
                            env={**bench.os.environ, "REQUEST_READ_TIMEOUT_S": "soon", "MODEL_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "REQUEST_READ_TIMEOUT_S='soon'" in result.stderr, result.stderr
