"""Safe checkpoint loading and saving.

Reference YOLOv7 checkpoints are pickles of the reference's ``models.yolo.Model`` (usually fp16, under
``model``, sometimes with an ``ema`` copy). We never import or run that code: ``torch.load(weights_only=True)``
runs with an allow-list (safe_pickle.py) that maps each reference class path to an inert stand-in record of ours,
which keeps only the pickled attribute dict. The state_dict, class names and strides are then read out of those records,
the graph is identified from the state_dict's keys and shapes, and our own ``YOLOv7`` module is built and
loaded with ``strict=True``. Any global outside the allow-list makes torch refuse the file before anything
is called.

Our own format (written by ``save_checkpoint``) is a plain dict of data and tensors:
``{"format": "yolo-backend-checkpoint", "format_version": 1, "graph": {...}, "nc": int, "names": [...],
"state_dict": {...}, "version": {...}}``. ``version.training`` holds the training settings of a fine-tuned model,
among them ``img_size``, the size it serves at by default (``serving_img_size``).
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..atomic import atomic_write
from . import graphs
from .inference_backends import backend_or_default, cache_dir_or_default
from .model import YOLOv7
from .ort_runtime import InferenceModel, with_backend
from .safe_pickle import PickledRecord, safe_unpickling

FORMAT = "yolo-backend-checkpoint"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file, what is wrong and what to do."""


# --------------------------------------------------------------------------------------------------------------
# What a checkpoint holds
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LoadedCheckpoint:
    """A checkpoint read and identified, before any module is built.

    ``state_dict`` is fp32 on CPU with reference parameter names; ``graph`` is a graph dict (graphs.py) whose
    anchors (pixels) and strides are the checkpoint's own.
    """

    path: str
    state_dict: Dict[str, torch.Tensor]
    graph: Dict[str, Any]
    nc: int
    names: List[str]
    source: str                   # "reference" (made by the reference code) or "yolo-backend" (ours)
    weights: str                  # "ema", "model" or "state_dict": which entry the weights came from
    metadata: Dict[str, Any] = field(default_factory=dict)

    @property
    def graph_name(self) -> str:
        return self.graph["name"]

    @property
    def head_type(self) -> str:
        return self.graph["head"]

    @property
    def anchors(self) -> List[List[float]]:
        return self.graph["anchors"]

    @property
    def strides(self) -> List[float]:
        return self.graph["strides"]


def _fail(path: PathLike, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}")


