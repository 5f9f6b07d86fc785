"""Build a graph (see graphs.py) into a torch module, ``YOLOv7``.

Training mode returns the raw per-level maps (B, na, ny, nx, 5+nc); eval mode returns the decoded
(B, N, 5+nc) [cx, cy, w, h, objectness, class scores...] in input pixels, like the reference inference output.
``fuse()`` rewrites the module for inference (conv+BN, RepConv, IDetect implicit folding) without changing
what it computes.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Union, cast

import torch
from torch import nn

from . import graphs
from .layers import (ConvBnAct, Concat, DetectHead, MaxPoolDown, MaxPoolSame, RepConv, SPPCSPC)


def _build_layer(layer: List[Any], c_in: List[int], graph: Dict[str, Any], nc: int,
                 anchors_px: Sequence[Sequence[float]], strides: Sequence[float]) -> tuple[nn.Module, int]:
    """One layer's module and its output channel count."""
    kind, args, act = layer[1], layer[2:], graph["activation"]
    if kind == "conv":
        c_out, k, s = args
        return ConvBnAct(c_in[0], c_out, k, s, act), c_out
    if kind == "mp":
        return MaxPoolDown(), c_in[0]
    if kind == "sp":
        return MaxPoolSame(args[0]), c_in[0]
    if kind == "concat":
        return Concat(1), sum(c_in)
    if kind == "upsample":
        return nn.Upsample(scale_factor=args[0], mode="nearest"), c_in[0]
    if kind == "sppcspc":
        return SPPCSPC(c_in[0], args[0], act), args[0]
    if kind == "repconv":
        c_out, k, s = args
        return RepConv(c_in[0], c_out, k, s, act, reparameterised=graph["repconv"] == "reparameterised"), c_out
    if kind == "detect":
        head = DetectHead(nc, anchors_px, strides, c_in, implicit=graph["head"] == "IDetect")
        return head, 0
    raise ValueError(f"unknown layer kind {kind!r}")


