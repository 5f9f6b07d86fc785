"""The building blocks of the YOLOv7 graphs, written for this project.

Submodule and parameter names follow the reference checkpoints (``conv``/``bn``/``act``, ``rbr_dense``,
``m``/``ia``/``im`` in the head, ...) so that a reference state_dict loads with ``strict=True``. Each block that
can be simplified for inference has a ``fuse()`` that rewrites it in place (conv+BN folding, RepConv
re-parameterisation, implicit-knowledge folding in the head).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, cast

import torch
from torch import nn

# The reference trains every BatchNorm with these (its initialize_weights sets them on all BN layers).
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def make_activation(name: str) -> nn.Module:
    """``leaky_relu`` (yolov7-tiny, slope 0.1), ``silu`` (yolov7) or ``identity``."""
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    if name == "silu":
        # Not in place: SiLU's backward needs its input.
        return nn.SiLU()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r} (expected leaky_relu, silu or identity)")


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def same_padding(kernel: int) -> int:
    return kernel // 2


@torch.no_grad()
def fold_batch_norm(weight: torch.Tensor, bias: Optional[torch.Tensor],
                    bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one conv that equals conv followed by ``bn`` in eval mode.

    Computed in float64 so that folding adds no error beyond the final rounding to the layer's dtype.
    """
    dtype = weight.dtype
    assert bn.weight is not None and bn.bias is not None and bn.running_var is not None \
        and bn.running_mean is not None, "an affine BatchNorm with running statistics"
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    conv_bias = bias.double() if bias is not None else torch.zeros_like(scale)
    fused_weight = weight.double() * scale.view(-1, 1, 1, 1)
    fused_bias = (conv_bias - bn.running_mean.double()) * scale + bn.bias.double()
    return fused_weight.to(dtype), fused_bias.to(dtype)


