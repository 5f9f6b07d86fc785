"""What the model saves the annotators, per version, as the dashboard, ``/status`` and ``/prometheus`` show it.

Read from the newest run in the project's history that recorded it (``jobs/history.py``, field ``effort``; the
numbers are worked out by the training job over every annotation it read, ``labelstudio/effort.py``), so showing
them never calls Label Studio. A number resting on fewer than MIN_EFFORT_TASKS tasks is not shown ("too few to
say"), the way validation metrics on too few images are not.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from typing import Optional

from ..jobs.history import read_runs
from ..labelstudio.effort import EffortSummary
from ..settings import Settings

MIN_EFFORT_TASKS = 10
NO_PREDICTION = "no prediction"   # how the page names tasks annotated without a known prediction
_VERSION_NUMBER = re.compile(r"^v(\d+)-")


def newest_effort(settings: Settings, project_id: int) -> tuple[list[EffortSummary], Optional[float]]:
    """(the per-version numbers of the newest run that recorded them, that run's time); ([], None) when none."""
    for run in reversed(read_runs(settings.model_dir, project_id)):
        if isinstance(run.get("effort"), list):
            found = [EffortSummary.from_dict(item) for item in run["effort"] if isinstance(item, dict)]
            return found, run.get("time") if isinstance(run.get("time"), (int, float)) else None
    return [], None


def _order(summary: EffortSummary) -> tuple:
    """Versions v1, v2, … by number, other names after them by name, "no prediction" last."""
    if summary.version is None:
        return (2, 0, "")
    match = _VERSION_NUMBER.match(summary.version)
    return (0, int(match.group(1)), summary.version) if match else (1, 0, summary.version)


def effort_entry(summary: EffortSummary) -> dict:
    """One version's numbers for people: the share of final boxes from the model, boxes drawn per task, median
    seconds per task, each None with ``note`` "too few to say" under MIN_EFFORT_TASKS tasks."""
    too_few = summary.tasks < MIN_EFFORT_TASKS
    tasks = f"{summary.tasks} task{'' if summary.tasks == 1 else 's'}"
    shown = not too_few
    by_time = summary.tasks - summary.via_parent if summary.version is not None else 0
    return {**asdict(summary), "name": summary.version or NO_PREDICTION, "too_few": too_few, "by_time": by_time,
            "note": f"too few to say ({tasks}; needs {MIN_EFFORT_TASKS})" if too_few else f"on {tasks}",
            "share_percent": round(100 * summary.model_share, 1) if shown and summary.model_share is not None
            else None,
            "drawn_per_task": round(summary.drawn / summary.tasks, 2) if shown and summary.tasks else None,
            "median_seconds_shown": summary.median_seconds if shown and summary.timed_tasks >= MIN_EFFORT_TASKS
            else None,
            "timed_note": None if summary.timed_tasks >= MIN_EFFORT_TASKS else
            f"too few timed tasks ({summary.timed_tasks}; needs {MIN_EFFORT_TASKS})"}


def effort_status(settings: Settings, project_id: int) -> Optional[dict]:
    """The project's effort card: {versions: [...], time_iso}, None before any run recorded it."""
    found, when = newest_effort(settings, project_id)
    if not found and when is None:
        return None
    stamp = None if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return {"versions": [effort_entry(s) for s in sorted(found, key=_order)], "time_iso": stamp,
            "min_tasks": MIN_EFFORT_TASKS}
