"""Which origin a URL really reaches, decided the way the HTTP client that fetches it decides.

A key must go only to the origin it belongs to. Python's ``urllib.parse`` and requests/urllib3 read some URLs
differently: in ``http://127.0.0.1:9999\\@ls:8080/x`` the first sees host ``ls`` port 8080, the second connects to
port 9999 (``\\`` ends the authority there, as in browsers). So every check here runs on the URL *as requests
prepares it* (``PreparedRequest.prepare_url``, the string its adapter connects to), and the adapter that attaches
a key compares this origin with the pool it is about to use (``client.KeyedAdapter``).

Before that, ``checked_url`` refuses URLs whose meaning depends on the parser: an authority holding ``\\``, ``@``
(user info), ``%`` escapes, whitespace or control characters anywhere, non-ASCII in the authority. Label Studio
never makes such URLs; an annotator who imports a task can. Standard library and requests only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

import requests

DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters that end an authority for one parser or another (WHATWG treats "\" as "/" in http(s) URLs).
_AUTHORITY_END = "/?#\\"
SHOWN_CHARS = 200


class UnsafeURL(ValueError):
    """A URL that two parsers could read as different hosts (or that is not a URL at all); the message says why."""


@dataclass(frozen=True)
class Origin:
    """Scheme, host and port a request connects to; a key belongs to exactly one."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def shorten(text: object, limit: int = SHOWN_CHARS) -> str:
    """A user-supplied string as log lines and messages show it: at most ``limit`` characters, control characters
    escaped (a URL of megabytes, or one with newlines, cannot grow or forge log lines)."""
    value = str(text)
    if value.startswith("data:"):
        head = value[:value.find(",") + 1 or 40][:40]
        return f"{head}... ({len(value)} characters)"
    return cut(value, limit)


def cut(text: object, limit: int = SHOWN_CHARS) -> str:
    """Free text (an error message, a list of field names) as a log line shows it: at most ``limit`` characters,
    control characters escaped."""
    value = str(text)
    shown = value[:limit]
    shown = shown.encode("unicode_escape").decode("ascii") if not shown.isprintable() else shown
    return shown + (f"... ({len(value)} characters)" if len(value) > limit else "")


def checked_url(url: str) -> str:
    """``url`` (stripped of surrounding whitespace) when it is an absolute http(s) URL that every parser reads
    alike; UnsafeURL saying what is wrong otherwise."""
    if not isinstance(url, str):
        raise UnsafeURL(f"not a URL: {type(url).__name__}")
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in DEFAULT_PORTS:
        raise UnsafeURL(f"{shorten(url)}: not an http(s) URL")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UnsafeURL(f"{shorten(url)}: whitespace or control characters in a URL")
    end = min((i for i in (rest.find(c) for c in _AUTHORITY_END) if i >= 0), default=len(rest))
    authority = rest[:end]
    if rest[end:end + 1] == "\\":
        raise UnsafeURL(f"{shorten(url)}: a backslash after the host (parsers disagree on the host it names)")
    if not authority:
        raise UnsafeURL(f"{shorten(url)}: no host")
    if not authority.isascii():
        raise UnsafeURL(f"{shorten(url)}: non-ASCII characters in the host (write it in ASCII / punycode)")
    for ch, why in (("@", "user info (@) in the host part"), ("%", "%-escapes in the host part")):
        if ch in authority:
            raise UnsafeURL(f"{shorten(url)}: {why}")
    return url


def prepared_url(url: str) -> str:
    """``url`` checked, then as requests prepares it (the string its adapter parses to connect)."""
    request = requests.PreparedRequest()
    try:
        request.prepare_url(checked_url(url), None)
    except requests.RequestException as exc:
        raise UnsafeURL(f"{shorten(url)}: {exc}") from None
    assert request.url is not None  # prepare_url set it
    return request.url


def origin_of(url: Optional[str]) -> Optional[Origin]:
    """The origin a request for ``url`` connects to (host lower-cased, default port filled in); None for anything
    that is not a safe absolute http(s) URL."""
    if not url:
        return None
    try:
        return _origin_of_prepared(prepared_url(url))
    except UnsafeURL:
        return None


def _origin_of_prepared(prepared: str) -> Optional[Origin]:
    """Parsed the way requests' adapter parses a prepared URL to pick its connection."""
    try:
        parts = urlsplit(prepared)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return Origin(scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme])


def normalise_url(url: Optional[str]) -> Optional[str]:
    """A Label Studio base URL: ``http://host:8080/`` -> ``http://host:8080``; empty -> None; anything that is not a
    safe absolute http(s) URL -> ValueError saying what to write."""
    if not url or not url.strip():
        return None
    try:
        url = checked_url(url).rstrip("/")
    except UnsafeURL as exc:
        raise ValueError(f"Label Studio URL {exc} (write it like http://localhost:8080)") from None
    if origin_of(url) is None:
        raise ValueError(f"Label Studio URL {shorten(url)} has no usable host (write it like http://localhost:8080)")
    return url
