"""The allow-list torch's weights-only unpickler reads reference YOLOv7 checkpoints with.

Each class path a reference checkpoint pickles (``models.yolo.Model``, ``models.common.Conv``, torch.nn layers,
numpy arrays) maps to an inert stand-in of ours that keeps the constructor arguments and the pickled state and runs
nothing. Any global outside the list makes torch refuse the file before anything is called.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, List, Tuple

import torch

class PickledRecord:
    """Stands in for a pickled object: keeps the constructor args and the pickled state, runs nothing."""

    pickled_name = "?"
    args: tuple = ()
    state: Any = None

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


class PickledArray(PickledRecord):
    """Stand-in for a numpy array (reference checkpoints keep e.g. ``best_fitness`` as one)."""


class PickledScalar(PickledRecord):
    """Stand-in for a numpy scalar."""


def _reconstruct_array(subtype, shape=None, dtype=None):
    # numpy's _reconstruct(subtype, shape, dtype): the array's content arrives later through BUILD.
    return PickledArray() if not (isinstance(subtype, type) and issubclass(subtype, PickledArray)) else subtype()


def _numpy_scalar(dtype, data=None):
    scalar = PickledScalar()
    scalar.args = (dtype, data)
    return scalar


_MODEL_CLASSES = ["models.yolo.Model", "models.yolo.Detect", "models.yolo.IDetect",
                  # P6 models: accepted as records so that the refusal can say what the model is.
                  "models.yolo.IAuxDetect", "models.yolo.IBin", "models.yolo.IKeypoint"]
_COMMON_CLASSES = ["models.common." + n for n in (
    "Conv", "MP", "SP", "Concat", "SPPCSPC", "RepConv", "ImplicitA", "ImplicitM",
    "ReOrg", "DownC", "Shortcut")]
_TORCH_NN_CLASSES = ["torch.nn.modules." + n for n in (
    "conv.Conv2d", "batchnorm.BatchNorm2d", "activation.LeakyReLU", "activation.SiLU", "activation.ReLU",
    "activation.Hardswish", "activation.Sigmoid", "activation.Mish", "linear.Identity", "pooling.MaxPool2d",
    "upsampling.Upsample", "container.ModuleList", "container.Sequential")]
_NUMPY_RECONSTRUCT = ["numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"]
_NUMPY_SCALAR = ["numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"]
_NUMPY_CLASSES = ["numpy.ndarray", "numpy.dtype"]

# Torch's own weights-only allow-list already covers these, which reference files use (the legacy ones come
# from files written by older torch): listed so tests can check a real file against the full set.
TORCH_DEFAULT_GLOBALS = frozenset({
    "collections.OrderedDict", "builtins.set", "__builtin__.set", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "torch.HalfStorage", "torch.LongStorage",
    "torch.DoubleStorage", "torch.IntStorage", "torch.ByteStorage", "torch.BoolStorage", "torch.Size",
    "torch.device",
})


def _standin_class(name: str, base: type = PickledRecord) -> type:
    short = name.rsplit(".", 1)[-1]
    return type(f"Pickled_{short}", (base,), {"pickled_name": name, "__module__": __name__})


def _build_safe_globals() -> List[Tuple[Callable[..., Any], str]]:
    entries: List[Tuple[Callable[..., Any], str]] = []
    for name in _MODEL_CLASSES + _COMMON_CLASSES + _TORCH_NN_CLASSES:
        entries.append((_standin_class(name), name))
    array_cls = _standin_class("numpy.ndarray", PickledArray)
    entries.append((array_cls, "numpy.ndarray"))
    entries.append((_standin_class("numpy.dtype"), "numpy.dtype"))
    entries += [(_reconstruct_array, n) for n in _NUMPY_RECONSTRUCT]
    entries += [(_numpy_scalar, n) for n in _NUMPY_SCALAR]
    return entries


_SAFE_GLOBALS = _build_safe_globals()
STANDIN_GLOBALS = frozenset(name for _, name in _SAFE_GLOBALS)
# Every global name the loader lets a pickle use.
ALLOWED_GLOBALS = STANDIN_GLOBALS | TORCH_DEFAULT_GLOBALS

# torch's safe_globals() edits a process-wide list: one load at a time keeps our entries in place.
_LOAD_LOCK = threading.RLock()


@contextlib.contextmanager
def safe_unpickling() -> Iterator[None]:
    """Context in which torch's weights-only unpickler maps reference classes to our stand-ins."""
    with _LOAD_LOCK, torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
        yield
