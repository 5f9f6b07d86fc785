"""Safe checkpoint loading: the allow-list, every refusal with its message, and our own format."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch

from yolo_backend.yolov7 import CheckpointError, graphs, load_model
from yolo_backend.yolov7.checkpoint import (FORMAT, checkpoint_from_object, describe, load_checkpoint,
                                            model_from_checkpoint, save_checkpoint)
from yolo_backend.yolov7.safe_pickle import ALLOWED_GLOBALS, PickledRecord, safe_unpickling
from yolo_backend.yolov7.model import build_model



pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _refusal(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message   # names the file first
    assert "\n" not in message
    return message


# ---- the allow-list against what real files use ---------------------------------------------------------

def _pickle_globals(data: bytes) -> set:
    """Every GLOBAL / STACK_GLOBAL a pickle names, as torch's unpickler sees it (py2 names mapped)."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
        elif op.name == "STACK_GLOBAL":
            module, name = strings[-2], strings[-1]
        else:
            continue
        names.add(f"{module}.{name}")
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        module = IMPORT_MAPPING.get(module, module)
        names.add(f"{module}.{name}")
    return names


def test_allow_list_covers_every_global_of_the_official_release_pickle(ckpt_dir, reference_outputs):
    data = (ckpt_dir / "official_yolov7-tiny_release.data.pkl").read_bytes()
    used = _pickle_globals(data)
    assert {"__builtin__.set", "torch.HalfStorage", "torch._utils._rebuild_parameter",
            "models.yolo.Detect", "collections.OrderedDict"} <= used
    assert used <= ALLOWED_GLOBALS, sorted(used - ALLOWED_GLOBALS)


def test_official_release_structure_unpickles_and_builds(ckpt_dir, reference_outputs):
    """The real release's data.pkl (no tensor data) through the same safe unpickler, storages faked."""
    from torch._weights_only_unpickler import Unpickler

    def fake_storage(pid):
        _kind, storage_type, _key, _location, numel = pid
        nbytes = numel * torch._utils._element_size(storage_type.dtype)
        return torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(nbytes).fill_(0),
                                          dtype=storage_type.dtype, _internal=True)

    data = (ckpt_dir / "official_yolov7-tiny_release.data.pkl").read_bytes()
    with safe_unpickling():
        unpickler = Unpickler(io.BytesIO(data))
        unpickler.persistent_load = fake_storage
        obj = unpickler.load()
    assert obj["model"].pickled_name == "models.yolo.Model"
    # The stride tensors' data live outside data.pkl: give them the release's values.
    for record in _records(obj["model"]):
        if isinstance(record.state.get("stride"), torch.Tensor):
            record.state["stride"] = torch.tensor([8.0, 16.0, 32.0])
    ckpt = checkpoint_from_object(obj, "official_yolov7-tiny_release")
    assert (ckpt.graph_name, ckpt.head_type, ckpt.nc) == ("yolov7-tiny", "Detect", 80)
    assert ckpt.names[:3] == ["person", "bicycle", "car"]
    assert ckpt.state_dict["model.0.conv.weight"].dtype == torch.float32   # fp16 in the file
    model_from_checkpoint(ckpt, fuse=False)   # strict load


def _records(record):
    yield record
    for child in (record.state.get("_modules") or {}).values():
        if isinstance(child, PickledRecord):
            yield from _records(child)


def test_each_shared_file_needs_only_allowed_globals(ckpt_dir):
    for path in sorted(ckpt_dir.glob("*.pt")):
        if path.name.startswith("truncated"):
            continue
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        assert needed <= ALLOWED_GLOBALS, (path.name, sorted(needed - ALLOWED_GLOBALS))


# ---- what load_checkpoint reads -------------------------------------------------------------------------

