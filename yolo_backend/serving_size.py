"""Inference sizes measured for checkpoints that record none: ``MODEL_DIR/serving-sizes.json``.

A reference YOLOv7 ``best.pt`` records no training size, so it would serve at 640 by guess
(``yolov7.checkpoint.serving_img_size``): one trained at 320 then finds a fraction of its boxes. The first training
job that starts from such a checkpoint evaluates it at the candidate sizes on the project's annotated images
(``jobs/sizing.py``) and writes the better size here, keyed by the file's sha256, with the evidence (each size's
mAP, how many images). From then on every detector built from the settings serves that file at that size
(``detector_settings``): server processes notice the file change as they notice a new version (``ModelHolder``),
without a restart. ``IMG_SIZE``, when set, wins over it.

One JSON object, ``{sha256: entry}``, replaced atomically; writers take a lock file so two jobs never lose each
other's entry. A measurement on fewer than ``MIN_EVIDENCE_IMAGES`` images is used but made again by the next
training. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from .atomic import atomic_write
from .hashing import file_sha256

log = logging.getLogger(__name__)

SIZES_FILE = "serving-sizes.json"
MIN_EVIDENCE_IMAGES = 10   # status.MIN_VAL_IMAGES: below it a mAP is noise (README, "What a number rests on")
# What the log, `info` and the dashboard say of a checkpoint that records no size and has not been measured.
GUESS_HINT = "set IMG_SIZE to the size it was trained at, or let the first training measure it"


@dataclass(frozen=True)
class SizeScore:
    """The start model's validation numbers at one inference size."""

    size: int
    map50: float
    map: float
    fitness: float   # the engine's model-selection number (0.1 mAP@.5 + 0.9 mAP@.5:.95): it decides


@dataclass(frozen=True)
class MeasuredSize:
    """The size a checkpoint serves at, measured on annotated images, and the evidence."""

    size: int
    scores: tuple[SizeScore, ...]
    images: int                   # annotated images it was measured on
    checkpoint: str = ""          # the checkpoint's version name (file stem and sha256[:8]), for people
    project: Optional[int] = None
    job: Optional[str] = None
    measured_at: float = field(default_factory=time.time)

    @property
    def settled(self) -> bool:
        """Enough images to keep it; a measurement on fewer is made again by the next training."""
        return self.images >= MIN_EVIDENCE_IMAGES

    @property
    def reason(self) -> str:
        """"measured on 47 annotated images of project 3: mAP@0.5 0.747 at 320, 0.181 at 640"."""
        where = f" of project {self.project}" if self.project is not None else ""
        numbers = ", ".join(f"{s.map50:.3f} at {s.size}" for s in sorted(self.scores, key=lambda s: s.size))
        return f"measured on {self.images} annotated images{where}: mAP@0.5 {numbers}"

    def to_json(self) -> dict:
        return {**asdict(self), "scores": [asdict(s) for s in self.scores]}

    @classmethod
    def from_json(cls, data: Any) -> Optional["MeasuredSize"]:
        """None for an entry that is not one (written by hand, or by a newer version of this file)."""
        try:
            scores = tuple(SizeScore(int(s["size"]), float(s["map50"]), float(s["map"]), float(s["fitness"]))
                           for s in data.get("scores") or [])
            project = data.get("project")
            return cls(int(data["size"]), scores, int(data["images"]), str(data.get("checkpoint") or ""),
                       int(project) if project is not None else None, data.get("job"),
                       float(data.get("measured_at") or 0.0))
        except (AttributeError, KeyError, TypeError, ValueError):
            return None


def best_size(scores: Iterable[SizeScore]) -> Optional[SizeScore]:
    """The size with the highest fitness; None on a tie for the best (no evidence either way, e.g. a model that
    finds nothing at any size)."""
    ranked = sorted(scores, key=lambda s: s.fitness, reverse=True)
    if not ranked or (len(ranked) > 1 and ranked[0].fitness <= ranked[1].fitness):
        return None
    return ranked[0]


def sizes_path(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / SIZES_FILE


def sizes_stamp(model_dir: str | os.PathLike) -> Optional[tuple]:
    """Changes when the file is written (a stat: cheap enough to poll)."""
    try:
        st = sizes_path(model_dir).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


_cache: dict[str, tuple[Optional[tuple], dict[str, MeasuredSize]]] = {}
_cache_lock = threading.Lock()


def read_sizes(model_dir: str | os.PathLike) -> dict[str, MeasuredSize]:
    """Every measured size by checkpoint sha256 (re-read only when the file changed)."""
    path = sizes_path(model_dir)
    stamp = sizes_stamp(model_dir)
    key = str(path)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    entries: dict[str, MeasuredSize] = {}
    if stamp is not None:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s cannot be read (%s): checkpoints that record no training size serve at 640 until a "
                        "training measures them again", path, exc)
            raw = {}
        for sha, data in (raw.items() if isinstance(raw, dict) else ()):
            measured = MeasuredSize.from_json(data)
            if measured is not None:
                entries[str(sha)] = measured
    with _cache_lock:
        _cache[key] = (stamp, entries)
    return entries


def measured_size(model_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> Optional[MeasuredSize]:
    """The size measured for the checkpoint file ``checkpoint``, or None (nothing measured, or no such file)."""
    if sizes_stamp(model_dir) is None:
        return None  # the common case, before any measurement: no hashing
    try:
        sha = file_sha256(checkpoint)
    except OSError:
        return None
    return read_sizes(model_dir).get(sha)


def record_size(model_dir: str | os.PathLike, checkpoint: str | os.PathLike, measured: MeasuredSize) -> None:
    """Write ``measured`` for the checkpoint file ``checkpoint`` (replacing an earlier entry for it)."""
    sha = file_sha256(checkpoint)
    path = sizes_path(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(f".{SIZES_FILE}.lock")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        raw = raw if isinstance(raw, dict) else {}
        raw[sha] = measured.to_json()
        with atomic_write(path, "w") as handle:
            handle.write(json.dumps(raw, indent=1, sort_keys=True))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
