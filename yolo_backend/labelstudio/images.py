"""Task images: Label Studio URL -> bytes (with a bounded on-disk cache) -> RGB array.

What a task's image field can hold, and where it is fetched from:
- ``/data/upload/<project>/<file>`` (uploads; also ``upload/...``): Label Studio, with the API key;
- ``/data/local-files/?d=<path>`` (Local Storage): read from disk when ``LOCAL_FILES_DOCUMENT_ROOT`` is set here
  and the file exists (label-studio-sdk's resolver, same rules as Label Studio), else from Label Studio;
- ``s3://``, ``gs://``, ``azure-blob://`` (cloud storage): Label Studio's presign endpoint
  ``/tasks/<task id>/presign/?fileuri=<base64 of the URI>``, which redirects to a signed URL;
- ``http(s)://...``: fetched directly; with the API key only when the host is Label Studio's;
- ``data:image/...;base64,...``: decoded in place.

label-studio-sdk's ``get_local_path`` resolves the same URLs, but it has no timeout, sends a personal access
token as a Bearer token without exchanging it first (Label Studio answers 401), cannot fall back between keys
and caches without bound, so we use its building blocks (presign encoding, cloud-URI test, Local Storage
resolver) and do the download here.

Decoding applies the EXIF orientation (``cv2.imdecode`` does by default): browsers show photos upright, and
Label Studio takes ``original_width`` / ``original_height`` from the browser's natural size, so boxes must be
computed on the upright image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import requests

from ..atomic import atomic_write
from ..image_header import DEFAULT_MAX_IMAGE_PIXELS, ImageHeaderError, ImageTooLargeError, checked_size
from .client import LabelStudioAuthError, LabelStudioSession
from .deadline import Deadline, DeadlinePassed
from .storage import is_cloud_storage_uri, local_storage_path, presign_path
from .urls import UnsafeURL, checked_url, shorten

log = logging.getLogger(__name__)

# Larger downloads are refused: a task image this big is a mistake, and it would exhaust memory.
MAX_IMAGE_BYTES = 256 * 1024 * 1024


class ImageFetchError(RuntimeError):
    """A task image could not be fetched or decoded; the message says which URL and why."""


# --- decoding ---------------------------------------------------------------------------------------------

def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Image file bytes -> HxWx3 uint8 RGB, EXIF orientation applied. Not an image, or more than ``max_pixels``
    (read from the header, before any pixel is decoded) -> ImageFetchError."""
    import cv2

    if not data:
        raise ImageFetchError("empty file")
    try:
        checked_size(data, max_pixels)
    except ImageTooLargeError as exc:
        raise ImageFetchError(str(exc)) from None
    except ImageHeaderError:
        head = data[:64].lstrip().lower()
        hint = " (it looks like an HTML page: a login page means the API key was not accepted)" \
            if head.startswith((b"<!doctype html", b"<html")) else ""
        raise ImageFetchError(f"not an image ({len(data)} bytes){hint}") from None
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if array is not None and array.size:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    # Formats this OpenCV build lacks (e.g. animated GIF) may still open with Pillow.
    try:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Exception:
        raise ImageFetchError(f"not an image ({len(data)} bytes)") from None


# --- cache ------------------------------------------------------------------------------------------------

