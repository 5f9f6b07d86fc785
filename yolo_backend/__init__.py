"""Label Studio ML backend for active learning with a YOLOv7 detector.

Layers, top down (each imports only the ones below it; tests/test_layers.py checks it with import-linter):
  cli.py, serve.py   commands: `python -m yolo_backend serve|worker|detect|val|train|score-pool|simulate|info ...`
  backend.py         YOLOv7Backend: the classic ML-backend class, a thin adapter over the predictor and jobs
  server/            the classic ML-backend HTTP contract (Flask): routes, dashboard, /status, /prometheus
  jobs/              training queue, RQ jobs, training runs, pool scoring, run history
  simulate/          the active-learning simulator (strategies compared offline)
  predictor.py       Label Studio tasks -> prediction items (label config, model, images, regions, task score)
  video_predictor.py video tasks -> videorectangle regions per track; video_tracks.py: detections -> ByteTrack tracks
  video_frames.py    video files -> sampled frames with their true times (OpenCV's FFmpeg, streamed)
  runtime.py         what a process shares: settings, model holder, Label Studio session and API, version sync
  model_holder.py    which checkpoint serves a project, loaded once, swapped atomically
  registry.py        published model versions on disk
  active_learning.py, clusters.py   task scores; k-means on image embeddings
  convert/           YOLO data <-> Label Studio tasks (YoloToLabelStudio.py)
  labelstudio/       Label Studio formats, URLs and keys, images, API calls (no torch)
  yolov7/            the detector: graphs, safe checkpoint loading, detection, training (torch, no Label Studio)
  settings.py        every setting, typed, with defaults
"""

__version__ = "0.1.0"
