"""A training worker whose jobs train with a test's fast fake instead of the fine-tuning engine.

    python -m tests.fake_worker tests.test_jobs:fake_train worker [--burst]

The first argument names the fake (``module:function``, test code); the rest are ``python -m yolo_backend``'s.
The fake takes the engine's place in this process before the worker starts, so the work horses RQ forks train
with it; everything else (queue, locks, publish, sync, status) is the product's code.
"""

from __future__ import annotations

import importlib
import sys


def use_trainer(spec: str) -> None:
    from yolo_backend.jobs import training

    module_name, _, name = spec.partition(":")
    training.fine_tune_trainer = getattr(importlib.import_module(module_name), name)


if __name__ == "__main__":
    use_trainer(sys.argv[1])
    from yolo_backend.cli import main

    sys.exit(main(sys.argv[2:]))
