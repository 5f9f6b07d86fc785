"""ONNX export of a YOLOv7 module (ours, from ``load_model`` / ``build_model`` / training).

The exported graph takes ``images`` (B, 3, H, W) float32 RGB in [0, 1] and, by default, returns ``predictions``
(B, N, 5+nc) [cx, cy, w, h, objectness, class scores...] in input pixels: the same layout as the module's eval
output. Batch, height and width are dynamic (H and W multiples of the largest stride). ``decode=False`` returns
the raw head maps instead, one (B, na*(5+nc), H/s, W/s) output per level (``level0``, ``level1``, ...).

The exporter is torch's TorchScript-based one (``dynamo=False``): it works offline with nothing beyond torch and
onnx, and gives a plain graph that ONNX Runtime optimises well.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import List, Tuple, Union

import torch
from torch import nn

from ..atomic import atomic_write
from .model import YOLOv7, neck_embedding

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# Bump when the exported graph changes (this file, or fusing in model.py / layers.py): cached exports are keyed
# by it (ort_runtime.cache_path), so old files are not reused.
EXPORT_FORMAT_VERSION = 2  # 2: a second output, the image embedding
INPUT_NAME = "images"
OUTPUT_NAME = "predictions"
EMBEDDING_NAME = "embedding"

PathLike = Union[str, os.PathLike]


class ExportError(RuntimeError):
    """The model could not be exported to ONNX; the message says why."""


class ExportGraph(nn.Module):
    """What gets traced: the network, the head convs and a decode written with shape-agnostic ops.

    ``DetectHead`` caches its decode grids per input size, which a trace would freeze to the traced size; here the
    grid comes from a cumulative sum over a map of ones, so the exported graph works at any H and W. The arithmetic
    is the head's: xy = sigmoid * (2 * stride) + (grid - 0.5) * stride, wh = sigmoid² * (4 * anchor).
    """

    def __init__(self, model: YOLOv7, decode: bool = True):
        super().__init__()
        self.model = model
        self.decode = decode

    def forward(self, x: torch.Tensor):
        head = self.model.head
        features = self.model.head_inputs(x)
        outputs: List[torch.Tensor] = []
        for level, feature in enumerate(features):
            if head.implicit:  # unfused IDetect: same arithmetic as the head's forward
                raw = head.im[level](head.m[level](head.ia[level](feature)))
            else:
                raw = head.m[level](feature)
            outputs.append(self._decode_level(raw, level) if self.decode else raw)
        if not self.decode:
            return tuple(outputs)
        return torch.cat(outputs, 1), neck_embedding(features)

    def _decode_level(self, raw: torch.Tensor, level: int) -> torch.Tensor:
        head = self.model.head
        na, no = head.na, head.no
        stride = float(head.stride[level])
        bs = raw.shape[0]
        p = raw.reshape(bs, na, no, -1).sigmoid()                      # (B, na, no, ny*nx)
        ones = torch.ones_like(raw[:1, :1])                             # (1, 1, ny, nx)
        grid_x = ones.cumsum(3) - 1.0
        grid_y = ones.cumsum(2) - 1.0
        grid = torch.cat((grid_x, grid_y), 1).reshape(1, 1, 2, -1)     # (1, 1, 2, ny*nx) as (x, y)
        offset = (grid - 0.5) * stride
        wh_scale = (4.0 * head.anchor_grid[level].double()).view(1, na, 2, 1).to(p.dtype)
        xy = p[:, :, 0:2] * (2.0 * stride) + offset
        wh = p[:, :, 2:4].square() * wh_scale
        y = torch.cat((xy, wh, p[:, :, 4:]), 2)                        # (B, na, no, ny*nx)
        return y.transpose(2, 3).reshape(bs, -1, no)                   # (B, na*ny*nx, no), anchor-major


def _dummy_input(model: YOLOv7, img_size: Tuple[int, int]) -> torch.Tensor:
    stride = int(max(model.stride.tolist()))
    h, w = img_size
    if h % stride or w % stride:
        raise ExportError(f"export size {h}x{w} must be a multiple of the model stride {stride}")
    device = next(model.parameters()).device
    return torch.rand(1, 3, h, w, device=device)


def export_onnx(model: YOLOv7, path: PathLike, opset: int = DEFAULT_OPSET, *, decode: bool = True,
                img_size: Tuple[int, int] = (320, 320), dynamic: bool = True) -> Path:
    """Export ``model`` to an ONNX file at ``path`` (written atomically: temp file, then rename).

    Fused models export smaller and run faster (``load_model`` fuses; for a training model, export a fused copy).
    The model's class names and graph go into the file's metadata (``names``, ``graph``, ``nc``, ``strides``).
    ``dynamic``: batch, height and width are free axes; else the graph is fixed to ``img_size`` and batch 1.
    Returns the path. Raises ExportError when torch cannot export the model.
    """
    import onnx

    if not isinstance(model, YOLOv7):
        raise TypeError(f"export_onnx needs a YOLOv7 module, got {type(model).__name__}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    wrapper = ExportGraph(model, decode=decode).eval()
    dummy = _dummy_input(model, img_size)
    output_names = [OUTPUT_NAME, EMBEDDING_NAME] if decode else [f"level{i}" for i in range(model.head.nl)]
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
        if decode:
            dynamic_axes[OUTPUT_NAME] = {0: "batch", 1: "anchors_x_cells"}
            dynamic_axes[EMBEDDING_NAME] = {0: "batch"}
        else:
            for name in output_names:
                dynamic_axes[name] = {0: "batch", 2: f"{name}_height", 3: f"{name}_width"}
    start = time.perf_counter()
    try:
        # The exporter prints tracer warnings about shape-dependent Python values; the graph is checked instead.
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (dummy,), buffer,  # type: ignore[arg-type]  # stubs omit file objects
                              dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=output_names,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        proto = onnx.load_from_string(buffer.getvalue())
        meta = {"names": json.dumps(list(model.names)), "nc": str(model.nc), "graph": model.graph_name,
                "head": model.head_type, "strides": ",".join(f"{float(s):g}" for s in model.stride.tolist()),
                "decoded": str(decode).lower(), "producer": "yolo_backend"}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        with atomic_write(target) as handle:
            handle.write(proto.SerializeToString())
            os.fchmod(handle.fileno(), 0o644)  # a temp file is private; a cache may be shared by several users
    except Exception as exc:
        raise ExportError(f"ONNX export of {model.graph_name} failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
    finally:
        model.train(was_training)
    log.info("exported %s to %s in %.1f s", model.graph_name, target, time.perf_counter() - start)
    return target
