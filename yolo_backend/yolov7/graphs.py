"""The YOLOv7 graphs as plain data (our own format), with the reference layer numbering.

A graph is a JSON-friendly dict:

    {"name": "yolov7-tiny", "activation": "leaky_relu", "head": "IDetect" | "Detect",
     "repconv": "branches" | "reparameterised",
     "anchors": [[w, h, w, h, w, h], ...]   # pixels, one row per level (defaults; checkpoints override)
     "strides": [8, 16, 32],
     "layers": [[from, kind, *args], ...]}

``from`` is -1 (previous layer), a negative offset, an absolute layer index, or a list of those. Kinds:

    ["conv", c_out, k, s]      Conv2d(no bias) + BN + activation
    ["mp"]                      2x2 max-pool, stride 2
    ["sp", k]                   k x k max-pool, stride 1
    ["concat"]                  channel concat of the inputs
    ["upsample", factor]        nearest upsampling
    ["sppcspc", c_out]          SPP in a CSP block
    ["repconv", c_out, k, s]    RepVGG block (form chosen by the graph's "repconv")
    ["detect"]                  the head over the listed inputs (type from the graph's "head")

The index of a layer in ``layers`` is its reference index, so parameters are named ``model.<i>....`` exactly
as in the reference checkpoints. The P6 models (w6/e6/d6/e6e: ReOrg stem, four levels, aux heads) would be
further graphs here plus their layer kinds; they are not built yet.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List

Layer = List[Any]

# The graph a model starts from when there is no checkpoint (a random init): training, the untrained placeholder.
DEFAULT_GRAPH = "yolov7-tiny"
HEAD_TYPES = ("Detect", "IDetect")
REPCONV_FORMS = ("branches", "reparameterised")
LAYER_KINDS = ("conv", "mp", "sp", "concat", "upsample", "sppcspc", "repconv", "detect")


def _conv(src: int | List[int], c_out: int, k: int = 1, s: int = 1) -> Layer:
    return [src, "conv", c_out, k, s]


def _elan_tiny(c: int, c_out: int) -> List[Layer]:
    """yolov7-tiny's ELAN block: two 1x1 branches, two stacked 3x3, concat of four, 1x1 out (6 layers)."""
    return [
        _conv(-1, c), _conv(-2, c), _conv(-1, c, 3), _conv(-1, c, 3),
        [[-1, -2, -3, -4], "concat"],
        _conv(-1, c_out),
    ]


def _elan(c: int, c_mid: int, c_out: int, taps: List[int]) -> List[Layer]:
    """yolov7's ELAN block: two 1x1 branches, four stacked 3x3, concat of ``taps``, 1x1 out (8 layers)."""
    return [
        _conv(-1, c), _conv(-2, c),
        _conv(-1, c_mid, 3), _conv(-1, c_mid, 3), _conv(-1, c_mid, 3), _conv(-1, c_mid, 3),
        [taps, "concat"],
        _conv(-1, c_out),
    ]


def _mp_down(c: int, extra_input: int | None = None) -> List[Layer]:
    """yolov7's transition: max-pool branch and strided 3x3 branch, concatenated (5 layers)."""
    concat_from = [-1, -3] if extra_input is None else [-1, -3, extra_input]
    return [
        [-1, "mp"], _conv(-1, c), _conv(-3, c), _conv(-1, c, 3, 2),
        [concat_from, "concat"],
    ]


def _upsample_merge(c: int, lateral: int) -> List[Layer]:
    """Reduce, upsample x2, reduce a backbone lateral, concat (4 layers)."""
    return [_conv(-1, c), [-1, "upsample", 2], _conv(lateral, c), [[-1, -2], "concat"]]