def test_prefers_ema_and_converts_fp16(ckpt_dir):
    last = load_checkpoint(ckpt_dir / "yolov7-tiny_fire-smoke_last.pt")
    assert last.weights == "ema" and last.source == "reference"
    assert last.metadata["epoch"] == 3
    assert all(v.dtype in (torch.float32, torch.int64) for v in last.state_dict.values())
    stripped = load_checkpoint(ckpt_dir / "yolov7-tiny_fire-smoke_ref-trained.pt")
    assert stripped.weights == "model"   # strip_optimizer leaves ema None


def test_ema_is_what_gets_loaded(ckpt_dir):
    """With both present, the weights come from `ema` (what the reference loader uses)."""
    with safe_unpickling():
        raw = torch.load(ckpt_dir / "yolov7-tiny_fire-smoke_last.pt", map_location="cpu", weights_only=True)
    assert raw["ema"] is not raw["model"]
    first_conv = raw["ema"].state["_modules"]["model"].state["_modules"]["0"].state["_modules"]["conv"]
    first_conv.state["_parameters"]["weight"] = torch.full((32, 3, 3, 3), 0.5, dtype=torch.float16)
    assert torch.all(checkpoint_from_object(raw).state_dict["model.0.conv.weight"] == 0.5)
    raw["ema"] = None
    assert not torch.all(checkpoint_from_object(raw).state_dict["model.0.conv.weight"] == 0.5)


# ---- refusals -------------------------------------------------------------------------------------------

def test_truncated_file_is_refused(ckpt_dir):
    message = _refusal(ckpt_dir / "truncated_yolov7-tiny.pt")
    assert "is damaged" in message and "truncated or corrupt" in message


def test_missing_empty_directory_and_random_files_are_refused(tmp_path):
    assert "not found" in _refusal(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in _refusal(tmp_path / "empty.pt")
    assert "directory" in _refusal(tmp_path)
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not a PyTorch checkpoint" in _refusal(tmp_path / "random.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage that is no pickle")
    assert "corrupt or not a PyTorch checkpoint" in _refusal(tmp_path / "garbage.pt")


def test_files_that_are_not_yolov7_checkpoints_are_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "single tensor" in _refusal(tmp_path / "tensor.pt")
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "dict.pt")
    assert "without a 'model' or 'ema'" in _refusal(tmp_path / "dict.pt")
    torch.save({"model": torch.nn.Conv2d(3, 3, 1)}, tmp_path / "conv.pt")
    assert "expected models.yolo.Model" in _refusal(tmp_path / "conv.pt")
    torch.save({"model": "hello"}, tmp_path / "str.pt")
    assert "is a str" in _refusal(tmp_path / "str.pt")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_naming_another_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"model": _RunsCode(marker)}, tmp_path / "evil.pt")            # torch zip format
    with open(tmp_path / "evil_legacy.pt", "wb") as handle:                    # bare pickle
        pickle.dump({"model": _RunsCode(marker)}, handle, protocol=2)
    for name in ("evil.pt", "evil_legacy.pt"):
        message = _refusal(tmp_path / name)
        assert "refused" in message and "system" in message
    assert not marker.exists()


def test_state_dict_fitting_no_graph_is_refused(ckpt_dir, tmp_path):
    state = dict(load_checkpoint(ckpt_dir / "yolov7-tiny_fire-smoke_train.pt").state_dict)
    del state["model.10.conv.weight"]
    state["model.10.extra.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "odd.pt")
    message = _refusal(tmp_path / "odd.pt")
    assert "fit no known YOLOv7 graph" in message and "Closest: yolov7-tiny" in message
    assert "model.10.conv.weight" in message

    torch.save({"model": {"layer.weight": torch.zeros(2, 2)}}, tmp_path / "nohead.pt")
    assert "no detection head" in _refusal(tmp_path / "nohead.pt")


# ---- our own format -------------------------------------------------------------------------------------

def test_our_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(graphs.get_graph("yolov7-tiny", head="IDetect"), nc=2, names=["fire", "smoke"])
    model.eval()
    target = tmp_path / "models" / "v1.pt"
    save_checkpoint(target, model, metadata={"name": "v1", "metrics": {"map50": 0.5}, "parent": None})
    assert sorted(os.listdir(target.parent)) == ["v1.pt"]   # no temp file left behind

    raw = torch.load(target, map_location="cpu", weights_only=True)   # plain data: no allow-list needed
    assert raw["format"] == FORMAT and raw["format_version"] == 1 and raw["names"] == ["fire", "smoke"]
    assert raw["graph"]["name"] == "yolov7-tiny" and raw["version"]["name"] == "v1"

    ckpt = load_checkpoint(target)
    assert ckpt.source == "yolo-backend" and ckpt.metadata["metrics"] == {"map50": 0.5}
    loaded = load_model(target)
    assert loaded.names == ["fire", "smoke"] and loaded.graph_name == "yolov7-tiny"
    x = torch.rand(1, 3, 96, 128)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x), atol=1e-4, rtol=1e-5)
    assert describe(loaded)["head"] == "IDetect"


