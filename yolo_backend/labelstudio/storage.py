"""Where a task's image lives when it is not a plain URL: Label Studio's Local Storage (``/data/local-files/?d=``)
and cloud storage URIs (``s3://``, ``gs://``, ``azure-blob://``, presigned by Label Studio). The same rules as
Label Studio's own: ``?d=`` is relative to LOCAL_FILES_DOCUMENT_ROOT, and a cloud URI is handed to
``/tasks/<id>/presign/?fileuri=<base64url of the URI>``. Standard library only.
"""

from __future__ import annotations

import base64
import os
import posixpath
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlparse

CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")


def is_cloud_storage_uri(url: str) -> bool:
    return isinstance(url, str) and url.startswith(CLOUD_PREFIXES)


def presign_path(task_id: int, uri: str) -> str:
    """The Label Studio path that redirects to a signed URL for a cloud storage ``uri`` of task ``task_id``."""
    return f"/tasks/{int(task_id)}/presign/?fileuri={base64.urlsafe_b64encode(uri.encode()).decode()}"


def local_files_root() -> Optional[Path]:
    """LOCAL_FILES_DOCUMENT_ROOT (or LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), as Label Studio reads it; None when
    unset or "/" (then Local Storage files are fetched from Label Studio)."""
    for name in ("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "LOCAL_FILES_DOCUMENT_ROOT"):
        value = os.environ.get(name)
        if value and value.strip() and value.strip() != "/":
            return Path(value.strip())
    return None


def local_storage_path(url: str) -> Optional[str]:
    """The file on this machine for a ``/data/local-files/?d=<path>`` URL: inside LOCAL_FILES_DOCUMENT_ROOT (a
    ``..`` never leaves it) and existing; None otherwise (then it is fetched from Label Studio)."""
    root = local_files_root()
    values = parse_qs(urlparse(url).query, keep_blank_values=True).get("d")
    relative = values[-1] if values else ""
    if root is None or not relative:
        return None
    try:
        path = (root / posixpath.normpath("/" + relative).lstrip("/")).resolve()
        path.relative_to(root.resolve())
    except (ValueError, OSError):  # outside the root, or not a path at all (a NUL byte)
        return None
    return str(path) if path.is_file() else None
