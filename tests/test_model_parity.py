"""Our YOLOv7 graphs against the reference implementation's own outputs on the shared checkpoints.

``<name>.ref_out.npy`` is the reference's fused fp32 output for ``ref_input_1x3x320x416.npy``; ours must match
it to float32 rounding (fusing reorders the arithmetic): boxes within 1e-3 px, probabilities within 1e-5.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from yolo_backend.yolov7 import graphs, load_model
from yolo_backend.yolov7.checkpoint import describe, identify_graph, load_checkpoint, model_from_checkpoint
from yolo_backend.yolov7.layers import RepConv
from yolo_backend.yolov7.model import build_model


BOX_ATOL = 1e-3   # pixels
PROB_ATOL = 1e-5

# name -> (graph, head type, nc, names)
REFERENCE_FILES = {
    "yolov7-tiny_fire-smoke_train": ("yolov7-tiny", "IDetect", 2, ["fire", "smoke"]),
    "yolov7-tiny_fire-smoke_last": ("yolov7-tiny", "IDetect", 2, ["fire", "smoke"]),
    "yolov7-tiny_coco_deploy": ("yolov7-tiny", "Detect", 80, [f"class{i}" for i in range(80)]),
    "yolov7-tiny_fire-smoke_ref-trained": ("yolov7-tiny", "IDetect", 2, ["fire", "smoke"]),
    "yolov7_fire-smoke_train": ("yolov7", "IDetect", 2, ["fire", "smoke"]),
}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _max_diffs(ours: np.ndarray, ref: np.ndarray):
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    return float(diff[..., :4].max()), float(diff[..., 4:].max())


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("name", list(REFERENCE_FILES))
def test_load_model_matches_reference_output(ckpt_dir, reference_outputs, ref_input, name, backend):
    """What load_model returns by default (ONNX Runtime on the CPU when installed), and the torch module."""
    graph_name, head, nc, names = REFERENCE_FILES[name]
    if backend == "default":
        model = load_model(ckpt_dir / f"{name}.pt", device="cpu")
    else:
        model = load_model(ckpt_dir / f"{name}.pt", device="cpu", backend=backend)
        assert type(model).__name__ == "YOLOv7"
        # Inference only: called outside no_grad it keeps no autograd graph.
        assert not any(p.requires_grad for p in model.parameters())
        assert not model(ref_input).requires_grad
    assert not model.training
    assert (model.graph_name, model.head_type, model.nc, model.names) == (graph_name, head, nc, names)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]

    ref = np.load(ckpt_dir / f"{name}.ref_out.npy")
    with torch.inference_mode():
        out = model(ref_input)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == ref.shape == (1, 8190, 5 + nc)
    box_diff, prob_diff = _max_diffs(out.numpy(), ref)
    print(f"{name}: max |diff| boxes {box_diff:.2e} px, probabilities {prob_diff:.2e}")
    assert box_diff < BOX_ATOL
    assert prob_diff < PROB_ATOL


@pytest.mark.parametrize("name", ["yolov7-tiny_fire-smoke_ref-trained", "yolov7-tiny_coco_deploy",
                                  "yolov7_fire-smoke_train"])
def test_fused_and_unfused_agree(ckpt_dir, ref_input, name):
    ckpt = load_checkpoint(ckpt_dir / f"{name}.pt")
    unfused = model_from_checkpoint(ckpt, fuse=False)
    fused = model_from_checkpoint(ckpt, fuse=True)
    assert fused.fused and not unfused.fused
    # Fusing really removed BN, RepConv branches and implicit layers.
    keys = set(fused.state_dict())
    assert not any(".bn." in k or "rbr_dense" in k or ".ia." in k or ".im." in k for k in keys)
    with torch.inference_mode():
        a, b = unfused(ref_input).numpy(), fused(ref_input).numpy()
    box_diff, prob_diff = _max_diffs(a, b)
    assert box_diff < BOX_ATOL and prob_diff < PROB_ATOL


def test_reference_state_dict_loads_strict_with_reference_names(ckpt_dir):
    tiny = load_checkpoint(ckpt_dir / "yolov7-tiny_fire-smoke_train.pt")
    model = build_model(graphs.get_graph("yolov7-tiny", head="IDetect"), nc=2)
    model.load_state_dict(tiny.state_dict, strict=True)
    for key in ("model.0.conv.weight", "model.0.bn.running_var", "model.77.m.0.weight",
                "model.77.ia.0.implicit", "model.77.im.2.implicit", "model.77.anchor_grid"):
        assert key in tiny.state_dict and key in model.state_dict()

    deploy = load_checkpoint(ckpt_dir / "yolov7-tiny_coco_deploy.pt")
    model = build_model(graphs.get_graph("yolov7-tiny", head="Detect"), nc=80)
    model.load_state_dict(deploy.state_dict, strict=True)
    assert "model.77.ia.0.implicit" not in deploy.state_dict

    big = load_checkpoint(ckpt_dir / "yolov7_fire-smoke_train.pt")
    model = build_model(graphs.get_graph("yolov7", head="IDetect"), nc=2)
    model.load_state_dict(big.state_dict, strict=True)
    for key in ("model.51.cv7.conv.weight", "model.102.rbr_dense.0.weight", "model.104.rbr_1x1.1.bias",
                "model.105.m.2.weight", "model.105.ia.2.implicit"):
        assert key in big.state_dict


def test_anchors_and_strides_come_from_the_checkpoint(ckpt_dir):
    tiny = load_model(ckpt_dir / "yolov7-tiny_fire-smoke_train.pt")
    big = load_model(ckpt_dir / "yolov7_fire-smoke_train.pt")
    assert describe(tiny)["anchors"][0] == [[10, 13], [16, 30], [33, 23]]
    assert describe(big)["anchors"][2] == [[142, 110], [192, 243], [459, 401]]
    info = describe(big)
    assert info["graph"] == "yolov7" and info["head"] == "IDetect" and info["activation"] == "silu"
    assert info["strides"] == [8.0, 16.0, 32.0] and info["parameters"] > 30_000_000


def test_training_forward_returns_raw_level_maps(ckpt_dir, ref_input):
    model = model_from_checkpoint(load_checkpoint(ckpt_dir / "yolov7-tiny_fire-smoke_train.pt"), fuse=False)
    model.train()
    with torch.no_grad():
        maps = model(ref_input)
    assert [tuple(m.shape) for m in maps] == [(1, 3, 40, 52, 7), (1, 3, 20, 26, 7), (1, 3, 10, 13, 7)]


def test_channels_last_batches_and_other_sizes(ckpt_dir, ref_input):
    model = load_model(ckpt_dir / "yolov7-tiny_fire-smoke_ref-trained.pt")
    batch = torch.cat([ref_input, ref_input.flip(-1)], 0)
    with torch.inference_mode():
        single = model(ref_input).numpy()   # (against the reference's output: test_load_model_matches_reference_output)
        plain = model(batch)
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl(batch.contiguous(memory_format=torch.channels_last))
        square = model(torch.rand(1, 3, 256, 256))   # another size: grids rebuilt, cached per size
    assert _max_diffs(plain[:1].numpy(), single)[0] < BOX_ATOL
    box_diff, prob_diff = _max_diffs(plain.numpy(), cl.numpy())
    assert box_diff < BOX_ATOL and prob_diff < PROB_ATOL
    assert tuple(square.shape) == (1, 3 * (32 * 32 + 16 * 16 + 8 * 8), 7)


def test_reparameterised_repconv_checkpoint_is_identified(ckpt_dir, ref_input):
    """A yolov7 state_dict saved after RepConv re-parameterisation (rbr_reparam) is a known form."""
    ckpt = load_checkpoint(ckpt_dir / "yolov7_fire-smoke_train.pt")
    model = model_from_checkpoint(ckpt, fuse=False)
    with torch.inference_mode():
        before = model(ref_input).numpy()   # (the reference's own output: test_load_model_matches_reference_output)
    for module in model.modules():
        if isinstance(module, RepConv):
            module.fuse()
    state = model.state_dict()
    assert "model.102.rbr_reparam.weight" in state and "model.102.rbr_dense.0.weight" not in state
    graph, nc = identify_graph(state)
    assert (graph["name"], graph["head"], graph["repconv"], nc) == ("yolov7", "IDetect", "reparameterised", 2)
    rebuilt = build_model(graph, nc)
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.eval()
    with torch.inference_mode():
        box_diff, prob_diff = _max_diffs(rebuilt(ref_input).numpy(), before)
    assert box_diff < BOX_ATOL and prob_diff < PROB_ATOL


# ---- graph and layer checks that need no shared data ------------------------------------------------------

def test_graphs_have_reference_numbering_and_strides():
    tiny, big = graphs.get_graph("yolov7-tiny"), graphs.get_graph("yolov7")
    assert len(tiny["layers"]) == 78 and graphs.head_index(tiny) == 77
    assert len(big["layers"]) == 106 and graphs.head_index(big) == 105
    assert graphs.resolve_inputs(tiny)[77] == [74, 75, 76]
    assert graphs.resolve_inputs(big)[105] == [102, 103, 104]
    assert graphs.resolve_inputs(big)[80] == [79, 77, 63]
    assert graphs.head_strides(tiny) == graphs.head_strides(big) == [8, 16, 32]
    with pytest.raises(ValueError, match="unknown graph"):
        graphs.get_graph("yolov7-w6")


def test_random_model_fuse_matches_unfused():
    torch.manual_seed(0)
    model = build_model(graphs.get_graph("yolov7-tiny", head="IDetect"), nc=3)
    # Non-trivial BN statistics and implicit values, so that fusing has something to fold.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(2, 3, 128, 160)
    with torch.inference_mode():
        before = model(x)
        after = model.fuse()(x)
    assert tuple(before.shape) == (2, 3 * (16 * 20 + 8 * 10 + 4 * 5), 8)
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-4)


def test_repconv_with_identity_branch_fuses_exactly():
    torch.manual_seed(0)
    block = RepConv(16, 16, activation="silu")
    assert block.rbr_identity is not None
    for bn in (block.rbr_dense[1], block.rbr_1x1[1], block.rbr_identity):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    block.eval()
    x = torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        before = block(x)
        block.fuse()
        after = block(x)
    assert block.rbr_reparam is not None and block.rbr_dense is None
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)