def _yolov7_tiny_layers() -> List[Layer]:
    layers: List[Layer] = [_conv(-1, 32, 3, 2), _conv(-1, 64, 3, 2)]  # 0-1
    layers += _elan_tiny(32, 64)                                       # 2-7
    layers += [[-1, "mp"]] + _elan_tiny(64, 128)                       # 8-14
    layers += [[-1, "mp"]] + _elan_tiny(128, 256)                      # 15-21
    layers += [[-1, "mp"]] + _elan_tiny(256, 512)                      # 22-28
    # SPP-CSP, written out (29-37)
    layers += [_conv(-1, 256), _conv(-2, 256), [-1, "sp", 5], [-2, "sp", 9], [-3, "sp", 13],
               [[-1, -2, -3, -4], "concat"], _conv(-1, 256), [[-1, -7], "concat"], _conv(-1, 256)]
    layers += _upsample_merge(128, 21) + _elan_tiny(64, 128)           # 38-47
    layers += _upsample_merge(64, 14) + _elan_tiny(32, 64)             # 48-57
    layers += [_conv(-1, 128, 3, 2), [[-1, 47], "concat"]] + _elan_tiny(64, 128)   # 58-65
    layers += [_conv(-1, 256, 3, 2), [[-1, 37], "concat"]] + _elan_tiny(128, 256)  # 66-73
    layers += [_conv(57, 128, 3), _conv(65, 256, 3), _conv(73, 512, 3)]            # 74-76
    layers += [[[74, 75, 76], "detect"]]                                           # 77
    return layers


def _yolov7_layers() -> List[Layer]:
    backbone_taps = [-1, -3, -5, -6]
    head_taps = [-1, -2, -3, -4, -5, -6]
    layers: List[Layer] = [_conv(-1, 32, 3), _conv(-1, 64, 3, 2), _conv(-1, 64, 3), _conv(-1, 128, 3, 2)]  # 0-3
    layers += _elan(64, 64, 256, backbone_taps)                        # 4-11
    layers += _mp_down(128) + _elan(128, 128, 512, backbone_taps)      # 12-24
    layers += _mp_down(256) + _elan(256, 256, 1024, backbone_taps)     # 25-37
    layers += _mp_down(512) + _elan(256, 256, 1024, backbone_taps)     # 38-50
    layers += [[-1, "sppcspc", 512]]                                   # 51
    layers += _upsample_merge(256, 37) + _elan(256, 128, 256, head_taps)   # 52-63
    layers += _upsample_merge(128, 24) + _elan(128, 64, 128, head_taps)    # 64-75
    layers += _mp_down(128, 63) + _elan(256, 128, 256, head_taps)          # 76-88
    layers += _mp_down(256, 51) + _elan(512, 256, 512, head_taps)          # 89-101
    layers += [[75, "repconv", 256, 3, 1], [88, "repconv", 512, 3, 1], [101, "repconv", 1024, 3, 1]]  # 102-104
    layers += [[[102, 103, 104], "detect"]]                                # 105
    return layers


# Default anchors (pixels) of the reference configs; a checkpoint's own anchors always win.
_TINY_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
_YOLOV7_ANCHORS = [[12, 16, 19, 36, 40, 28], [36, 75, 76, 55, 72, 146], [142, 110, 192, 243, 459, 401]]

_BASES: Dict[str, Dict[str, Any]] = {
    "yolov7-tiny": {"activation": "leaky_relu", "anchors": _TINY_ANCHORS, "strides": [8, 16, 32],
                    "layers": _yolov7_tiny_layers()},
    "yolov7": {"activation": "silu", "anchors": _YOLOV7_ANCHORS, "strides": [8, 16, 32],
               "layers": _yolov7_layers()},
}

GRAPH_NAMES = tuple(_BASES)


def get_graph(name: str, head: str = "IDetect", repconv: str = "branches") -> Dict[str, Any]:
    """A fresh copy of a known graph.

    ``head="IDetect"`` with ``repconv="branches"`` is the reference training form (cfg/training);
    ``head="Detect"`` the deploy form (cfg/deploy); ``repconv="reparameterised"`` the form saved after
    RepConv re-parameterisation (only yolov7 has RepConv).
    """
    if name not in _BASES:
        raise ValueError(f"unknown graph {name!r}; known: {', '.join(GRAPH_NAMES)}")
    if head not in HEAD_TYPES:
        raise ValueError(f"unknown head type {head!r}; expected one of {HEAD_TYPES}")
    if repconv not in REPCONV_FORMS:
        raise ValueError(f"unknown RepConv form {repconv!r}; expected one of {REPCONV_FORMS}")
    graph = copy.deepcopy(_BASES[name])
    return {"name": name, "activation": graph["activation"], "head": head, "repconv": repconv,
            "anchors": graph["anchors"], "strides": graph["strides"], "layers": graph["layers"]}


