"""ONNX Runtime inference for YOLOv7 on the CPU, behind the same module interface as the torch model.

Why: on the CPU, ONNX Runtime runs our exported graphs markedly faster than torch eager (its NCHWc conv kernels
and graph fusions); see benchmarks/bench_detector.py. ``load_model`` returns an ``OrtYOLOv7`` on the CPU by default
(``backend="auto"``); it is a ``torch.nn.Module`` that takes and returns torch tensors exactly like ``YOLOv7`` in
eval mode, and carries the same ``names``, ``nc``, ``stride``, ``graph``, ``graph_name``, ``head_type``,
``anchors_px`` and ``fused`` attributes.

The ONNX file is exported once per checkpoint and kept in the cache folder the caller names (ONNX_CACHE_DIR in
the app), named after the checkpoint's sha256, the export code's version and the opset, so a changed file or a
changed exporter never reuses a stale graph. The cache keeps the ``CACHE_KEEP`` most recently used exports (every
training publishes a new
checkpoint, so it would otherwise grow by one file per version); a pruned one is simply exported again when needed.
Anything that goes wrong (no onnxruntime, export or session failure, an export that does not match
the torch model) falls back to the torch module with a warning: serving never depends on this optimisation.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Union

import torch
from torch import nn

from ..hashing import file_sha256
from .device import model_device
from .export import DEFAULT_OPSET, EMBEDDING_NAME, EXPORT_FORMAT_VERSION, INPUT_NAME, OUTPUT_NAME, export_onnx
from .inference_backends import DEFAULT_CACHE_DIR, check_backend
from .model import YOLOv7

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# An exported graph must reproduce the torch module to float32 rounding before it is used.
_VERIFY_BOX_ATOL = 1e-2      # pixels (fp32 reordering in a 640² decode stays far below this)
_VERIFY_PROB_ATOL = 1e-4
_VERIFY_EMBEDDING_RTOL = 1e-4

CACHE_KEEP = 8  # exports kept in the cache folder, most recently used first


class OrtYOLOv7(nn.Module):
    """A YOLOv7 inference module backed by an ONNX Runtime session (CPU).

    ``model(x)``: (B, 3, H, W) float RGB in [0, 1], H and W multiples of the largest stride, any batch size ->
    (B, N, 5+nc) float32 [cx, cy, w, h, objectness, class scores...] in input pixels, on ``x``'s device.
    """

    backend = "onnxruntime"
    # Buffers (register_buffer), declared for the type checker.
    stride: torch.Tensor
    anchors_px: torch.Tensor

    def __init__(self, onnx_path: PathLike, source: YOLOv7, threads: int = 0, spinning: bool = False):
        super().__init__()
        self.onnx_path = str(onnx_path)
        self.threads = int(threads) or torch.get_num_threads()
        self.spinning = spinning
        self.graph: Dict[str, Any] = copy.deepcopy(source.graph)
        self.graph_name: str = source.graph_name
        self.head_type: str = source.head_type
        self.nc: int = source.nc
        self.names = list(source.names)
        self.fused = True
        self.parameter_count = int(sum(p.numel() for p in source.parameters()))
        self.register_buffer("stride", source.stride.detach().to("cpu", torch.float32).clone(), persistent=False)
        self.register_buffer("anchors_px", source.anchors_px.detach().to("cpu", torch.float32).clone(),
                             persistent=False)
        self.eval()
        self.session = self._open_session()

    def _open_session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
        if not self.spinning:
            # Worker threads sleep instead of busy-waiting between ops: as fast on an idle machine (measured on the
            # 2-core box) and 15-20 % faster when other processes (a training job, gunicorn workers) share the CPU.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(self.onnx_path, options, providers=["CPUExecutionProvider"])

    # A session cannot be pickled or deep-copied: rebuild it from the file instead.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.session = self._open_session()

    def train(self, mode: bool = True) -> "OrtYOLOv7":
        if mode:
            raise RuntimeError("an ONNX Runtime model is inference-only; load the checkpoint with "
                               "load_model(..., backend='torch', fuse=False) to train")
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: self._input(x)})[0]
        return torch.from_numpy(out).to(x.device)

    def forward_with_embedding(self, x: torch.Tensor):
        """(predictions, embeddings (B, E)) from one run of the graph (see ``model.neck_embedding``)."""
        out, embedding = self.session.run([OUTPUT_NAME, EMBEDDING_NAME], {INPUT_NAME: self._input(x)})
        return torch.from_numpy(out).to(x.device), torch.from_numpy(embedding).to(x.device)

    def _input(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image tensor, got shape {tuple(x.shape)}")
        step = int(self.stride.max())
        if x.shape[2] % step or x.shape[3] % step:
            raise ValueError(f"height and width must be multiples of {step}, got {x.shape[2]}x{x.shape[3]}")
        return x.detach().to("cpu", torch.float32).contiguous().numpy()

    def extra_repr(self) -> str:
        return (f"graph={self.graph_name}, head={self.head_type}, nc={self.nc}, onnx={self.onnx_path}, "
                f"threads={self.threads}")


# --------------------------------------------------------------------------------------------------------------
# Choosing and building the backend
# --------------------------------------------------------------------------------------------------------------

# What load_model gives: the torch module, or the ONNX Runtime one (same attributes and call).
InferenceModel = Union[YOLOv7, OrtYOLOv7]


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except Exception:  # ImportError, or a broken binary wheel
        return False
    return True


def cache_path(checkpoint: PathLike, model: YOLOv7, cache_dir: PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Where the ONNX export of ``checkpoint`` lives: keyed by its sha256, the export version and the opset."""
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    name = (f"{model.graph_name}-{file_sha256(checkpoint)[:20]}-export{EXPORT_FORMAT_VERSION}"
            f"-opset{opset}-torch{torch_version}.onnx")
    return Path(cache_dir).expanduser() / name  # the default folder is in the user's home


