"""Label Studio ML backend for active learning with a YOLOv7 detector.

Layers (each imports only the ones below it):
  yolov7/       the detector: graphs, safe checkpoint loading, detection pipeline (torch, no Label Studio)
  labelstudio/  Label Studio formats and API calls (no torch)
  server/       the classic ML-backend HTTP contract (Flask)
  settings.py   every setting, typed, with defaults
"""

__version__ = "0.1.0"
