"""Choosing among a task's annotations and predictions (Label Studio task JSON; no torch).

A task can carry several annotations (edits by several people, skips): training and the YOLO export both use the
latest one that was not cancelled ("skipped"), by its last change (``updated_at``, else ``created_at``), then
``created_at``, then id. Times are parsed,
so "…Z" and "+00:00" forms compare correctly.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional


def _when(item: dict) -> tuple:
    def parse(value):
        if not value:
            return datetime.min
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return datetime.min
        # compare aware times in UTC; naive ones as they are
        return parsed.astimezone(timezone.utc).replace(tzinfo=None) if parsed.tzinfo else parsed

    ident = item.get("id")
    changed = item.get("updated_at") or item.get("created_at")  # the last change: an unedited one has no update
    return parse(changed), parse(item.get("created_at")), ident if isinstance(ident, int) else 0


def latest_annotation(task: dict) -> Optional[dict]:
    """The task's latest annotation that was not cancelled (skipped), or None."""
    done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    return max(done, key=_when) if done else None


def latest_prediction(task: dict) -> Optional[dict]:
    """The task's latest prediction, or None."""
    found = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    return max(found, key=_when) if found else None
