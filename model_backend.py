"""The classic backend script: ``label-studio-ml init my_backend --script model_backend.py`` (label-studio-ml
1.0.x) copies this file and serves the class it finds here. The class itself lives in the package
(``yolo_backend/backend.py``); importing it here, after the classic runtime has loaded ``label_studio_ml.model``,
makes it a subclass of the classic base class too, which that runtime requires.

The ``_wsgi.py`` that init generates sets the root logger to ERROR unless started with ``--log-level``, which would
hide every warning of ours (e.g. a task whose image could not be had). Under that runtime our loggers follow
LOG_LEVEL (INFO by default) instead, whatever ``--log-level`` says, through the runtime's own console handler.
"""

import logging
import os
import sys

from yolo_backend.backend import YOLOv7Backend

__all__ = ["YOLOv7Backend"]

if "label_studio_ml" in sys.modules:  # only under the classic runtime: elsewhere the entry point sets up logging
    logging.getLogger("yolo_backend").setLevel(
        getattr(logging, os.environ.get("LOG_LEVEL", "INFO").strip().upper(), logging.INFO))
