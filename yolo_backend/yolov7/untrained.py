"""The model a project starts from when it has none: a randomly initialised yolov7-tiny, one class per label.

Seeded, so the same labels always give the same weights (and the same checkpoint file). Importing this module
imports no torch (the server's model holder imports it at start-up); building the checkpoint does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .graphs import DEFAULT_GRAPH as UNTRAINED_GRAPH  # graphs.py: plain data, no torch

UNTRAINED_VERSION = "v0-untrained"  # the name its checkpoint (and the version published from it) carries


def build_untrained_checkpoint(path: Path, names: Sequence[str]) -> Path:
    """Write a randomly initialised UNTRAINED_GRAPH with one class per name, in our checkpoint format."""
    import torch

    from . import graphs
    from .checkpoint import save_checkpoint
    from .model import build_model

    with torch.random.fork_rng(devices=[]):  # leave the process's RNG as it was
        torch.manual_seed(0)
        model = build_model(graphs.get_graph(UNTRAINED_GRAPH), len(names), names=list(names))
    return save_checkpoint(path, model, list(names), {"name": UNTRAINED_VERSION, "untrained": True,
                                                       "graph": UNTRAINED_GRAPH})
