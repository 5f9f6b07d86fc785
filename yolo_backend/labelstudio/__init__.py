"""The Label Studio side: label config parsing, prediction JSON, task images and API calls.

Imports no torch: it works on ``Detections`` (numpy) from the detector layer and on plain JSON.

  config.py        label config parsing; checkpoint classes -> config labels (LABEL_MAP, predicted_values)
  controls.py      the controls served (RectangleLabels, Choices), one object per tag, with their model_* attributes
  video_controls.py  the video object tracking config (VideoRectangle + Labels on a Video), its frame rate
  keyframes.py     videorectangle keyframe sequences <-> the box on each frame (the editor's interpolation)
  video_results.py a track -> one videorectangle region; video_regions.py: annotated clip -> boxes per frame
  results.py       Detections -> Label Studio prediction JSON (percent boxes, scores, model_version)
  regions.py       annotated regions -> boxes; annotations.py: which annotation of a task counts
  urls.py          which origin a URL reaches (the HTTP client's reading); refusing parser-dependent URLs
  client.py        credentials (legacy token or personal access token), the keyed session (keys only to their origin)
  api.py           the Label Studio API calls (label-studio-sdk) with those keys
  connection.py    whether a project has this backend connected (the backend acts only there)
  version_sync.py  switching a project's model_version (the one rule, and the bounded background sync)
  images.py        task image URLs -> bytes (uploads, local files, URLs, cloud presign) -> RGB arrays, with a cache
  videos.py        task video URLs -> a local file (the image rules; streamed to a temporary file, bounded)
  storage.py       Local Storage paths and cloud presign URLs; deadline.py: a deadline for a whole download
"""
