"""Scoring the unlabelled pool as the server would: the same ``Detector`` settings (IMG_SIZE, SCORE_FLOOR as the
detection floor, IOU_THRESHOLD, MAX_DETECTIONS, PREDICT_BATCH_SIZE), plus an image embedding taken in the same
forward pass: the head's input feature maps (the neck's outputs, one per level), averaged over space, concatenated.

The torch backend is used (ONNX Runtime gives the same detections, but the embedding needs the torch module's
head input). Results are cached on disk by (checkpoint hash, image set), so strategies that share a model (every
strategy of a seed after round 0) score the pool once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

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


def neck_embedding(feature_maps: Sequence) -> np.ndarray:
    """(B, sum of channels): each level's map averaged over height and width, levels concatenated."""
    import torch

    pooled = [torch.as_tensor(f).float().mean(dim=(2, 3)) for f in feature_maps]
    return torch.cat(pooled, dim=1).cpu().numpy()


class EmbeddingTap:
    """Records the head's inputs on every forward of ``model`` (a forward pre-hook: nothing in the detector
    changes, and the embedding costs no second pass)."""

    def __init__(self, model):
        self.rows: list[np.ndarray] = []
        self._handle = model.head.register_forward_pre_hook(self._record)

    def _record(self, module, inputs) -> None:
        maps = inputs[0] if len(inputs) == 1 else inputs
        self.rows.append(neck_embedding(maps))

    def take(self) -> np.ndarray:
        rows, self.rows = self.rows, []
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), np.float32)

    def close(self) -> None:
        self._handle.remove()


def serving_detector(checkpoint: str, settings: Settings):
    """The server's detector for ``checkpoint`` (see ``model_holder.load_detector``), on torch."""
    from ..yolov7 import Detector

    return Detector.from_checkpoint(
        checkpoint, device=settings.device, threads=settings.torch_threads, backend="torch",
        img_size=settings.img_size, conf=settings.score_floor, iou=settings.iou_threshold,
        max_det=settings.max_detections, half=settings.half, batch_size=settings.predict_batch_size)


def score_images(detector, images: Sequence[Callable[[], np.ndarray]],
                 progress: Optional[Callable[[int], None]] = None) -> tuple[list[Detections], np.ndarray]:
    """Detections and embeddings of each image (``images``: loaders of HxWx3 uint8 RGB). One image per forward:
    the tap's rows then follow the input order exactly (a batch groups images by shape), and the detections are
    the same as batched ones."""
    tap = EmbeddingTap(detector.model)
    found: list[Detections] = []
    rows: list[np.ndarray] = []
    try:
        for load in images:
            found.extend(detector.detect([load()]))
            rows.append(tap.take())
            if progress:
                progress(1)
    finally:
        tap.close()
    return found, (np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), np.float32))


# --- the cache ----------------------------------------------------------------------------------------------------

def cache_key(checkpoint: str, ids: Sequence[int], settings: Settings) -> str:
    what = {"model": file_sha256(checkpoint), "ids": list(map(int, ids)), "img_size": settings.img_size,
            "floor": settings.score_floor, "iou": settings.iou_threshold, "max_det": settings.max_detections}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def save_scored(path: Path, pool: ScoredPool) -> None:
    counts = np.array([len(d) for d in pool.detections], np.int64)
    first = pool.detections[0] if pool.detections else None
    nc = len(first.names) if first is not None else 0
    cat = (lambda key, shape: np.concatenate([getattr(d, key).reshape(shape) for d in pool.detections])
           if pool.detections else np.zeros((0,) + shape[1:]))
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
