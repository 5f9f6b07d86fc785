"""Upload images with their boxes into a Label Studio project through the API (``--upload``).

A task JSON cannot point at files Label Studio does not have yet, so ``--upload`` does it in Label Studio's own
order: upload the image files (``POST /api/projects/<id>/import``, multipart, ``return_task_ids=true``), which
creates one task per file with ``data.<key> = /data/upload/<project>/<8 hex>-<name>``; then attach each file's
boxes to its task (``POST /api/predictions`` or ``POST /api/tasks/<id>/annotations``). Authentication is the
backend's own (legacy ``Token`` or a personal access token refreshed to ``Bearer``).

Files go in small batches whose names are unique within the batch, so every new task maps back to its file.
"""

from __future__ import annotations

import logging
import mimetypes
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional, Sequence

from ..labelstudio.client import LabelStudioAuthError, LabelStudioSession
from .problems import ConversionError
from .targets import image_name_from_ref

log = logging.getLogger("yolo_backend.convert")

UPLOAD_BATCH = 20


def _batches(images: Sequence[Path], size: int) -> list[list[int]]:
    """Indices in batches of at most ``size`` whose file names are unique within the batch."""
    batches: list[list[int]] = []
    pending = list(range(len(images)))
    while pending:
        batch: list[int] = []
        names: set[str] = set()
        rest: list[int] = []
        for i in pending:
            if len(batch) < size and images[i].name not in names:
                batch.append(i)
                names.add(images[i].name)
            else:
                rest.append(i)
        batches.append(batch)
        pending = rest
    return batches


def _check(response, what: str):
    if response.status_code >= 400:
        raise ConversionError(f"Label Studio refused to {what}: HTTP {response.status_code} "
                              f"{response.text[:300]}")
    return response.json() if response.content else None


def upload_tasks(url: str, api_key: str, project: int, images: Sequence[Path], tasks: Sequence[dict],
                 data_key: str = "image", batch_size: int = UPLOAD_BATCH, progress: bool = True) -> list[dict]:
    """Upload ``images`` to ``project`` and attach ``tasks[i]``'s predictions/annotations to image i's new task.

    Returns the tasks as created (``id`` and the ``/data/upload/...`` reference filled in), for the record.
    """
    session = LabelStudioSession(url, api_key, timeout=120.0)
    created: list[Optional[dict]] = [None] * len(images)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), desc="uploading", unit="img")
    try:
        for batch in _batches(list(images), batch_size):
            task_ids = _upload_files(session, project, [images[i] for i in batch])
            by_name = {}
            for task_id in task_ids:
                task = _check(session.get(f"/api/tasks/{task_id}"), f"read task {task_id}")
                ref = (task.get("data") or {}).get(data_key)
                if not isinstance(ref, str):
                    raise ConversionError(f"uploaded task {task_id} has no {data_key!r} in its data "
                                          f"({', '.join(task.get('data') or {})}); the project's label config "
                                          f"should read the image from ${data_key}")
                by_name[image_name_from_ref(ref)] = (task_id, ref)
            for i in batch:
                if images[i].name not in by_name:
                    raise ConversionError(f"{images[i]}: uploaded, but no new task of project {project} points at "
                                          "it")
                task_id, ref = by_name[images[i].name]
                created[i] = _attach(session, project, task_id, ref, tasks[i], data_key)
            if bar is not None:
                bar.update(len(batch))
    except LabelStudioAuthError as exc:
        raise ConversionError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    return [t for t in created if t is not None]


def _upload_files(session: LabelStudioSession, project: int, paths: Sequence[Path]) -> list[int]:
    with ExitStack() as stack:
        files = []
        for i, path in enumerate(paths):
            handle = stack.enter_context(open(path, "rb"))
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files.append((f"file{i}", (path.name, handle, mime)))
        body = _check(session.request("POST", f"/api/projects/{project}/import",
                                      params={"return_task_ids": "true"}, files=files),
                      f"import {len(paths)} file(s) into project {project}")
    task_ids = (body or {}).get("task_ids")
    if not isinstance(task_ids, list) or len(task_ids) != len(paths):
        raise ConversionError(f"project {project}: the upload answered {body!r}, expected one task id per file "
                              "(is this Label Studio 1.23 or newer?)")
    return task_ids


def _attach(session: LabelStudioSession, project: int, task_id: int, ref: str, task: dict, data_key: str) -> dict:
    record: dict[str, Any] = {"id": task_id, "data": {**task.get("data", {}), data_key: ref}}
    for prediction in task.get("predictions") or []:
        _check(session.request("POST", "/api/predictions",
                               json={**prediction, "task": task_id, "project": project}),
               f"add a prediction to task {task_id}")
        record.setdefault("predictions", []).append(prediction)
    for annotation in task.get("annotations") or []:
        _check(session.request("POST", f"/api/tasks/{task_id}/annotations", json=annotation),
               f"add an annotation to task {task_id}")
        record.setdefault("annotations", []).append(annotation)
    return record