def _read_pickle(path: PathLike) -> Any:
    """torch.load with the allow-list; every failure becomes one CheckpointError naming the file."""
    p = Path(path)
    if not p.exists():
        raise _fail(path, "file not found; check the path (MODEL_PATH / --weights)")
    if p.is_dir():
        raise _fail(path, "is a directory, not a checkpoint file")
    if p.stat().st_size == 0:
        raise _fail(path, "is empty (0 bytes); copy the checkpoint again")
    with open(p, "rb") as handle:
        head = handle.read(4)
    # torch writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle (protocol opcode 0x80).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise _fail(path, "is not a PyTorch checkpoint (neither a torch zip archive nor a torch pickle); "
                          "point to a YOLOv7 .pt file")
    try:
        with safe_unpickling():
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        match = re.search(r"GLOBAL ([\w.]+)", text)
        if match:
            raise _fail(path, f"refused: its pickle references `{match.group(1)}`, which is not part of a "
                              "YOLOv7 checkpoint and could run code when loaded; only checkpoints saved by "
                              "the reference YOLOv7 code or by this project are accepted") from None
        if "invalid load key" in text or "magic number" in text.lower():
            raise _fail(path, "is not a PyTorch checkpoint (neither a torch zip archive nor a torch "
                              "pickle); point to a YOLOv7 .pt file") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        reason = (detail.group(1) if detail else text.splitlines()[0] if text else "").strip()
        raise _fail(path, f"is corrupt or not a PyTorch checkpoint: its pickle cannot be read safely "
                          f"({reason[:200]})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        text = str(exc)
        if isinstance(exc, EOFError) or "central directory" in text or "zip archive" in text.lower() \
                or "unexpected EOF" in text or "truncated" in text.lower():
            raise _fail(path, "is damaged: truncated or corrupt (the archive is incomplete); download or copy the "
                              "checkpoint again and compare its size") from None
        reason = text.splitlines()[0][:300] if text else type(exc).__name__
        raise _fail(path, f"could not be read as a PyTorch checkpoint: {reason}") from None
    except Exception as exc:  # anything else torch raises on a broken file
        raise _fail(path, f"could not be read as a PyTorch checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None


def _as_float32(path: PathLike, key: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _fail(path, f"entry {key!r} of the model is a {type(value).__name__}, not a tensor")
    value = value.detach()
    if isinstance(value, torch.nn.Parameter):
        value = value.data
    if value.is_floating_point() and value.dtype != torch.float32:
        value = value.float()  # fp16 files -> fp32 (also what inference on CPU needs)
    return value.contiguous()


@dataclass
class _RecordTree:
    state_dict: Dict[str, torch.Tensor]
    types: Dict[str, str]        # module path ("model.0.act") -> pickled class name
    records: Dict[str, PickledRecord]


def _walk_records(path: PathLike, root: PickledRecord) -> _RecordTree:
    tree = _RecordTree({}, {}, {})

    def visit(record: Any, prefix: str) -> None:
        if not isinstance(record, PickledRecord) or not isinstance(record.state, dict):
            raise _fail(path, f"module {prefix.rstrip('.') or '<root>'} is a {type(record).__name__}, "
                              "not a pickled torch module")
        name = prefix.rstrip(".")
        tree.types[name] = record.pickled_name
        tree.records[name] = record
        state = record.state
        for key, value in (state.get("_parameters") or {}).items():
            if value is not None:
                tree.state_dict[prefix + key] = _as_float32(path, prefix + key, value)
        skipped = state.get("_non_persistent_buffers_set") or set()
        for key, value in (state.get("_buffers") or {}).items():
            if value is not None and key not in skipped:
                tree.state_dict[prefix + key] = _as_float32(path, prefix + key, value)
        for key, child in (state.get("_modules") or {}).items():
            if child is not None:
                visit(child, prefix + key + ".")

    visit(root, "")
    return tree


_ACTIVATIONS = {"torch.nn.modules.activation.LeakyReLU": "leaky_relu",
                "torch.nn.modules.activation.SiLU": "silu"}


def _activation_hint(tree: _RecordTree) -> Optional[str]:
    """The activation the checkpoint's convs use (from the first conv layer's pickled ``act``)."""
    for module_path, type_name in tree.types.items():
        if module_path.endswith(".act") and module_path.startswith("model."):
            return _ACTIVATIONS.get(type_name)
    return None


def _clean_names(raw: Any, nc: int) -> List[str]:
    if isinstance(raw, Mapping):
        try:
            raw = [raw[k] for k in sorted(raw, key=int)]
        except (TypeError, ValueError):
            raw = list(raw.values())
    if isinstance(raw, (list, tuple)) and len(raw) == nc and all(isinstance(n, str) for n in raw):
        return list(raw)
    return [f"class{i}" for i in range(nc)]


def _tensor_list(value: Any) -> Optional[List[float]]:
    if isinstance(value, torch.Tensor) and value.numel() > 0:
        return [float(v) for v in value.flatten().tolist()]
    return None


# --------------------------------------------------------------------------------------------------------------
# Graph identification
# --------------------------------------------------------------------------------------------------------------

def _expected_shapes(graph: Dict[str, Any], nc: int, anchors: List[List[float]]) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):
        model = YOLOv7(graph, nc, anchors)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _compare(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, Tuple[int, ...]]):
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {expected[k]}" for k in expected
             if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    return missing, unexpected, wrong


def identify_graph(state_dict: Mapping[str, torch.Tensor], path: PathLike = "<state_dict>",
                   activation: Optional[str] = None) -> Tuple[Dict[str, Any], int]:
    """Which known graph (and form) a reference-named state_dict belongs to, and its class count.

    Returns (graph dict with the checkpoint's anchors and structural strides, nc). Raises CheckpointError
    when the state_dict fits no known graph, naming the closest one and how it differs.
    """
    grids = sorted(k for k in state_dict if k.endswith(".anchor_grid"))
    if not grids:
        raise _fail(path, "its weights fit no known YOLOv7 graph: there is no detection head "
                          "(no '<layer>.anchor_grid' buffer)")
    prefix = grids[-1][: -len("anchor_grid")]
    anchor_grid = state_dict[grids[-1]]
    conv_key = prefix + "m.0.weight"
    if anchor_grid.dim() != 6 or conv_key not in state_dict:
        raise _fail(path, f"its weights fit no known YOLOv7 graph: head {prefix[:-1]} has an unexpected layout")
    nl, na = anchor_grid.shape[0], anchor_grid.shape[2]
    outputs = state_dict[conv_key].shape[0]
    if outputs % na or outputs // na < 6:
        raise _fail(path, f"its weights fit no known YOLOv7 graph: head output {outputs} is not "
                          f"anchors ({na}) x (5 + classes)")
    nc = outputs // na - 5
    anchors = anchor_grid.reshape(nl, na * 2).tolist()
    head = "IDetect" if prefix + "ia.0.implicit" in state_dict else "Detect"
    repconv = "reparameterised" if any(".rbr_reparam." in k for k in state_dict) else "branches"
    try:
        head_idx = int(prefix.split(".")[1])
    except (IndexError, ValueError):
        head_idx = -1

    best = None
    for name in graphs.GRAPH_NAMES:
        for graph in graphs.graph_variants(name):
            if activation:
                graph["activation"] = activation
            try:
                expected = _expected_shapes(graph, nc, anchors)
            except ValueError:
                continue
            missing, unexpected, wrong = _compare(state_dict, expected)
            if not (missing or unexpected or wrong):
                graph["anchors"] = anchors
                graph["strides"] = graphs.head_strides(graph)
                return graph, nc
            score = len(missing) + len(unexpected) + len(wrong)
            if graphs.head_index(graph) == head_idx and graph["head"] == head and graph["repconv"] == repconv:
                score -= 1_000_000  # same head position and form: the diagnosis that helps most
            if best is None or score < best[0]:
                best = (score, graph, missing, unexpected, wrong)

    assert best is not None  # every graph variant was compared
    _, graph, missing, unexpected, wrong = best
    details = []
    if missing:
        details.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        details.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:2])})")
    known = ", ".join(graphs.GRAPH_NAMES)
    raise _fail(path, f"its weights fit no known YOLOv7 graph ({known}; training and deploy forms). "
                      f"Closest: {graph['name']} with a {graph['head']} head, {nc} classes: "
                      f"{'; '.join(details)}. Other YOLOv7 variants (yolov7x, P6 models) are not supported yet")


