"""The ONNX Runtime backend: our ONNX export, run by ONNX Runtime behind the YOLOv7 module interface.

It must compute what the torch module computes (same tolerance as the reference parity tests) at any batch size and
stride-aligned H/W, reuse its cached export, and fall back to torch whenever it cannot be used.
"""

from __future__ import annotations

import copy
import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from yolo_backend.hashing import file_sha256
from yolo_backend.yolov7 import graphs, load_model
from yolo_backend.yolov7 import ort_runtime
from yolo_backend.yolov7.checkpoint import describe, load_checkpoint, model_from_checkpoint
from yolo_backend.yolov7.export import ExportError, export_onnx
from yolo_backend.yolov7.model import YOLOv7, build_model
from yolo_backend.yolov7.ort_runtime import OrtYOLOv7

CHECKPOINTS = ["yolov7-tiny_fire-smoke_train", "yolov7-tiny_fire-smoke_last", "yolov7-tiny_coco_deploy",
               "yolov7-tiny_fire-smoke_ref-trained", "yolov7_fire-smoke_train"]
TINY = "yolov7-tiny_fire-smoke_ref-trained"

BOX_ATOL = 1e-3   # pixels, as tests/test_model_parity.py
PROB_ATOL = 1e-5

pytestmark = [pytest.mark.skipif(not ort_runtime.onnxruntime_available(), reason="onnxruntime is not installed"),
              pytest.mark.usefixtures("torch_one_thread")]


def _max_diffs(a, b):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff[..., :4].max()), float(diff[..., 4:].max())


def _assert_close(a, b):
    box_diff, prob_diff = _max_diffs(a, b)
    assert box_diff < BOX_ATOL, f"boxes differ by {box_diff:.2e} px"
    assert prob_diff < PROB_ATOL, f"probabilities differ by {prob_diff:.2e}"


# ---- parity with torch and the reference --------------------------------------------------------------------