def _verify(ort_model: OrtYOLOv7, model: YOLOv7) -> None:
    """The exported graph must compute what the torch module computes (checked once, right after export)."""
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, expected_embedding = model.forward_with_embedding(x)
        if isinstance(expected, (tuple, list)):
            expected = expected[0]
        got, embedding = ort_model.forward_with_embedding(x)
    if got.shape != expected.shape or embedding.shape != expected_embedding.shape:
        raise RuntimeError(f"exported graph returns shapes {tuple(got.shape)} / {tuple(embedding.shape)}, torch "
                           f"{tuple(expected.shape)} / {tuple(expected_embedding.shape)}")
    diff = (got - expected).abs()
    box, prob = float(diff[..., :4].max()), float(diff[..., 4:].max())
    spread = float(expected_embedding.abs().max()) or 1.0
    embedded = float((embedding - expected_embedding).abs().max()) / spread
    if box > _VERIFY_BOX_ATOL or prob > _VERIFY_PROB_ATOL or embedded > _VERIFY_EMBEDDING_RTOL:
        raise RuntimeError(f"exported graph differs from the torch model (boxes {box:.2e} px, "
                           f"probabilities {prob:.2e}, embedding {embedded:.2e} of its range)")


def load_onnx_model(model: YOLOv7, checkpoint: PathLike, cache_dir: PathLike, opset: int = DEFAULT_OPSET,
                    threads: int = 0) -> OrtYOLOv7:
    """The ONNX Runtime module for a fused CPU ``model`` loaded from ``checkpoint``, exporting it on a cache miss.

    Raises on failure (the caller falls back to torch).
    """
    target = cache_path(checkpoint, model, cache_dir, opset)
    if target.is_file():
        try:
            ort_model = OrtYOLOv7(target, model, threads)
            _touch(target)  # most recently used: pruned last
            log.info("ONNX Runtime model from cache %s", target)
            return ort_model
        except Exception as exc:  # a damaged cache file: export again
            log.warning("cached ONNX file %s is unusable (%s); exporting again", target, exc)
    start = time.perf_counter()
    export_onnx(model, target, opset)
    ort_model = OrtYOLOv7(target, model, threads)
    try:
        _verify(ort_model, model)
    except Exception:
        target.unlink(missing_ok=True)
        raise
    log.info("exported %s to ONNX in %.1f s: %s", model.graph_name, time.perf_counter() - start, target)
    prune_cache(target.parent, keep=CACHE_KEEP)
    return ort_model


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # read-only cache folder: LRU order just stays the export order
        pass


def prune_cache(cache_dir: PathLike, keep: int = CACHE_KEEP) -> list:
    """Delete all but the ``keep`` most recently used exports in ``cache_dir``; returns the deleted paths.

    Safe while other processes use the cache: a session reads its file when it opens, and a process that finds
    its export gone exports it again."""
    files = []
    for path in Path(cache_dir).glob("*.onnx"):
        try:
            files.append((path.stat().st_mtime, path))
        except OSError:  # deleted meanwhile by another process
            continue
    files.sort(reverse=True)
    deleted = []
    for _, path in files[max(keep, 1):]:
        try:
            path.unlink()
            deleted.append(path)
        except OSError as exc:
            log.warning("could not prune ONNX cache file %s: %s", path, exc)
    if deleted:
        log.info("pruned %d old ONNX export(s) from %s (keeping %d)", len(deleted), cache_dir, keep)
    return deleted


def with_backend(model: YOLOv7, checkpoint: PathLike, backend: str = "auto",
                 cache_dir: PathLike = DEFAULT_CACHE_DIR, threads: int = 0) -> InferenceModel:
    """The inference module ``load_model`` returns for an eval-mode ``model`` loaded from ``checkpoint``.

    ``auto``: ONNX Runtime for a fused model on the CPU when onnxruntime imports (exported into ``cache_dir``),
    else torch. ``onnxruntime``: the same, with a warning where it cannot be used. ``torch``: the torch module.
    On the CPU the torch module runs in channels_last memory format (faster with oneDNN convolutions; same
    results). CUDA and unfused (training-form) models always stay torch.
    """
    backend = check_backend(backend)
    device = model_device(model)
    if backend != "torch" and model.fused and device.type == "cpu":
        if not onnxruntime_available():
            if backend == "onnxruntime":
                log.warning("INFERENCE_BACKEND=onnxruntime but onnxruntime cannot be imported; using torch "
                            "(pip install onnxruntime)")
        else:
            try:
                return load_onnx_model(model, checkpoint, cache_dir, threads=threads)
            except Exception as exc:
                log.warning("ONNX Runtime backend unavailable for %s (%s: %s); using torch",
                            checkpoint, type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
    elif backend == "onnxruntime":
        why = "runs on CUDA" if device.type != "cpu" else "is not fused (training form)"
        log.warning("INFERENCE_BACKEND=onnxruntime ignored: the model %s; using torch", why)
    if device.type == "cpu" and model.fused:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs omit it
    return model
