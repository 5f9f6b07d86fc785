"""The classic Label Studio ML-backend HTTP contract: ``LabelStudioMLBase`` and the Flask app.

  base.py               LabelStudioMLBase (classic class API); what a process shares is ``yolo_backend.runtime``
  app.py                create_app(backend_class, settings) -> Flask: request hooks, error handlers
  routes.py             the endpoints (/health /setup /predict /webhook /train ...) and their small policies
  http.py               reading a request into checked values; ServerState, Counters
  dashboard.py          the page at / for browsers, /status, /prometheus (status.py, charts.py, prometheus.py)
  request_buffering.py  gunicorn worker class that reads whole requests before a thread runs the app
"""

from typing import TYPE_CHECKING, Any

from .base import LabelStudioMLBase, parse_project_id

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["LabelStudioMLBase", "create_app", "parse_project_id"]


def create_app(*args: Any, **kwargs: Any) -> "Flask":
    """See ``yolo_backend.server.app.create_app`` (imported lazily: Flask is only needed to serve)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
