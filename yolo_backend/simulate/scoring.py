"""Scoring the unlabelled pool as the server would: the same ``Detector`` (backend, IMG_SIZE, SCORE_FLOOR as the
detection floor, IOU_THRESHOLD, MAX_DETECTIONS, PREDICT_BATCH_SIZE), plus each image's embedding from the same
forward pass (``yolov7.model.neck_embedding``: the neck's output maps averaged over space, concatenated).

Results are cached on disk by (checkpoint hash, image set), so strategies that share a model (every strategy of a
seed after round 0) score the pool once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, cast

import numpy as np

from ..active_learning import task_score
from ..hashing import file_sha256
from ..settings import Settings
from ..yolov7.detections import Detections

log = logging.getLogger(__name__)


@dataclass
class ScoredPool:
    """What one scoring pass gives, aligned with ``ids``: per image its detections (above SCORE_FLOOR) and its
    embedding (one row of ``embeddings``)."""

    ids: list[int]
    detections: list[Detections]
    embeddings: np.ndarray

    def scores(self, strategy: str, settings: Settings) -> np.ndarray:
        """Each image's task score under ``strategy``, as the server computes it (low = label first)."""
        return np.array([task_score(d, strategy, settings.model_score_threshold, settings.score_floor)
                         for d in self.detections], np.float64)


def serving_detector(checkpoint: str, settings: Settings):
    """The server's detector for ``checkpoint`` (``detector_settings.detector_from_settings``, as the model holder
    builds it): the same backend, size and thresholds."""
    from ..detector_settings import detector_from_settings

    return detector_from_settings(checkpoint, settings)


def score_images(detector, images: Sequence[Callable[[], np.ndarray]],
                 progress: Optional[Callable[[int], None]] = None) -> tuple[list[Detections], np.ndarray]:
    """Detections and embeddings of each image (``images``: loaders of HxWx3 uint8 RGB), the embedding from the
    same forward pass (``Detector.detect(embed=True)``), a batch of the detector's batch size at a time."""
    found: list[Detections] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        found.extend(detector.detect(batch, embed=True))
        if progress:
            progress(len(batch))
        batch.clear()

    for load in images:
        batch.append(load())
        if len(batch) >= max(1, detector.batch_size):
            flush()
    if batch:
        flush()
    # detected with embed=True: every one has its embedding
    embeddings = np.stack([cast(np.ndarray, d.embedding) for d in found]).astype(np.float32) if found \
        else np.zeros((0, 0), np.float32)
    return found, embeddings


# --- the cache ----------------------------------------------------------------------------------------------------

def cache_key(checkpoint: str, ids: Sequence[int], settings: Settings) -> str:
    from ..detector_settings import img_size_for

    # the size it serves at, not IMG_SIZE alone: a size measured in the run's MODEL_DIR changes the scores
    what = {"model": file_sha256(checkpoint), "ids": list(map(int, ids)), "img_size": img_size_for(checkpoint,
                                                                                                   settings)[0],
            "floor": settings.score_floor, "iou": settings.iou_threshold, "max_det": settings.max_detections}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def save_scored(path: Path, pool: ScoredPool) -> None:
    counts = np.array([len(d) for d in pool.detections], np.int64)
    first = pool.detections[0] if pool.detections else None
    nc = len(first.names) if first is not None else 0
    def cat(key: str, shape: tuple) -> np.ndarray:
        if not pool.detections:
            return np.zeros((0,) + shape[1:])
        return np.concatenate([getattr(d, key).reshape(shape) for d in pool.detections])

    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=np.array(pool.ids, np.int64), counts=counts, embeddings=pool.embeddings,
             boxes=cat("boxes", (-1, 4)), scores=cat("scores", (-1,)), labels=cat("labels", (-1,)),
             objectness=cat("objectness", (-1,)), class_probs=cat("class_probs", (-1, nc)),
             sizes=np.array([(d.width, d.height) for d in pool.detections], np.int64).reshape(-1, 2),
             names=np.array(list(first.names) if first is not None else [], dtype=str))
    tmp.replace(path)


def load_scored(path: Path) -> ScoredPool:
    data = np.load(path)
    names = tuple(str(n) for n in data["names"])
    offsets = np.concatenate([[0], np.cumsum(data["counts"])])
    detections = []
    for i, (width, height) in enumerate(data["sizes"]):
        a, b = offsets[i], offsets[i + 1]
        detections.append(Detections(data["boxes"][a:b].astype(np.float32), data["scores"][a:b].astype(np.float32),
                                     data["labels"][a:b].astype(np.int64), data["objectness"][a:b].astype(np.float32),
                                     data["class_probs"][a:b].astype(np.float32), int(width), int(height), names))
    return ScoredPool([int(i) for i in data["ids"]], detections, data["embeddings"])


def score_pool(checkpoint: str, ids: Sequence[int], images: Sequence[Callable[[], np.ndarray]], settings: Settings,
               cache_dir: Path, progress: Optional[Callable[[int], None]] = None) -> ScoredPool:
    """Score ``images`` (with task ids ``ids``) with ``checkpoint`` as the server would; cached in ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"score-{cache_key(checkpoint, ids, settings)}.npz"
    if path.is_file():
        log.info("pool scores of %s for %d images from the cache (%s)", checkpoint, len(ids), path.name)
        return load_scored(path)
    detector = serving_detector(checkpoint, settings)
    detections, embeddings = score_images(detector, images, progress)
    pool = ScoredPool(list(map(int, ids)), detections, embeddings)
    save_scored(path, pool)
    return pool