@pytest.mark.parametrize("name", CHECKPOINTS)
def test_onnxruntime_matches_torch(ckpt_dir, ref_input, name, onnx_cache_dir):
    path = ckpt_dir / f"{name}.pt"
    ours = load_model(path, backend="onnxruntime", cache_dir=onnx_cache_dir)
    torch_model = load_model(path, backend="torch")
    assert isinstance(ours, OrtYOLOv7) and isinstance(ours, torch.nn.Module)
    assert isinstance(torch_model, YOLOv7)

    with torch.inference_mode():
        out = ours(ref_input)
        out_torch = torch_model(ref_input)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (1, 3 * (40 * 52 + 20 * 26 + 10 * 13), 5 + torch_model.nc)
    _assert_close(out.numpy(), out_torch.numpy())

    # Another batch size and another stride-aligned, non-square size: the export has dynamic axes.
    x = torch.rand(3, 3, 256, 352, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out, out_torch = ours(x), torch_model(x)
    assert out.shape == out_torch.shape == (3, 3 * (32 * 44 + 16 * 22 + 8 * 11), 5 + torch_model.nc)
    _assert_close(out.numpy(), out_torch.numpy())


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_onnxruntime_matches_the_reference_output(ckpt_dir, reference_outputs, ref_input, name, onnx_cache_dir):
    ours = load_model(ckpt_dir / f"{name}.pt", backend="onnxruntime", cache_dir=onnx_cache_dir)
    ref = np.load(reference_outputs / f"{name}.ref_out.npy")
    with torch.inference_mode():
        out = ours(ref_input)
    assert tuple(out.shape) == ref.shape
    _assert_close(out.numpy(), ref)


def test_same_attributes_as_the_torch_module(ckpt_dir, onnx_cache_dir):
    path = ckpt_dir / f"{TINY}.pt"
    ours = load_model(path, backend="onnxruntime", cache_dir=onnx_cache_dir)
    reference = load_model(path, backend="torch")
    assert not ours.training
    for attr in ("names", "nc", "graph_name", "head_type", "graph", "fused"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert torch.equal(ours.stride, reference.stride) and ours.stride.tolist() == [8.0, 16.0, 32.0]
    assert torch.equal(ours.anchors_px, reference.anchors_px)
    assert describe(ours) == describe(reference)
    with pytest.raises(RuntimeError, match="inference-only"):
        ours.train()


def test_channels_last_input_copies_and_pickling(ckpt_dir, ref_input, onnx_cache_dir):
    ours = load_model(ckpt_dir / f"{TINY}.pt", backend="onnxruntime", cache_dir=onnx_cache_dir)
    with torch.inference_mode():
        plain = ours(ref_input)
        channels_last = ours(ref_input.contiguous(memory_format=torch.channels_last))
        for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            assert torch.equal(clone(ref_input), plain)
    assert torch.equal(plain, channels_last)


def test_bad_input_shapes_are_refused_clearly(ckpt_dir, onnx_cache_dir):
    ours = load_model(ckpt_dir / f"{TINY}.pt", backend="onnxruntime", cache_dir=onnx_cache_dir)
    with pytest.raises(ValueError, match="multiples of 32"):
        ours(torch.rand(1, 3, 100, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ours(torch.rand(3, 64, 64))


def test_detector_pipeline_on_onnxruntime_matches_torch(ckpt_dir, onnx_cache_dir):
    from yolo_backend.yolov7.detect import Detector
    from yolo_backend.yolov7.preprocess import read_image

    photos = sorted((ckpt_dir.parent / "fire-smoke/images/valid").glob("*.jpg"))[:3]
    assert photos, f"no validation photos in {ckpt_dir.parent}"
    images = [read_image(p) for p in photos]
    path = ckpt_dir / f"{TINY}.pt"
    results = [Detector(load_model(path, backend=backend, cache_dir=onnx_cache_dir), img_size=320, conf=0.1)
               .detect(images) for backend in ("onnxruntime", "torch")]
    for ours, theirs in zip(*results):
        assert np.array_equal(ours.labels, theirs.labels)
        np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=1e-2)
        np.testing.assert_allclose(ours.scores, theirs.scores, atol=1e-5)


def test_image_embeddings_come_from_the_same_pass_on_both_backends(ckpt_dir, onnx_cache_dir):
    """detect(embed=True): one embedding per image, in input order across shape groups, equal to the neck's maps
    averaged (one image at a time), the same detections as without it, and the same on ONNX Runtime as on torch."""
    from yolo_backend.yolov7.detect import Detector
    from yolo_backend.yolov7.model import neck_embedding
    from yolo_backend.yolov7.preprocess import read_image

    photos = sorted((ckpt_dir.parent / "fire-smoke/images/valid").glob("*.jpg"))[:2]
    assert photos, f"no validation photos in {ckpt_dir.parent}"
    first, second = (read_image(p) for p in photos)
    images = [first, second[:400], second, first[:, :500]]  # two shapes, interleaved: batches regroup them
    path = ckpt_dir / f"{TINY}.pt"
    torch_model = load_model(path, backend="torch")
    found = {}
    for backend in ("torch", "onnxruntime"):
        detector = Detector(load_model(path, backend=backend, cache_dir=onnx_cache_dir), img_size=320, conf=0.1)
        found[backend] = detector.detect(images, embed=True)
        plain = detector.detect(images)
        for with_embedding, without in zip(found[backend], plain):
            np.testing.assert_array_equal(with_embedding.boxes, without.boxes)
            channels = sum(torch_model.head.m[i].in_channels for i in range(3))
            assert without.embedding is None and with_embedding.embedding.shape == (channels,)
        assert found[backend][0].above(0.5).embedding is found[backend][0].embedding
    single = Detector(torch_model, img_size=320, conf=0.1)
    for image, detections in zip(images, found["torch"]):
        x = single._tensor(single.letterbox(image).image[None])
        with torch.inference_mode():
            expected = neck_embedding(torch_model.head_inputs(x))[0].numpy()
        np.testing.assert_allclose(detections.embedding, expected, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(found["onnxruntime"], found["torch"]):
        np.testing.assert_allclose(ours.embedding, theirs.embedding, atol=1e-4 * float(np.abs(theirs.embedding).max()))
    assert not np.allclose(found["torch"][0].embedding, found["torch"][1].embedding)  # different images differ


# ---- which backend load_model picks ------------------------------------------------------------------------

def test_auto_is_onnxruntime_on_cpu_and_the_setting_chooses(ckpt_dir, monkeypatch):
    path = ckpt_dir / f"{TINY}.pt"
    monkeypatch.delenv("INFERENCE_BACKEND", raising=False)
    assert isinstance(load_model(path), OrtYOLOv7)             # default: auto -> ONNX Runtime on the CPU
    monkeypatch.setenv("INFERENCE_BACKEND", "torch")
    model = load_model(path)
    assert isinstance(model, YOLOv7)
    assert model.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(load_model(path, backend="auto"), OrtYOLOv7)  # the argument wins over the setting
    monkeypatch.setenv("INFERENCE_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="'tensorrt' is unknown; use one of auto, torch"):
        load_model(path)


def test_the_detector_and_the_settings_know_the_same_backends():
    # yolov7 must not import the app's settings, so the list lives in both until settings imports yolov7's.
    from yolo_backend.settings import INFERENCE_BACKENDS
    from yolo_backend.yolov7.inference_backends import BACKENDS

    assert tuple(INFERENCE_BACKENDS) == BACKENDS


def test_training_form_and_cuda_stay_torch(ckpt_dir, monkeypatch, caplog):
    path = ckpt_dir / f"{TINY}.pt"
    with caplog.at_level(logging.WARNING):
        unfused = load_model(path, fuse=False, backend="onnxruntime")
    assert isinstance(unfused, YOLOv7) and not unfused.fused
    assert "not fused" in caplog.text
    # A model on CUDA (faked: with_backend asks model_device) is never handed to ONNX Runtime.
    fused = model_from_checkpoint(load_checkpoint(path))
    monkeypatch.setattr(ort_runtime, "model_device", lambda model: torch.device("cuda", 0))
    assert ort_runtime.with_backend(fused, path, "auto") is fused


# ---- export cache ------------------------------------------------------------------------------------------

def test_export_is_cached_by_checkpoint_hash_and_reused(ckpt_dir, tmp_path, monkeypatch, ref_input):
    cache = tmp_path / "cache"
    calls = []
    real_export = ort_runtime.export_onnx

    def counting_export(*args, **kwargs):
        calls.append(args[1])
        return real_export(*args, **kwargs)

    monkeypatch.setattr(ort_runtime, "export_onnx", counting_export)
    path = ckpt_dir / f"{TINY}.pt"
    first = load_model(path, backend="auto", cache_dir=cache)
    second = load_model(path, backend="auto", cache_dir=cache)
    assert len(calls) == 1, "the second load must reuse the cached export"
    assert first.onnx_path == second.onnx_path == str(calls[0])
    sha = file_sha256(path)
    assert [p.name for p in cache.iterdir()] == [Path(first.onnx_path).name]
    assert sha[:20] in Path(first.onnx_path).name and "opset17" in first.onnx_path

    # The same weights under another file name share the export; a damaged cache file is exported again.
    copy_path = tmp_path / "renamed.pt"
    copy_path.write_bytes(path.read_bytes())
    assert load_model(copy_path, cache_dir=cache).onnx_path == first.onnx_path and len(calls) == 1
    Path(first.onnx_path).write_bytes(b"not an onnx file")
    repaired = load_model(path, cache_dir=cache)
    assert len(calls) == 2 and isinstance(repaired, OrtYOLOv7)
    with torch.inference_mode():
        assert torch.equal(repaired(ref_input), first(ref_input))


def test_cache_keeps_the_most_recently_used_exports(ckpt_dir, tmp_path, monkeypatch):
    import os

    cache = tmp_path / "cache"
    cache.mkdir()
    old = []
    for k in range(4):  # exports of versions long gone, oldest first
        path = cache / f"yolov7-tiny-old{k}-export1-opset17.onnx"
        path.write_bytes(b"x")
        os.utime(path, (1000 + k, 1000 + k))
        old.append(path)
    other = cache / "notes.txt"
    other.write_text("not ours")
    monkeypatch.setattr(ort_runtime, "CACHE_KEEP", 3)
    model = load_model(ckpt_dir / f"{TINY}.pt", backend="onnxruntime", cache_dir=cache)
    kept = sorted(p.name for p in cache.iterdir())
    # The new export plus the two most recently used old ones; files that are not exports are left alone.
    assert kept == sorted([Path(model.onnx_path).name, old[3].name, old[2].name, "notes.txt"])

    # A cache hit counts as a use: the reused export outlives newer, unused ones.
    os.utime(model.onnx_path, (500, 500))
    load_model(ckpt_dir / f"{TINY}.pt", backend="onnxruntime", cache_dir=cache)
    assert sorted(ort_runtime.prune_cache(cache, keep=1)) == sorted([old[3], old[2]])
    assert [p.name for p in cache.glob("*.onnx")] == [Path(model.onnx_path).name]


def test_the_environment_setting_names_the_cache_folder(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model(ckpt_dir / f"{TINY}.pt", backend="onnxruntime")
    assert Path(model.onnx_path).parent == tmp_path / "cache"


# ---- fallback to torch -------------------------------------------------------------------------------------

def test_falls_back_to_torch_when_onnxruntime_cannot_be_imported(ckpt_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # makes `import onnxruntime` raise ImportError
    path = ckpt_dir / f"{TINY}.pt"
    assert isinstance(load_model(path, backend="auto", cache_dir=tmp_path), YOLOv7)
    with caplog.at_level(logging.WARNING):
        model = load_model(path, backend="onnxruntime", cache_dir=tmp_path)
    assert isinstance(model, YOLOv7) and model.fused
    assert "onnxruntime cannot be imported; using torch" in caplog.text
    assert not any(tmp_path.iterdir())


def test_falls_back_to_torch_when_export_fails(ckpt_dir, tmp_path, monkeypatch, caplog, ref_input):
    def broken_export(model, path, opset=17, **kwargs):
        raise ExportError("ONNX export of yolov7-tiny failed: simulated")

    monkeypatch.setattr(ort_runtime, "export_onnx", broken_export)
    with caplog.at_level(logging.WARNING):
        model = load_model(ckpt_dir / f"{TINY}.pt", cache_dir=tmp_path)
    assert isinstance(model, YOLOv7)
    assert "ONNX Runtime backend unavailable" in caplog.text and "simulated" in caplog.text
    with torch.inference_mode():
        _assert_close(model(ref_input).numpy(), load_model(ckpt_dir / f"{TINY}.pt", backend="torch")(ref_input).numpy())


def test_an_export_that_computes_something_else_is_not_used(ckpt_dir, tmp_path, monkeypatch, caplog):
    real_export = ort_runtime.export_onnx

    def wrong_export(model, path, opset=17, **kwargs):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.head.m[0].bias.add_(1.0)       # a different model: the check after export must notice
        return real_export(other, path, opset, **kwargs)

    monkeypatch.setattr(ort_runtime, "export_onnx", wrong_export)
    with caplog.at_level(logging.WARNING):
        model = load_model(ckpt_dir / f"{TINY}.pt", cache_dir=tmp_path)
    assert isinstance(model, YOLOv7)
    assert "differs from the torch model" in caplog.text
    assert not any(tmp_path.iterdir()), "a wrong export must not stay in the cache"


# ---- export_onnx as a reusable function (trained models) -------------------------------------------------

def test_export_of_an_unfused_random_model_with_raw_outputs(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model(graphs.get_graph("yolov7-tiny", head="IDetect"), nc=3, names=["a", "b", "c"]).eval()
    target = export_onnx(model, tmp_path / "sub" / "model.onnx", decode=False, img_size=(64, 96))
    meta = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert meta["names"] == '["a", "b", "c"]' and meta["nc"] == "3" and meta["decoded"] == "false"
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 128, 160)
    maps = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = [m(f) for m, f in zip(model.head.m, [ia(f) for ia, f in zip(model.head.ia,
                                                                                 model.head_inputs(x))])]
        expected = [im(e) for im, e in zip(model.head.im, expected)]
    assert [m.shape for m in maps] == [tuple(e.shape) for e in expected] == \
        [(2, 24, 16, 20), (2, 24, 8, 10), (2, 24, 4, 5)]
    for got, want in zip(maps, expected):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
    assert model.training is False and not model.fused


def test_export_refuses_sizes_off_the_stride(tmp_path):
    model = build_model(graphs.get_graph("yolov7-tiny"), nc=1).eval()
    with pytest.raises(ExportError, match="multiple of the model stride 32"):
        export_onnx(model, tmp_path / "m.onnx", img_size=(100, 128))
    assert not any(tmp_path.iterdir())
