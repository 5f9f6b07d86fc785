"""The classic backend script: ``label-studio-ml init my_backend --script model_backend.py`` (label-studio-ml
1.0.x) copies this file and serves the class it finds here. The class itself lives in the package
(``yolo_backend/backend.py``); importing it here, after the classic runtime has loaded ``label_studio_ml.model``,
makes it a subclass of the classic base class too, which that runtime requires.
"""

from yolo_backend.backend import YOLOv7Backend

__all__ = ["YOLOv7Backend"]