# --------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------------------

_P6_TYPES = {"models.common.ReOrg", "models.common.DownC", "models.yolo.IAuxDetect"}


def _from_reference(path: PathLike, ckpt: Mapping[str, Any]) -> LoadedCheckpoint:
    which = "ema" if ckpt.get("ema") is not None else "model"
    entry = ckpt.get(which)
    metadata: Dict[str, Any] = {k: v for k, v in ckpt.items()
                                if k in ("epoch", "updates") and isinstance(v, (int, float, str))}
    if isinstance(entry, Mapping) and entry and all(isinstance(v, torch.Tensor) for v in entry.values()):
        # A bare state_dict saved under "model": names only if the file has them.
        state_dict = {k: _as_float32(path, k, v) for k, v in entry.items()}
        graph, nc = identify_graph(state_dict, path)
        names = _clean_names(ckpt.get("names"), nc)
        return LoadedCheckpoint(str(path), state_dict, graph, nc, names, "reference", "state_dict", metadata)
    if not isinstance(entry, PickledRecord):
        raise _fail(path, f"is not a YOLOv7 checkpoint: its {which!r} entry is a {type(entry).__name__}, "
                          "expected a pickled models.yolo.Model")
    if entry.pickled_name != "models.yolo.Model":
        raise _fail(path, f"is not a YOLOv7 checkpoint: its {which!r} entry is a pickled "
                          f"{entry.pickled_name}, expected models.yolo.Model")
    tree = _walk_records(path, entry)
    p6 = sorted(set(tree.types.values()) & _P6_TYPES)
    if p6:
        raise _fail(path, f"is a YOLOv7 P6 model (uses {', '.join(t.rsplit('.', 1)[-1] for t in p6)}); "
                          "only yolov7-tiny and yolov7 are supported so far")
    graph, nc = identify_graph(tree.state_dict, path, _activation_hint(tree))
    model_state = entry.state
    head_record = tree.records.get(f"model.{graphs.head_index(graph)}")
    # Strides: the checkpoint's own (Detect.stride / Model.stride) must be what the graph's structure gives.
    for source in (head_record.state if head_record else {}, model_state):
        strides = _tensor_list(source.get("stride"))
        if strides is not None and strides != [float(s) for s in graph["strides"]]:
            raise _fail(path, f"its strides {strides} do not match the {graph['name']} graph "
                              f"({graph['strides']}); the checkpoint is inconsistent")
    _check_anchor_buffers(path, tree.state_dict, graph)
    names = _clean_names(model_state.get("names"), nc)
    metadata["yaml_file"] = model_state.get("yaml_file") if isinstance(model_state.get("yaml_file"), str) else None
    return LoadedCheckpoint(str(path), tree.state_dict, graph, nc, names, "reference", which, metadata)