def graph_variants(name: str) -> List[Dict[str, Any]]:
    """Every form of a graph a checkpoint can come in (head type x RepConv form where it applies)."""
    has_repconv = any(layer[1] == "repconv" for layer in _BASES[name]["layers"])
    forms = REPCONV_FORMS if has_repconv else ("branches",)
    return [get_graph(name, head, form) for head in HEAD_TYPES for form in forms]


def head_index(graph: Dict[str, Any]) -> int:
    return len(graph["layers"]) - 1


def resolve_inputs(graph: Dict[str, Any]) -> List[List[int]]:
    """Absolute input indices of every layer (the network input is -1 for layer 0)."""
    resolved = []
    for i, layer in enumerate(graph["layers"]):
        src = layer[0]
        sources = src if isinstance(src, list) else [src]
        absolute = [s if s >= 0 else i + s for s in sources]
        for s in absolute:
            if s >= i or (s < 0 and i != 0):
                raise ValueError(f"graph {graph['name']!r}: layer {i} reads from {s}, which is not before it")
        resolved.append(absolute)
    return resolved


def layer_strides(graph: Dict[str, Any]) -> List[float]:
    """Total downsampling factor of every layer's output, computed from the layer list alone."""
    inputs = resolve_inputs(graph)
    strides: List[float] = []
    for i, layer in enumerate(graph["layers"]):
        in_stride = [1.0 if s < 0 else strides[s] for s in inputs[i]]
        kind = layer[1]
        if kind in ("conv", "repconv"):
            strides.append(in_stride[0] * layer[4])
        elif kind == "mp":
            strides.append(in_stride[0] * 2)
        elif kind == "upsample":
            strides.append(in_stride[0] / layer[2])
        elif kind == "concat":
            if len(set(in_stride)) != 1:
                raise ValueError(f"graph {graph['name']!r}: layer {i} concatenates maps of different strides")
            strides.append(in_stride[0])
        elif kind == "detect":
            strides.append(0.0)
        else:  # sp, sppcspc keep the size
            strides.append(in_stride[0])
    return strides


def head_strides(graph: Dict[str, Any]) -> List[float]:
    """Stride of each level the head reads, from the graph structure."""
    strides = layer_strides(graph)
    return [strides[s] for s in resolve_inputs(graph)[head_index(graph)]]


def validate_graph(graph: Dict[str, Any]) -> None:
    """Raise ValueError when a graph dict (e.g. read from a checkpoint) is not one we can build."""
    for key in ("name", "activation", "head", "repconv", "anchors", "strides", "layers"):
        if key not in graph:
            raise ValueError(f"graph config has no {key!r}")
    if graph["head"] not in HEAD_TYPES:
        raise ValueError(f"graph head {graph['head']!r} is not one of {HEAD_TYPES}")
    if graph["repconv"] not in REPCONV_FORMS:
        raise ValueError(f"graph repconv form {graph['repconv']!r} is not one of {REPCONV_FORMS}")
    layers = graph["layers"]
    if not layers or layers[-1][1] != "detect":
        raise ValueError("graph's last layer must be the detect head")
    for i, layer in enumerate(layers):
        if not isinstance(layer, list) or len(layer) < 2 or layer[1] not in LAYER_KINDS:
            raise ValueError(f"graph layer {i} ({layer!r}) is not [from, kind, ...] with a known kind")
    resolve_inputs(graph)
    if len(graph["anchors"]) != len(resolve_inputs(graph)[-1]):
        raise ValueError("graph needs one anchor row per head input")