def _conv_with_bias(template: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    # Made on the meta device and given the folded tensors: no wasted random init.
    conv = nn.Conv2d(template.in_channels, template.out_channels, template.kernel_size,  # type: ignore[arg-type]
                     template.stride, template.padding,  # type: ignore[arg-type]  # a Conv2d's own: tuple[int, ...]
                     groups=template.groups, bias=True, device="meta")
    requires_grad = template.weight.requires_grad
    conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    return conv


class ConvBnAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> activation; after ``fuse()`` a single biased conv -> activation."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, activation: str = "silu"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, same_padding(kernel), bias=False)
        self.bn: Optional[nn.BatchNorm2d] = batch_norm(c_out)
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    def fuse(self) -> None:
        if self.bn is None:
            return
        weight, bias = fold_batch_norm(self.conv.weight, self.conv.bias, self.bn)
        self.conv = _conv_with_bias(self.conv, weight, bias)
        self.bn = None


class MaxPoolDown(nn.Module):
    """2x2 max-pool, stride 2 (the reference ``MP``)."""

    def __init__(self, kernel: int = 2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class MaxPoolSame(nn.Module):
    """k x k max-pool, stride 1, size-preserving (the reference ``SP``)."""

    def __init__(self, kernel: int = 3):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=kernel, stride=1, padding=same_padding(kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class Concat(nn.Module):
    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.dim)


class SPPCSPC(nn.Module):
    """Spatial pyramid pooling in a cross-stage-partial block (yolov7's layer 51).

    Path A: cv1 -> cv3 (3x3) -> cv4, then the map and its max-pools (5, 9, 13) concatenated -> cv5 -> cv6 (3x3).
    Path B: cv2. Output: cv7 on [A, B].
    """

    def __init__(self, c_in: int, c_out: int, activation: str = "silu", pools: Sequence[int] = (5, 9, 13)):
        super().__init__()
        hidden = c_out  # the reference's e=0.5 with its factor 2
        self.cv1 = ConvBnAct(c_in, hidden, 1, 1, activation)
        self.cv2 = ConvBnAct(c_in, hidden, 1, 1, activation)
        self.cv3 = ConvBnAct(hidden, hidden, 3, 1, activation)
        self.cv4 = ConvBnAct(hidden, hidden, 1, 1, activation)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in pools)
        self.cv5 = ConvBnAct((len(pools) + 1) * hidden, hidden, 1, 1, activation)
        self.cv6 = ConvBnAct(hidden, hidden, 3, 1, activation)
        self.cv7 = ConvBnAct(2 * hidden, c_out, 1, 1, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.cv4(self.cv3(self.cv1(x)))
        a = self.cv6(self.cv5(torch.cat([a] + [pool(a) for pool in self.m], 1)))
        return self.cv7(torch.cat((a, self.cv2(x)), 1))

    def fuse(self) -> None:
        for conv in (self.cv1, self.cv2, self.cv3, self.cv4, self.cv5, self.cv6, self.cv7):
            conv.fuse()


class RepConv(nn.Module):
    """RepVGG-style block: 3x3 conv+BN + 1x1 conv+BN (+ BN identity when shapes allow), summed, activated.

    ``fuse()`` re-parameterises the branches into one biased 3x3 conv, ``rbr_reparam`` (the reference's deploy
    form); ``reparameterised=True`` builds that form directly, for checkpoints saved after re-parameterisation.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, activation: str = "silu",
                 reparameterised: bool = False):
        super().__init__()
        if kernel != 3:
            raise ValueError("RepConv supports 3x3 kernels only")
        self.c_in, self.c_out, self.stride = c_in, c_out, stride
        self.act = make_activation(activation)
        self.rbr_identity: Optional[nn.BatchNorm2d] = None
        self.rbr_dense: Optional[nn.Sequential] = None
        self.rbr_1x1: Optional[nn.Sequential] = None
        self.rbr_reparam: Optional[nn.Conv2d] = None
        if reparameterised:
            self.rbr_reparam = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=True)
        else:
            if c_in == c_out and stride == 1:
                self.rbr_identity = batch_norm(c_in)
            self.rbr_dense = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), batch_norm(c_out))
            self.rbr_1x1 = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), batch_norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.act(self.rbr_reparam(x))
        dense, one = self.rbr_dense, self.rbr_1x1
        assert dense is not None and one is not None  # unfused: both branches exist
        y = dense(x) + one(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return self.act(y)

    @torch.no_grad()
    def fuse(self) -> None:
        if self.rbr_reparam is not None:
            return
        dense_conv, dense_bn = _conv_and_bn(self.rbr_dense)
        one_conv, one_bn = _conv_and_bn(self.rbr_1x1)
        dense_w, dense_b = fold_batch_norm(dense_conv.weight, None, dense_bn)
        one_w, one_b = fold_batch_norm(one_conv.weight, None, one_bn)
        weight = dense_w.double() + nn.functional.pad(one_w.double(), [1, 1, 1, 1])
        bias = dense_b.double() + one_b.double()
        if self.rbr_identity is not None:
            # The identity is a 3x3 kernel with 1 at the centre of each channel's own input.
            eye = torch.zeros_like(weight)
            idx = torch.arange(self.c_in, device=weight.device)
            eye[idx, idx, 1, 1] = 1.0
            id_w, id_b = fold_batch_norm(eye, None, self.rbr_identity)
            weight, bias = weight + id_w, bias + id_b
        template = dense_conv
        self.rbr_reparam = _conv_with_bias(template, weight.to(template.weight.dtype),
                                           bias.to(template.weight.dtype))
        self.rbr_dense = self.rbr_1x1 = self.rbr_identity = None


def _conv_and_bn(branch: Optional[nn.Sequential]) -> Tuple[nn.Conv2d, nn.BatchNorm2d]:
    """The conv and the BN of an unfused RepConv branch, ``nn.Sequential(conv, bn)``."""
    assert branch is not None, "an unfused RepConv has both conv branches"
    return cast(nn.Conv2d, branch[0]), cast(nn.BatchNorm2d, branch[1])


class ImplicitA(nn.Module):
    """Learned per-channel offset added to a feature map (IDetect, before the head conv)."""

    def __init__(self, channels: int, mean: float = 0.0, std: float = 0.02):
        super().__init__()
        self.implicit = nn.Parameter(torch.zeros(1, channels, 1, 1))
        if not self.implicit.is_meta:  # random init on meta would import torch's compiler stack
            nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit + x


class ImplicitM(nn.Module):
    """Learned per-channel scale multiplied into a feature map (IDetect, after the head conv)."""

    def __init__(self, channels: int, mean: float = 1.0, std: float = 0.02):
        super().__init__()
        self.implicit = nn.Parameter(torch.ones(1, channels, 1, 1))
        if not self.implicit.is_meta:
            nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit * x


class DetectHead(nn.Module):
    """The YOLO head: one 1x1 conv per level giving ``na * (5 + nc)`` channels.

    ``implicit=True`` is the reference IDetect (ImplicitA before and ImplicitM after each conv); ``fuse()``
    folds both into the conv, which makes it the Detect head arithmetically.

    Buffers as in the reference: ``anchors`` (nl, na, 2) in grid units (used by the loss) and ``anchor_grid``
    (nl, 1, na, 1, 1, 2) in input pixels (used by the decode). ``stride`` (nl,) is a non-persistent buffer:
    reference state_dicts do not carry it, it is set from the checkpoint or the graph.

    Training mode returns the raw maps, each (B, na, ny, nx, 5+nc) like the reference; eval mode returns the
    decoded (B, N, 5+nc) [cx, cy, w, h, obj, cls...] in input pixels, N ordered level, anchor, y, x.
    """

    # Buffers (register_buffer), declared for the type checker.
    anchors: torch.Tensor
    anchor_grid: torch.Tensor
    stride: torch.Tensor

    def __init__(self, nc: int, anchors_px: Sequence[Sequence[float]], strides: Sequence[float],
                 channels: Sequence[int], implicit: bool):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors_px)
        self.na = len(anchors_px[0]) // 2
        if len(strides) != self.nl or len(channels) != self.nl:
            raise ValueError("anchors, strides and input channels must have one entry per level")
        # Built from Python numbers (no tensor arithmetic): cheap also on the meta device.
        grid_units = [[float(a) / float(s) for a in row] for row, s in zip(anchors_px, strides)]
        self.register_buffer("anchors", torch.tensor(grid_units, dtype=torch.float32).view(self.nl, self.na, 2))
        self.register_buffer("anchor_grid", torch.tensor(anchors_px, dtype=torch.float32)
                             .view(self.nl, 1, self.na, 1, 1, 2))
        self.register_buffer("stride", torch.tensor([float(s) for s in strides]), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in channels)
        self.implicit = implicit
        if implicit:
            self.ia = nn.ModuleList(ImplicitA(c) for c in channels)
            self.im = nn.ModuleList(ImplicitM(self.na * self.no) for _ in channels)
        # Decode constants per input size, device and dtype (not state: rebuilt on demand).
        self._decode_cache: Dict[tuple, List[Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = {}

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda() change the buffers the cached constants were made from.
        self._decode_cache = {}
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold ImplicitA/ImplicitM into the convs: conv(x + a) * m == (W*m) x + (W a + b) * m."""
        if not self.implicit:
            return
        convs = cast(Iterable[nn.Conv2d], self.m)
        for conv, add, mul in zip(convs, cast(Iterable[ImplicitA], self.ia), cast(Iterable[ImplicitM], self.im)):
            assert conv.bias is not None  # the head's convs are biased
            w = conv.weight.double().flatten(1)                      # (out, in)
            b = conv.bias.double() + w @ add.implicit.double().flatten()
            scale = mul.implicit.double().flatten()
            conv.weight.copy_((w * scale[:, None]).view_as(conv.weight))
            conv.bias.copy_(b * scale)
        self.implicit = False
        del self.ia, self.im

    def _decode_constants(self, level: int, ny: int, nx: int, ref: torch.Tensor):
        key = (ny, nx, ref.device, ref.dtype)
        per_level = self._decode_cache.get(key)
        if per_level is None:
            per_level = [None] * self.nl
            self._decode_cache[key] = per_level
        constants = per_level[level]
        if constants is None:
            # xy = (2*sig - 0.5 + grid) * stride  ==  sig * (2*stride) + (grid - 0.5) * stride
            stride = self.stride[level].double()
            ys, xs = torch.meshgrid(torch.arange(ny, device=ref.device, dtype=torch.float64),
                                    torch.arange(nx, device=ref.device, dtype=torch.float64), indexing="ij")
            offset = (torch.stack((xs, ys), 0).view(1, 1, 2, ny * nx) - 0.5) * stride
            xy_scale = (2.0 * stride).to(ref.dtype)
            # wh = (2*sig)^2 * anchor  ==  sig^2 * (4*anchor)
            wh_scale = (4.0 * self.anchor_grid[level].double()).view(1, self.na, 2, 1)
            constants = (xy_scale, offset.to(ref.dtype), wh_scale.to(ref.dtype))
            per_level[level] = constants
        return constants

    def forward(self, xs: List[torch.Tensor]):
        outputs = []
        for level in range(self.nl):
            x = xs[level]
            if self.implicit:
                x = self.im[level](self.m[level](self.ia[level](x)))
            else:
                x = self.m[level](x)
            bs, _, ny, nx = x.shape
            if self.training:
                outputs.append(x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
                continue
            p = x.reshape(bs, self.na, self.no, ny * nx).sigmoid()
            xy_scale, offset, wh_scale = self._decode_constants(level, ny, nx, p)
            xy = p[:, :, 0:2] * xy_scale + offset
            wh = p[:, :, 2:4].square() * wh_scale
            y = torch.cat((xy, wh, p[:, :, 4:]), 2)                  # (B, na, no, ny*nx)
            outputs.append(y.transpose(2, 3).reshape(bs, self.na * ny * nx, self.no))
        if self.training:
            return outputs
        return torch.cat(outputs, 1)