def _check_anchor_buffers(path: PathLike, state_dict: Mapping[str, torch.Tensor], graph: Dict[str, Any]) -> None:
    """``anchors`` (grid units) times the stride must give ``anchor_grid`` (pixels)."""
    prefix = f"model.{graphs.head_index(graph)}."
    anchors, grid = state_dict.get(prefix + "anchors"), state_dict.get(prefix + "anchor_grid")
    if anchors is None or grid is None:
        return
    strides = torch.tensor(graph["strides"], dtype=torch.float32).view(-1, 1, 1)
    expected = anchors * strides
    if not torch.allclose(expected, grid.view_as(anchors), rtol=1e-2, atol=1e-2):
        raise _fail(path, "its head's anchors and anchor_grid buffers disagree with the strides "
                          f"{graph['strides']}; the checkpoint is inconsistent")


def _from_ours(path: PathLike, ckpt: Mapping[str, Any]) -> LoadedCheckpoint:
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _fail(path, f"was written in format version {version!r}; this code reads up to "
                          f"{FORMAT_VERSION}: update yolo_backend")
    graph, state_dict, nc = ckpt.get("graph"), ckpt.get("state_dict"), ckpt.get("nc")
    if not isinstance(graph, dict) or not isinstance(state_dict, Mapping) or not isinstance(nc, int):
        raise _fail(path, "is a damaged yolo-backend checkpoint (graph, state_dict or nc missing)")
    try:
        graphs.validate_graph(graph)
    except ValueError as exc:
        raise _fail(path, f"has an unusable graph config: {exc}") from None
    state_dict = {k: _as_float32(path, k, v) for k, v in state_dict.items()}
    names = _clean_names(ckpt.get("names"), nc)
    metadata = dict(ckpt.get("version") or {})
    return LoadedCheckpoint(str(path), state_dict, dict(graph), nc, names, "yolo-backend",
                            str(ckpt.get("weights", "model")), metadata)


