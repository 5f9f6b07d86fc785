"""The Label Studio side: label config parsing, prediction JSON, task images and API calls.

Imports no torch: it works on ``Detections`` (numpy) from the detector layer and on plain JSON.

  config.py   label config -> the RectangleLabels control to predict for; checkpoint classes -> config labels
  results.py  Detections -> Label Studio prediction JSON (percent boxes, scores, model_version)
  client.py   credentials (legacy token or personal access token), an authenticated session, API calls
  images.py   task image URLs -> bytes (uploads, local files, URLs, cloud presign) -> RGB arrays, with a cache
"""
