"""Task videos: Label Studio URL -> a file on this machine, for the decoder to stream from.

The same sources, key rules and origin checks as task images (``images.ImageFetcher.source``: uploads, Local
Storage, cloud URIs presigned by Label Studio, plain URLs, data URIs); only the bounds differ. A video is never held
in memory: a download goes chunk by chunk into a temporary file (deleted when the ``with`` ends), bounded by
``max_bytes`` and one deadline for the whole download; a Local Storage file on this machine is read in place.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .images import ImageFetcher, ImageFetchError
from .urls import shorten


@dataclass(frozen=True)
class VideoFetchBounds:
    """The largest video file accepted, and the seconds one download may take in all."""

    max_bytes: int = 2048 << 20
    timeout: float = 60.0


@contextlib.contextmanager
def video_file(fetcher: ImageFetcher, url: object, task_id: Optional[int],
               bounds: VideoFetchBounds = VideoFetchBounds()) -> Iterator[Path]:
    """The task's video as a local file for the ``with`` block; ImageFetchError says why there is none."""
    if not isinstance(url, str) or not url.strip():
        raise ImageFetchError(f"the task has no video URL (got {shorten(repr(url))})")
    how, what = fetcher.source(url, task_id)
    if how == "file":
        try:
            size = os.path.getsize(what)
        except OSError as exc:
            raise ImageFetchError(f"{shorten(url)}: cannot read {shorten(what)}: {exc}") from None
        if size > bounds.max_bytes:
            raise ImageFetchError(f"{shorten(url)}: {size >> 20} MiB is larger than VIDEO_MAX_MB="
                                  f"{bounds.max_bytes >> 20}; cut the clip or raise the bound")
        yield Path(what)
        return
    with tempfile.NamedTemporaryFile(prefix="task-video-", suffix=".video") as out:
        if how == "data":
            out.write(_data_uri_bytes(what, bounds.max_bytes))
        else:
            fetcher.stream(how, what, url, out.write, bounds.max_bytes, bounds.timeout, "VIDEO_TIMEOUT")
        out.flush()
        yield Path(out.name)


def _data_uri_bytes(uri: str, max_bytes: int) -> bytes:
    payload = uri.split(",", 1)[1] if "," in uri else ""
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageFetchError(f"a data URI video larger than VIDEO_MAX_MB={max_bytes >> 20}; refused")
    try:
        return base64.b64decode(payload, validate=False)
    except binascii.Error as exc:
        raise ImageFetchError(f"data URI is not valid base64: {exc}") from None