def checkpoint_from_object(obj: Any, path: PathLike = "<checkpoint>") -> LoadedCheckpoint:
    """Interpret what the safe unpickler returned (used by ``load_checkpoint``; public for tests/tools)."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return _from_ours(path, obj)
    if isinstance(obj, Mapping) and (obj.get("ema") is not None or obj.get("model") is not None):
        return _from_reference(path, obj)
    if isinstance(obj, torch.Tensor):
        raise _fail(path, "is not a YOLOv7 checkpoint: it holds a single tensor, not a model")
    if isinstance(obj, Mapping):
        keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
        raise _fail(path, f"is not a YOLOv7 checkpoint: a dict without a 'model' or 'ema' entry (keys: {keys})")
    raise _fail(path, f"is not a YOLOv7 checkpoint: it holds a {type(obj).__name__}")


def load_checkpoint(path: PathLike) -> LoadedCheckpoint:
    """Read and identify a checkpoint (reference or ours) without building a model."""
    return checkpoint_from_object(_read_pickle(path), path)


# --------------------------------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------------------------------

def model_from_checkpoint(ckpt: LoadedCheckpoint, device: Union[str, torch.device] = "cpu",
                          fuse: bool = True) -> YOLOv7:
    """Build the checkpoint's graph and load its weights with strict=True.

    ``fuse=False`` gives the training-form module (for fine-tuning); it is returned in eval mode either way.
    """
    try:
        with torch.device("meta"):
            model = YOLOv7(ckpt.graph, ckpt.nc, ckpt.anchors, ckpt.strides, ckpt.names)
    except ValueError as exc:
        raise _fail(ckpt.path, f"its graph config cannot be built: {exc}") from None
    model = model.to_empty(device="cpu")
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise _fail(ckpt.path, "its weights do not fit its graph config: "
                               f"{' '.join(line.strip() for line in first[:3])[:400]}") from None
    # The only non-persistent buffer: not in any state_dict, so set it from the checkpoint.
    with torch.no_grad():
        model.head.stride.copy_(torch.tensor(ckpt.strides, dtype=torch.float32))
    model.eval()
    if fuse:
        model.fuse()
    return model.to(device)


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu", fuse: bool = True,
               backend: Optional[str] = None, cache_dir: Optional[PathLike] = None) -> InferenceModel:
    """Load a YOLOv7 checkpoint (reference ``.pt`` or ours) as an eval-mode inference module on ``device``.

    The module has ``.names``, ``.nc``, ``.stride``, ``.graph``, ``.graph_name``, ``.head_type``, ``.anchors_px``;
    ``model(x)`` for a float (B, 3, H, W) RGB tensor in [0, 1] (H, W multiples of 32) returns (B, N, 5+nc)
    [cx, cy, w, h, objectness, class scores...] in input pixels. Raises CheckpointError for unusable files.

    ``backend`` (``auto`` by default): on the CPU a fused model runs on ONNX Runtime (an ``OrtYOLOv7``, exported
    once into ``cache_dir``) because it is faster there; ``torch`` gives the ``YOLOv7`` module itself
    (channels_last on the CPU). CUDA and ``fuse=False`` are always torch. See ort_runtime.with_backend. None for
    either falls back to the INFERENCE_BACKEND / ONNX_CACHE_DIR environment variables (inference_backends.py).
    A fused module's parameters do not require gradients; load with ``fuse=False`` to train.
    """
    return inference_model(load_checkpoint(path), device=device, fuse=fuse, backend=backend, cache_dir=cache_dir)


def inference_model(ckpt: LoadedCheckpoint, device: Union[str, torch.device] = "cpu", fuse: bool = True,
                    backend: Optional[str] = None, cache_dir: Optional[PathLike] = None) -> InferenceModel:
    """``load_model`` for a checkpoint already read (``load_checkpoint``): for a caller that also needs its metadata
    (e.g. ``trained_img_size``) without reading the file twice. The ONNX export is keyed by ``ckpt.path``'s hash."""
    backend, cache_dir = backend_or_default(backend), cache_dir_or_default(cache_dir)
    model = model_from_checkpoint(ckpt, device=device, fuse=fuse)
    if fuse:  # an inference module: model(x) outside no_grad must not build an autograd graph (memory, time)
        model.requires_grad_(False)
    return with_backend(model, ckpt.path, backend, cache_dir)


# --------------------------------------------------------------------------------------------------------------
# The size to run inference at
# --------------------------------------------------------------------------------------------------------------

# The inference size of a checkpoint that records no training size (official YOLOv7 checkpoints: the reference's
# own default, and the size its COCO weights were trained at). For a checkpoint trained at another size it is a
# guess, and the reason says so (``SIZE_GUESS``): the app measures such checkpoints (yolo_backend/serving_size.py).
DEFAULT_IMG_SIZE = 640
SIZE_GUESS = "a guess: the checkpoint records no training size"


def trained_img_size(checkpoint: Union[LoadedCheckpoint, PathLike]) -> Optional[int]:
    """The image size ``checkpoint`` (a path or a ``LoadedCheckpoint``) was trained at, when it records one: ours
    written by ``fine_tune`` keep their TrainConfig under ``version.training`` (``img_size``). None for official
    YOLOv7 checkpoints (they record none), an untrained model, or a value that is not a positive multiple of 32."""
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    if ckpt.source != "yolo-backend":
        return None
    training = ckpt.metadata.get("training")
    size = training.get("img_size") if isinstance(training, Mapping) else None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 32:
        return None
    return size