class YOLOv7(nn.Module):
    """A YOLOv7 graph as a module. Parameters are named ``model.<layer index>.…`` like the reference.

    Attributes: ``graph`` (the config dict it was built from, anchors/strides as loaded), ``graph_name``,
    ``head_type`` ("Detect"/"IDetect", as built), ``nc``, ``names``, ``stride`` (tensor of level strides),
    ``fused`` (True after ``fuse()``).
    """

    def __init__(self, graph: Dict[str, Any], nc: int, anchors: Optional[Sequence[Sequence[float]]] = None,
                 strides: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None):
        super().__init__()
        graphs.validate_graph(graph)
        if nc < 1:
            raise ValueError(f"nc must be at least 1, got {nc}")
        self.graph = copy.deepcopy(graph)
        anchors = [list(map(float, row)) for row in (anchors if anchors is not None else graph["anchors"])]
        structural = graphs.head_strides(graph)
        strides = [float(s) for s in (strides if strides is not None else structural)]
        if strides != [float(s) for s in structural]:
            raise ValueError(f"strides {strides} do not match graph {graph['name']!r} (it gives {structural})")
        self.graph["anchors"], self.graph["strides"] = anchors, strides
        self.graph_name: str = graph["name"]
        self.head_type: str = graph["head"]
        self.nc = nc
        self.names: List[str] = list(names) if names is not None else [f"class{i}" for i in range(nc)]
        if len(self.names) != nc:
            raise ValueError(f"{len(self.names)} class names for nc={nc}")
        self.fused = False

        self._inputs = graphs.resolve_inputs(graph)
        layers: List[nn.Module] = []
        channels: List[int] = []
        for i, layer in enumerate(graph["layers"]):
            c_in = [3 if s < 0 else channels[s] for s in self._inputs[i]]
            module, c_out = _build_layer(layer, c_in, self.graph, nc, anchors, strides)
            layers.append(module)
            channels.append(c_out)
        self.model = nn.ModuleList(layers)
        # Outputs read by a later layer other than the next one must be kept during the forward.
        self._keep = sorted({s for i, srcs in enumerate(self._inputs) for s in srcs if s >= 0 and s != i - 1})
        self._initialize()

    @property
    def head(self) -> DetectHead:
        return cast(DetectHead, self.model[-1])

    @property
    def stride(self) -> torch.Tensor:
        return self.head.stride

    @property
    def anchors_px(self) -> torch.Tensor:
        """Anchors (nl, na, 2) in input pixels."""
        return self.head.anchor_grid.view(self.head.nl, self.head.na, 2)

    def _initialize(self) -> None:
        # Head biases as the reference initialises them: objectness prior for ~8 objects per 640² image,
        # class prior 0.6/(nc-0.99); the rest keeps torch's default init.
        head = self.head
        for conv, stride in zip(cast(List[nn.Conv2d], head.m), self.graph["strides"]):
            if conv.bias is None or conv.bias.is_meta:
                continue
            with torch.no_grad():
                b = conv.bias.view(head.na, head.no)
                b[:, 4] += math.log(8 / (640 / stride) ** 2)
                b[:, 5:] += math.log(0.6 / (head.nc - 0.99))

    def forward(self, x: torch.Tensor):
        return self._run(x, len(self.model))

    def forward_with_embedding(self, x: torch.Tensor):
        """(what ``forward`` returns, the images' embeddings (B, E)) from one pass: see ``neck_embedding``."""
        features = self.head_inputs(x)
        return self.head(features), neck_embedding(features)

    def head_inputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The feature maps the head reads, one per level (the network without its head; used by the ONNX export)."""
        return self._run(x, len(self.model) - 1)

    def _run(self, x: torch.Tensor, stop: int):
        """Run layers [0, stop); with stop = the head's index, return the head's inputs instead of its output."""
        keep = self._keep
        saved: Dict[int, torch.Tensor] = {}
        inp: Union[torch.Tensor, List[torch.Tensor]]
        for i, (module, sources) in enumerate(zip(self.model, self._inputs)):
            if len(sources) == 1 and sources[0] == i - 1:
                inp = x
            elif len(sources) == 1:
                inp = saved[sources[0]]
            else:
                inp = [x if s == i - 1 else saved[s] for s in sources]
            if i == stop:
                return inp
            x = module(inp)
            if i in keep:
                saved[i] = x
        return x

    @torch.no_grad()
    def fuse(self) -> "YOLOv7":
        """Fold BN into convs, re-parameterise RepConv and fold IDetect's implicit layers (in place)."""
        for module in list(self.modules()):
            fuse = getattr(module, "fuse", None)
            if module is not self and fuse is not None:
                fuse()
        self.fused = True
        self.head_type = self.graph["head"]  # the head type it was loaded as; computes like Detect now
        return self

    def extra_repr(self) -> str:
        return f"graph={self.graph_name}, head={self.head_type}, nc={self.nc}, fused={self.fused}"


def neck_embedding(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """An image embedding from the feature maps the head reads (the neck's outputs, one per level): each map
    averaged over height and width, the levels concatenated -> (B, sum of their channels), float32. It costs no
    second pass, and images the detector sees alike land close together (clusters, diversity)."""
    return torch.cat([f.float().mean(dim=(2, 3)) for f in features], dim=1)


def build_model(graph: Dict[str, Any], nc: int, anchors: Optional[Sequence[Sequence[float]]] = None,
                strides: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None) -> YOLOv7:
    """A randomly initialised training-form model of ``graph`` (a dict from graphs.get_graph or a checkpoint).

    ``anchors``: pixels, one row [w0, h0, w1, h1, ...] per level (default: the graph's); ``strides``
    default to what the graph's structure gives.
    """
    return YOLOv7(graph, nc, anchors, strides, names)
