"""The detection pipeline: letterbox -> batched forward -> decode -> class-aware NMS -> original pixels.

It follows the reference detect pipeline (best class per box, not multi-label), so a checkpoint gives the boxes
the reference gives. Unlike the reference it batches: images whose letterboxed shapes are equal run as one batch,
which gives the same result as one image at a time.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .boxes import nms, xywh_to_xyxy
from .detections import Detections
from .device import model_device, select_device, use_half
from .preprocess import Letterboxed, letterbox, read_image, scale_boxes_back

if TYPE_CHECKING:
    from .ort_runtime import InferenceModel

log = logging.getLogger(__name__)

# Candidates kept for NMS at most (best scores first), like the reference; bounds NMS time at very low conf.
MAX_NMS_CANDIDATES = 30000


def _predictions(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):  # a module that also returns per-level raw maps
        out = out[0]
    return out.float()


def _as_rgb_uint8(image: np.ndarray, index: int) -> np.ndarray:
    """Accept HxWx3 uint8 RGB (also grey HxW and RGBA, converted); refuse anything else with a clear message."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image {index}: expected dtype uint8 (0..255), got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image {index}: expected an HxWx3 RGB image, got shape {image.shape}")
    return image


class Detector:
    """Runs a YOLOv7 module (from ``load_model``) on RGB images and returns ``Detections`` in original pixels.

    model:      module mapping (B,3,H,W) RGB [0,1] to (B, N, 5+nc) [cx, cy, w, h, obj, cls...] in input pixels,
                with ``.names`` and ``.stride``
    img_size:   long side of the letterboxed input (rounded up to a multiple of the model's largest stride)
    conf, iou:  confidence threshold and class-aware NMS IoU threshold
    max_det:    most detections kept per image
    half:       fp16 inference (CUDA only; ignored on CPU)
    device:     None = where the model already is; else a device spec ("auto", "cpu", "cuda:0") or torch.device
    batch_size: most images per forward pass
    """

    def __init__(self, model: InferenceModel, img_size: int = 640, conf: float = 0.25, iou: float = 0.45,
                 max_det: int = 300, half: bool = False, device: Union[None, str, torch.device] = None,
                 batch_size: int = 8, nms_backend: str = "ours"):
        if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
            raise ValueError(f"conf ({conf}) and iou ({iou}) must be between 0 and 1")
        if max_det < 1 or batch_size < 1:
            raise ValueError(f"max_det ({max_det}) and batch_size ({batch_size}) must be at least 1")
        if device is None:
            self.device = model_device(model)
        else:
            self.device = device if isinstance(device, torch.device) else select_device(device)
            model = model.to(self.device)
        self.half = use_half(self.device, half)
        self.model = model.half() if self.half else model
        self.model.eval()
        self.names: tuple[str, ...] = tuple(model.names)
        self.stride = int(max(int(s) for s in torch.as_tensor(model.stride).flatten().tolist()))
        self.img_size = int(math.ceil(img_size / self.stride) * self.stride)
        self.img_size_reason = f"img_size={img_size}"  # why this size (from_checkpoint says more)
        if self.img_size != img_size:
            log.warning("img_size %d is not a multiple of the model stride %d; using %d",
                        img_size, self.stride, self.img_size)
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.batch_size = batch_size
        self.nms_backend = nms_backend

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], *, device: Union[str, torch.device] = "auto",
                        threads: int = 0, backend: Optional[str] = None, cache_dir: Union[None, str, Path] = None,
                        img_size: Optional[int] = None, img_size_setting: Optional[str] = None,
                        **options) -> "Detector":
        """Load ``path`` on ``device`` (``auto``: CUDA when available) and wrap it. ``threads`` sets the CPU thread
        count (0 = automatic), ``backend``/``cache_dir`` choose the inference backend (see ``load_model``); the
        other keyword arguments go to ``Detector`` (conf, iou, max_det, half, batch_size).

        ``img_size`` None runs at the size the checkpoint was trained at when it records one, else 640
        (``checkpoint.serving_img_size``); an explicit size always wins, and ``img_size_setting`` names where it
        came from (``IMG_SIZE``, ``--img-size``) in the log line and ``img_size_reason``."""
        from .checkpoint import inference_model, load_checkpoint, serving_img_size
        from .device import configure_threads

        device = device if isinstance(device, torch.device) else select_device(device)
        if device.type == "cpu":
            configure_threads(threads)
        ckpt = load_checkpoint(str(path))
        size, reason = serving_img_size(ckpt, img_size, img_size_setting or "img_size")
        model = inference_model(ckpt, device=str(device), backend=backend, cache_dir=cache_dir)
        detector = cls(model, device=device, img_size=size, **options)
        detector.img_size_reason = reason
        log.info("%s serves at img_size %d (%s)", Path(path).name, detector.img_size, reason)
        return detector

    # --- public -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray], conf: Optional[float] = None,
               embed: bool = False) -> list[Detections]:
        """Detections for each HxWx3 uint8 RGB image, in order. ``conf`` overrides the detector's threshold.
        ``embed``: each also carries its image embedding (``Detections.embedding``), from the same forward pass."""
        conf = self.conf if conf is None else conf
        boxed = [self.letterbox(_as_rgb_uint8(image, i)) for i, image in enumerate(images)]
        results: list[Optional[Detections]] = [None] * len(boxed)
        for indices in self.batches(boxed):
            batch = np.stack([boxed[i].image for i in indices])
            predictions, embeddings = self.forward_with_embedding(batch) if embed else (self.forward(batch), None)
            for row, i in enumerate(indices):
                found = self.decode(predictions[row], boxed[i], conf)
                if embeddings is not None:
                    found.embedding = embeddings[row]
                results[i] = found
        return results  # type: ignore[return-value]

    def detect_files(self, paths: Iterable[Union[str, Path]], conf: Optional[float] = None) -> list[Detections]:
        """Read image files (any format OpenCV reads) and detect. Raises ImageReadError naming a bad file."""
        return [detections for _, detections in self.iter_files(paths, conf)]

    def iter_files(self, paths: Iterable[Union[str, Path]], conf: Optional[float] = None,
                   chunk: Optional[int] = None) -> Iterator[tuple[Path, Detections]]:
        """(path, Detections) per file, reading ``chunk`` files at a time so large folders stay in bounded memory."""
        chunk = chunk or self.batch_size
        pending: list[Path] = []
        for path in paths:
            pending.append(Path(path))
            if len(pending) == chunk:
                yield from zip(pending, self.detect([read_image(p) for p in pending], conf))
                pending = []
        if pending:
            yield from zip(pending, self.detect([read_image(p) for p in pending], conf))

    # --- steps ----------------------------------------------------------------------------------------------------
    def letterbox(self, image: np.ndarray) -> Letterboxed:
        return letterbox(image, self.img_size, self.stride)

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, N, 5+nc) float32 predictions in letterboxed pixels."""
        return _predictions(self.model(self._tensor(batch)))

    def forward_with_embedding(self, batch: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """``forward`` plus each image's embedding (B, E) float32 from the same pass (``model.neck_embedding``)."""
        if not hasattr(self.model, "forward_with_embedding"):
            raise TypeError(f"{type(self.model).__name__} gives no image embedding (use load_model's module)")
        out, embedding = self.model.forward_with_embedding(self._tensor(batch))
        return _predictions(out), embedding.float().cpu().numpy()

    def _tensor(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).contiguous()
        return (x.half() if self.half else x.float()) / 255.0

    def decode(self, prediction: torch.Tensor, boxed: Letterboxed, conf: float,
               multi_label: bool = False) -> Detections:
        """(N, 5+nc) raw predictions of one image -> Detections in original pixels.

        Each box takes its best class; ``multi_label`` (evaluation, as the reference test.py) instead keeps one
        candidate per class whose score passes ``conf``."""
        width, height = boxed.original_size
        nc = prediction.shape[1] - 5
        if nc != len(self.names):
            raise RuntimeError(f"the model predicts {nc} classes but has {len(self.names)} names")
        candidates = prediction[prediction[:, 4] > conf]
        class_probs = candidates[:, 5:]
        objectness = candidates[:, 4]
        if nc == 1:  # single-class models train no class score: confidence is objectness alone
            scores = objectness
            labels = torch.zeros_like(objectness, dtype=torch.long)
        elif multi_label:
            class_scores = class_probs * objectness[:, None]
            rows, labels = (class_scores > conf).nonzero(as_tuple=True)
            candidates, scores = candidates[rows], class_scores[rows, labels]
        else:
            scores, labels = (class_probs * objectness[:, None]).max(dim=1)
        keep = scores > conf
        candidates, scores, labels = candidates[keep], scores[keep], labels[keep]
        if scores.numel() > MAX_NMS_CANDIDATES:
            top = scores.topk(MAX_NMS_CANDIDATES).indices
            candidates, scores, labels = candidates[top], scores[top], labels[top]
        boxes = xywh_to_xyxy(candidates[:, :4])
        kept = nms(boxes, scores, self.iou, labels=labels, max_det=self.max_det, backend=self.nms_backend)
        if kept.numel() == 0:
            return Detections.empty(width, height, self.names)
        kept_boxes = scale_boxes_back(boxes[kept].cpu().numpy(), boxed.ratio, boxed.pad, (width, height))
        return Detections(
            boxes=kept_boxes,
            scores=scores[kept].cpu().numpy().astype(np.float32),
            labels=labels[kept].cpu().numpy().astype(np.int64),
            objectness=candidates[kept, 4].cpu().numpy().astype(np.float32),
            class_probs=candidates[kept, 5:].cpu().numpy().astype(np.float32),
            width=width, height=height, names=self.names,
        )

    def batches(self, boxed: Sequence[Letterboxed]) -> Iterator[list[int]]:
        """Indices grouped by letterboxed shape, in chunks of at most ``batch_size``."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, item in enumerate(boxed):
            groups[item.shape].append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start:start + self.batch_size]