def test_save_checkpoint_rejects_what_would_not_reload(tmp_path):
    model = build_model(graphs.get_graph("yolov7-tiny", head="Detect"), nc=1)
    with pytest.raises(ValueError, match="plain"):
        save_checkpoint(tmp_path / "a.pt", model, metadata={"when": object()})
    with pytest.raises(ValueError, match="names"):
        save_checkpoint(tmp_path / "a.pt", model, names=["a", "b"])
    model.eval().fuse()
    with pytest.raises(ValueError, match="unfused"):
        save_checkpoint(tmp_path / "a.pt", model)
    assert not any(tmp_path.iterdir())


def test_newer_format_version_is_refused(tmp_path):
    model = build_model(graphs.get_graph("yolov7-tiny", head="Detect"), nc=1)
    save_checkpoint(tmp_path / "m.pt", model)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["format_version"] = 99
    torch.save(raw, tmp_path / "future.pt")
    assert "format version 99" in _refusal(tmp_path / "future.pt")


# ---- devices --------------------------------------------------------------------------------------------

def test_importing_does_not_initialise_cuda():
    import importlib

    importlib.import_module("yolo_backend.yolov7.checkpoint")
    assert not torch.cuda.is_initialized()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_load_model_on_cuda_matches_reference(ckpt_dir, reference_outputs):
    model = load_model(ckpt_dir / "yolov7-tiny_fire-smoke_ref-trained.pt", device="cuda")
    x = torch.from_numpy(np.load(ckpt_dir / "ref_input_1x3x320x416.npy")).cuda()
    with torch.inference_mode():
        out = model(x).cpu().numpy()
    ref = np.load(ckpt_dir / "yolov7-tiny_fire-smoke_ref-trained.ref_out.npy")
    assert np.abs(out[..., :4] - ref[..., :4]).max() < 1e-2   # TF32/cuDNN reorder more than the CPU does
    assert np.abs(out[..., 4:] - ref[..., 4:]).max() < 1e-4


# ---- files pickled from reference-named classes (fakes defined here, removed before loading) ------------

def _save_with_fake_reference_classes(path: Path, build) -> None:
    """Pickle objects whose classes are named models.yolo.* / models.common.* like the reference's."""
    import sys
    import types

    yolo, common = types.ModuleType("models.yolo"), types.ModuleType("models.common")
    package = types.ModuleType("models")
    for module, names in ((yolo, ["Model"]), (common, ["Conv", "ReOrg"])):
        for name in names:
            cls = type(name, (torch.nn.Module,), {"__module__": module.__name__})
            setattr(module, name, cls)
    saved = {k: sys.modules.get(k) for k in ("models", "models.yolo", "models.common")}
    sys.modules.update({"models": package, "models.yolo": yolo, "models.common": common})
    try:
        torch.save(build(yolo, common), path)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def test_p6_and_headless_reference_models_are_refused_with_reasons(tmp_path):
    def p6(yolo, common):
        model = yolo.Model()
        model.model = torch.nn.Sequential(common.ReOrg(), torch.nn.Conv2d(12, 8, 3))
        return {"model": model, "epoch": -1}

    def headless(yolo, common):
        model, conv = yolo.Model(), common.Conv()
        conv.conv = torch.nn.Conv2d(3, 8, 3, bias=False)
        conv.bn = torch.nn.BatchNorm2d(8)
        conv.act = torch.nn.SiLU()
        model.model = torch.nn.Sequential(conv)
        model.names = ["a"]
        return {"model": model.half()}

    _save_with_fake_reference_classes(tmp_path / "p6.pt", p6)
    assert "P6 model" in _refusal(tmp_path / "p6.pt")
    _save_with_fake_reference_classes(tmp_path / "headless.pt", headless)
    assert "no detection head" in _refusal(tmp_path / "headless.pt")


