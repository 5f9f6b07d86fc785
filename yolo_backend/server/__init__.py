"""The classic Label Studio ML-backend HTTP contract: ``LabelStudioMLBase`` and the Flask app.

  base.py          LabelStudioMLBase (classic class API) and BackendContext (what a process shares)
  app.py           create_app(backend_class, settings) -> Flask: /health /setup /predict /webhook /train ...
  model_holder.py  which checkpoint serves a project; loaded once, swapped atomically on a new version
"""

from .base import BackendContext, LabelStudioMLBase, parse_project_id

__all__ = ["BackendContext", "LabelStudioMLBase", "create_app", "parse_project_id"]


def create_app(*args, **kwargs):
    """See ``yolo_backend.server.app.create_app`` (imported lazily: Flask is only needed to serve)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