class ImageCache:
    """Downloaded image files under ``directory``, at most ``max_bytes`` in all; the least recently used
    files go first. Safe for threads; processes sharing the folder only ever see whole files."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._size: Optional[int] = None  # bytes in the folder, scanned on first use

    @staticmethod
    def key_for(source: str) -> str:
        return hashlib.sha256(source.encode("utf-8")).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.img"

    def get(self, key: str) -> Optional[bytes]:
        path = self.path_for(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # mark as recently used
            return data
        except OSError:
            return None

    def put(self, key: str, data: bytes) -> Optional[Path]:
        if len(data) > self.max_bytes:
            return None
        path = self.path_for(key)
        try:
            replaced = path.stat().st_size
        except OSError:
            replaced = 0
        try:
            with atomic_write(path, "wb", durable=False) as f:  # readers never see half a file
                f.write(data)
        except OSError as exc:
            log.warning("image cache: could not write %s: %s", path, exc)
            return None
        with self._lock:
            if self._size is None:
                self._size = self._scan_size()
            else:
                self._size += len(data) - replaced
            if self._size > self.max_bytes:
                self._evict()
        return path

    def _files(self) -> list[os.DirEntry]:
        try:
            return [e for e in os.scandir(self.directory) if e.is_file() and e.name.endswith(".img")]
        except OSError:
            return []

    def _scan_size(self) -> int:
        return sum(e.stat().st_size for e in self._files())

    def _evict(self) -> None:
        """Delete least recently used files until the folder is at most 90 % of the bound (so eviction is not
        needed on every write)."""
        entries = []
        for e in self._files():
            try:
                st = e.stat()
                entries.append((st.st_mtime, st.st_size, e.path))
            except OSError:
                continue
        entries.sort()
        total = sum(size for _, size, _ in entries)
        target = int(self.max_bytes * 0.9)
        for _, size, path in entries:
            if total <= target:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass
        self._size = total

    @property
    def size_bytes(self) -> int:
        return self._scan_size()


# --- fetching ---------------------------------------------------------------------------------------------

def shown_url(url: str, limit: int = 200) -> str:
    """A task's image reference as log lines and errors show it: a data URI by its size (it can be megabytes of
    base64), anything else cut to ``limit`` characters, control characters escaped."""
    return shorten(url, limit)


class ImageFetcher:
    """Fetches task images from wherever the task points, through ``session`` (auth, fallback between keys)."""

    def __init__(self, session: LabelStudioSession, cache: Optional[ImageCache] = None, timeout: float = 10.0,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.session = session
        self.cache = cache
        self.timeout = timeout        # seconds for the whole download, not per read
        self.max_pixels = max_pixels

    def source(self, url: str, task_id: Optional[int]) -> tuple[str, str]:
        """(how, what): ("file", path) | ("data", url) | ("ls", url-or-path) | ("web", url)."""
        url = url.strip()
        if url.startswith("data:"):
            return "data", url
        if url.startswith(("upload/", "/upload/")):
            url = "/data/" + url.lstrip("/")
        if url.startswith("/data/"):
            if "?d=" in url:
                local = local_storage_path(url)
                if local:
                    return "file", local
            return "ls", url
        if is_cloud_storage_uri(url):
            number = task_id if isinstance(task_id, int) and not isinstance(task_id, bool) else \
                int(task_id) if isinstance(task_id, str) and task_id.isascii() and task_id.isdigit() else None
            if number is None:
                raise ImageFetchError(f"{shorten(url)}: a cloud storage URI is presigned by Label Studio for its "
                                      f"task, so the task needs an integer id (got {shorten(repr(task_id), 40)})")
            return "ls", presign_path(number, url)
        if url.lower().startswith(("http://", "https://")):
            try:
                url = checked_url(url)
            except UnsafeURL as exc:
                raise ImageFetchError(f"refused: {exc}; fix the task's URL") from None
            return ("ls" if self.session.is_label_studio_url(url) else "web"), url
        raise ImageFetchError(f"{shorten(url)!r} is not an image URL this backend understands (expected "
                              "/data/upload/..., /data/local-files/?d=..., http(s)://..., s3://, gs://, "
                              "azure-blob://)")

    def _cache_key(self, how: str, what: str) -> Optional[str]:
        if self.cache is None or how in ("file", "data"):
            return None
        if how == "ls" and not what.startswith(("http://", "https://")):
            what = f"{self.session.base_url or ''}{what}"
        return ImageCache.key_for(what)

    def _fetch(self, url: str, task_id: Optional[int]) -> tuple[bytes, Optional[str], bool]:
        """(bytes, cache key or None, whether they came from the cache)."""
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError(f"the task has no image URL (got {shorten(repr(url))})")
        how, what = self.source(url, task_id)
        if how == "file":
            try:
                if os.path.getsize(what) > MAX_IMAGE_BYTES:
                    raise ImageFetchError(f"{shorten(url)}: {shorten(what)} is larger than "
                                          f"{MAX_IMAGE_BYTES >> 20} MiB; refused")
                return Path(what).read_bytes(), None, False
            except OSError as exc:
                raise ImageFetchError(f"{shorten(url)}: cannot read {shorten(what)}: {exc}") from None
        if how == "data":
            try:
                return base64.b64decode(what.split(",", 1)[1], validate=False), None, False
            except (IndexError, binascii.Error) as exc:
                raise ImageFetchError(f"data URI is not valid base64: {exc}") from None
        key = self._cache_key(how, what)
        if key is not None and self.cache is not None:  # a key only with a cache
            cached = self.cache.get(key)
            if cached is not None:
                return cached, key, True
        return self._download(how, what, url), key, False

    def _download(self, how: str, what: str, original: str) -> bytes:
        """The whole download within ``timeout`` seconds: a server dripping bytes is cut off at the deadline."""
        chunks: list[bytes] = []
        self.stream(how, what, original, chunks.append, MAX_IMAGE_BYTES, self.timeout)
        return b"".join(chunks)

    def stream(self, how: str, what: str, original: str, sink: Callable[[bytes], Any], max_bytes: int,
               timeout: float, setting: str = "IMAGE_TIMEOUT") -> None:
        """Download ``what`` (``how``: "ls" or "web", from ``source``) into ``sink`` chunk by chunk, at most
        ``max_bytes`` and ``timeout`` seconds in all (``setting`` names the timeout in the error)."""
        deadline = Deadline(timeout)
        try:
            with deadline:
                if how == "ls":
                    response = self.session.get(what, timeout=timeout, stream=True)
                else:
                    response = self.session.fetch_plain(what, timeout=timeout, stream=True)
                deadline.watch(response)
                deadline.check()  # cut off while the headers came: what was read of them is not an answer
                with response:
                    if response.status_code >= 400:
                        hint = {404: "not found", 401: "unauthorised", 403: "forbidden"}.get(response.status_code,
                                                                                           "error")
                        raise ImageFetchError(f"{shorten(original)}: HTTP {response.status_code} ({hint}) from "
                                              f"{shorten(response.url)}")
                    total = 0
                    for chunk in response.iter_content(1 << 16):
                        total += len(chunk)
                        if total > max_bytes:
                            raise ImageFetchError(f"{shorten(original)}: larger than {max_bytes >> 20} MiB; "
                                                  "refused")
                        sink(chunk)
                        deadline.check()
                    deadline.check()
        except (LabelStudioAuthError, UnsafeURL) as exc:
            raise ImageFetchError(f"{shorten(original)}: {exc}") from None
        except (requests.RequestException, OSError, DeadlinePassed) as exc:
            if deadline.passed or isinstance(exc, requests.Timeout):
                raise ImageFetchError(f"{shorten(original)}: timed out after {timeout:g} s ({setting})") from None
            raise ImageFetchError(f"{shorten(original)}: download failed: {shorten(exc)}") from None

    def load(self, url: str, task_id: Optional[int] = None) -> np.ndarray:
        """The task image as HxWx3 uint8 RGB (EXIF orientation applied). Decodable downloads are cached."""
        data, key, cached = self._fetch(url, task_id)
        try:
            image = decode_image(data, self.max_pixels)
        except ImageFetchError as exc:
            raise ImageFetchError(f"{shown_url(url)}: {exc}") from None
        if key is not None and self.cache is not None and not cached:
            self.cache.put(key, data)
        return image

    def local_path(self, url: str, task_id: Optional[int] = None) -> str:
        """A file on this machine holding the image (the classic ``get_local_path``): the Local Storage file
        itself, or the cached download."""
        how, what = self.source(url, task_id)
        if how == "file":
            return what
        if self.cache is None:
            raise ImageFetchError(f"{shorten(url)}: no image cache folder configured (IMAGE_CACHE_DIR)")
        data, key, cached = self._fetch(url, task_id)
        key = key or ImageCache.key_for(url)
        path = self.cache.path_for(key)
        if not cached or not path.exists():
            written = self.cache.put(key, data)
            if written is None:
                raise ImageFetchError(f"{shorten(url)}: could not be written to the image cache {self.cache.directory}")
            path = written
        return str(path)