def serving_img_size(checkpoint: Union[LoadedCheckpoint, PathLike], img_size: Optional[int] = None,
                     setting: str = "img_size") -> Tuple[int, str]:
    """(size, why): the inference size for ``checkpoint`` and the reason, for logs. The one rule: an explicit
    ``img_size`` (named ``setting`` in the reason, e.g. ``IMG_SIZE`` or ``--img-size``) wins; else the size the
    checkpoint was trained at when it records one; else DEFAULT_IMG_SIZE (640), for an untrained model because
    any size will do, for any other as a guess (the reason starts with SIZE_GUESS and names ``setting``)."""
    if img_size is not None:
        return int(img_size), f"{setting}={int(img_size)}"
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    trained = trained_img_size(ckpt)
    if trained is not None:
        return trained, f"trained at {trained}"
    if ckpt.source == "yolo-backend" and ckpt.metadata.get("untrained"):
        return DEFAULT_IMG_SIZE, f"untrained: {DEFAULT_IMG_SIZE}"
    return DEFAULT_IMG_SIZE, f"{SIZE_GUESS}; set {setting} to the size it was trained at"


def is_size_guess(reason: Optional[str]) -> bool:
    """Whether a ``serving_img_size`` reason is the 640 guess."""
    return bool(reason) and str(reason).startswith(SIZE_GUESS)


# --------------------------------------------------------------------------------------------------------------
# Describing and saving
# --------------------------------------------------------------------------------------------------------------

def describe(model: YOLOv7) -> Dict[str, Any]:
    """What a loaded model is: graph, head type, classes, anchors (pixels), strides, parameter count."""
    anchors = model.anchors_px.detach().float().cpu()
    return {
        "graph": model.graph_name,
        "head": model.head_type,
        "activation": model.graph["activation"],
        "nc": model.nc,
        "names": list(model.names),
        "anchors": [[[round(float(w), 3), round(float(h), 3)] for w, h in level] for level in anchors.tolist()],
        "strides": [float(s) for s in model.stride.tolist()],
        "parameters": int(getattr(model, "parameter_count", 0) or sum(p.numel() for p in model.parameters())),
        "fused": bool(model.fused),
    }


_PLAIN_TYPES = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Metadata must reload under weights_only=True: plain data only."""
    if isinstance(value, _PLAIN_TYPES):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            _check_plain(item, f"{where}.{key}")
        return
    raise ValueError(f"{where} is a {type(value).__name__}; checkpoint metadata must be plain "
                     "str/int/float/bool/None/list/dict")


def save_checkpoint(path: PathLike, model: YOLOv7, names: Optional[Sequence[str]] = None,
                    metadata: Optional[Mapping[str, Any]] = None, *, weights: str = "model") -> Path:
    """Write ``model`` (unfused) in our format, atomically: temp file in the same folder, fsync, rename.

    ``metadata`` (plain data: version name, metrics, parent, training settings...) is stored under "version";
    ``weights`` records which weights these are ("ema" for EMA weights). Returns the path written.
    """
    if not isinstance(model, YOLOv7):
        raise TypeError(f"save_checkpoint needs a YOLOv7 module, got {type(model).__name__}")
    if model.fused:
        raise ValueError("save the unfused model: a fused model's weights no longer fit its graph "
                         "(use model_from_checkpoint(..., fuse=False) or the training model)")
    names = list(names) if names is not None else list(model.names)
    if len(names) != model.nc or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names must be {model.nc} strings, got {names!r}")
    meta = dict(metadata or {})
    meta.setdefault("saved_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("torch", torch.__version__.split("+")[0])
    _check_plain(meta, "metadata")
    graph = dict(model.graph)
    graph["anchors"] = model.anchors_px.detach().float().cpu().reshape(model.head.nl, -1).tolist()
    graph["strides"] = [float(s) for s in model.stride.tolist()]
    state_dict = {k: v.detach().to("cpu", copy=True).float() if v.is_floating_point()
                  else v.detach().to("cpu", copy=True)
                  for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "graph": graph, "nc": model.nc,
               "names": names, "weights": weights, "state_dict": state_dict, "version": meta}

    target = Path(path)
    with atomic_write(target) as handle:
        torch.save(payload, handle)
    return target
