"""Which predictions a task needs in a pool-scoring run, and where a version's clusters are kept."""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Collection

from ...settings import Settings


def plan(tasks: list[dict], predictions: list[dict], version: str, keep_old: bool,
         ours: Collection[str] = ()) -> tuple[list[dict], dict]:
    """(tasks still to score, {task id: stale prediction ids to delete once its new one is stored}).

    A task is done when it has a prediction of ``version`` with a cluster. Stale (``_stale_ids``): this version's
    predictions without a cluster and, unless ``keep_old``, the task's predictions of the backend's other versions
    (``ours``), so a task keeps one prediction of ours. A prediction of any other version (another model's,
    imported ones) is never touched."""
    by_task = _by_task(predictions)
    todo, stale = [], {}
    for task in tasks:
        mine = by_task.get(int(task["id"]), [])
        if _is_done(mine, version):
            continue
        todo.append(task)
        old = _stale_ids(mine, version, keep_old, ours)
        if old:
            stale[int(task["id"])] = old
    return todo, stale


def stale_of_done_tasks(predictions: list[dict], version: str, keep_old: bool, ours: Collection[str] = ()) -> \
        list[int]:
    """Stale prediction ids (``plan``'s rule) on tasks that are done: what a finished run still deletes. Label
    Studio may store a ``/predict`` reply's predictions (no cluster) after the run listed them, e.g. the reply
    whose leftovers at PREDICT_DEADLINE_S started the run."""
    return [old for mine in _by_task(predictions).values() if _is_done(mine, version)
            for old in _stale_ids(mine, version, keep_old, ours)]


def _by_task(predictions: list[dict]) -> dict[int, list[dict]]:
    by_task: dict[int, list[dict]] = {}
    for p in predictions:
        by_task.setdefault(int(p["task"]), []).append(p)
    return by_task


def _is_done(predictions: list[dict], version: str) -> bool:
    return any(p.get("model_version") == version and p.get("cluster") is not None for p in predictions)


def _stale_ids(predictions: list[dict], version: str, keep_old: bool, ours: Collection[str]) -> list[int]:
    return [int(p["id"]) for p in predictions
            if (p.get("model_version") == version and p.get("cluster") is None)
            or (not keep_old and p.get("model_version") != version and p.get("model_version") in ours)]


def cluster_path(settings: Settings, project_id: int, version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", version)[:120].lstrip(".") or "version"
    return Path(settings.model_dir) / "pool" / f"project-{int(project_id)}" / f"{safe}.npz"


def version_seed(version: str) -> int:
    return zlib.crc32(version.encode())