# ---- the size a checkpoint was trained at ---------------------------------------------------------------

def _shapes(n: int, size: int, seed: int):
    """Grey images with one filled rectangle each (class 0 or 1) at a known box."""
    from yolo_backend.yolov7.dataset import Sample

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        image = np.full((size, size, 3), 120, np.uint8)
        x, y = (int(v) for v in rng.integers(0, size // 2, 2))
        image[y:y + size // 3, x:x + size // 3] = (230, 40, 40) if i % 2 else (40, 40, 230)
        samples.append(Sample(image, [[x, y, x + size // 3, y + size // 3]], [i % 2]))
    return samples


def test_fine_tune_records_its_size_and_serving_follows_it(tmp_path):
    from yolo_backend.yolov7.checkpoint import serving_img_size, trained_img_size
    from yolo_backend.yolov7.train import TrainConfig, fine_tune

    out = tmp_path / "best.pt"
    fine_tune(TrainConfig(train_samples=_shapes(4, 96, 0), names=["a", "b"], img_size=96, epochs=1, batch_size=4,
                          nominal_batch=4, width=0.25, device="cpu", progress="none", out=str(out)))
    copied = tmp_path / "elsewhere" / "renamed.pt"    # the checkpoint alone carries it: no meta.json beside it
    copied.parent.mkdir()
    copied.write_bytes(out.read_bytes())
    assert trained_img_size(copied) == 96
    assert trained_img_size(load_checkpoint(copied)) == 96
    assert serving_img_size(copied) == (96, "trained at 96")
    assert serving_img_size(copied, 640, "IMG_SIZE") == (640, "IMG_SIZE=640")   # an explicit size wins


def test_checkpoints_without_a_recorded_size_serve_at_640(ckpt_dir, tmp_path):
    from yolo_backend.yolov7.checkpoint import DEFAULT_IMG_SIZE, is_size_guess, serving_img_size, trained_img_size

    official = ckpt_dir / "yolov7-tiny_fire-smoke_ref-trained.pt"   # trained at 320, but records no size
    assert trained_img_size(official) is None
    assert DEFAULT_IMG_SIZE == 640
    guess = "a guess: the checkpoint records no training size; set {} to the size it was trained at"
    assert serving_img_size(official) == (640, guess.format("img_size"))
    assert serving_img_size(official, None, "IMG_SIZE") == (640, guess.format("IMG_SIZE"))
    assert is_size_guess(serving_img_size(official)[1]) and not is_size_guess("trained at 320")
    assert serving_img_size(official, 320, "--img-size") == (320, "--img-size=320")
    model = build_model(graphs.get_graph("yolov7-tiny", head="Detect"), nc=1).eval()
    for metadata in ({}, {"training": {"img_size": 300}}, {"training": {"img_size": "320"}}, {"training": 320}):
        path = save_checkpoint(tmp_path / "m.pt", model, metadata=metadata)   # nothing usable recorded
        assert trained_img_size(path) is None, metadata
        assert serving_img_size(path) == (640, guess.format("img_size"))
    path = save_checkpoint(tmp_path / "m.pt", model, metadata={"untrained": True})   # any size will do: no guess
    assert serving_img_size(path) == (640, "untrained: 640")
    path = save_checkpoint(tmp_path / "m.pt", model, metadata={"training": {"img_size": 416}})
    assert serving_img_size(path) == (416, "trained at 416")
