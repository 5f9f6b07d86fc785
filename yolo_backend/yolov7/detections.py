"""What the detector returns for one image. Plain numpy, no torch, so the Label Studio layer can use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass
class Detections:
    """Detections for one image, in the image's original pixel coordinates.

    boxes:        (n, 4) float32, x1 y1 x2 y2, clipped to the image
    scores:       (n,) float32, confidence = objectness x class probability (objectness alone when nc == 1)
    labels:       (n,) int64, class index into ``names``
    objectness:   (n,) float32
    class_probs:  (n, nc) float32, the full class-probability vector (active learning needs it)
    width/height: the original image size in pixels
    names:        class names, index = class id
    embedding:    (E,) float32 image embedding from the same forward pass (``Detector.detect(embed=True)``), or None
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    objectness: np.ndarray
    class_probs: np.ndarray
    width: int
    height: int
    names: Sequence[str] = field(default_factory=tuple)
    embedding: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def above(self, threshold: float) -> "Detections":
        """Only the detections whose score is at least ``threshold``."""
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], self.objectness[keep],
                          self.class_probs[keep], self.width, self.height, self.names, self.embedding)

    @classmethod
    def empty(cls, width: int, height: int, names: Sequence[str]) -> "Detections":
        nc = len(names)
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                   np.zeros(0, np.float32), np.zeros((0, nc), np.float32), width, height, tuple(names))
