"""Entry point of the ML backend: ``app`` for gunicorn (``gunicorn _wsgi:app``) and the classic CLI.

    python _wsgi.py --host 127.0.0.1 --port 9090 [--log-level INFO] [--model-dir DIR] [--with KEY=VALUE ...]
    python _wsgi.py --check        # load every model that would serve once, then exit (0 = they work, 2 = not)

Settings come from the environment (see yolo_backend/settings.py); ``--with`` sets a setting by name
(``--with model_score_threshold=0.4``) or, for names that are not settings, passes a keyword argument to the
backend class. Creating ``app`` loads no model and touches no CUDA: the model loads on the first prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from yolo_backend.logs import configure_logging
from yolo_backend.settings import Settings, SettingsError, exposure_warning


def build_app(settings: Settings | None = None, **backend_kwargs):
    from yolo_backend.backend import YOLOv7Backend
    from yolo_backend.jobs.queue import TrainingQueue
    from yolo_backend.server.app import create_app
    from yolo_backend.runtime import BackendContext

    settings = settings or Settings.from_env()
    # Training requests go to the RQ queue (answered at once; a worker trains). No Redis connection is made here.
    context = BackendContext.from_settings(settings, training=TrainingQueue.from_settings(settings))
    return create_app(YOLOv7Backend, context=context, **backend_kwargs)


def check_model(settings: Settings, quiet: bool = False) -> int:
    """Load-check every checkpoint that would serve (MODEL_PATH, MODEL_VERSION, each newest published version);
    0 when they load, else 2 with the loader's one-line message on stderr."""
    from yolo_backend.registry import RegistryError
    from yolo_backend.model_holder import NoModelError
    from yolo_backend.runtime import BackendContext

    models = BackendContext.from_settings(settings).models
    try:
        sources = models.check()
    except (NoModelError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if quiet:
        return 0
    if not sources:
        # Not an error: each project gets an untrained model sized for its label config.
        print(f"ok: no model configured (no MODEL_PATH, nothing published in {settings.model_dir}); each "
              "project starts from an untrained yolov7-tiny built for its label config (v0-untrained)")
        return 0
    default = models.source(None)  # what a request without a project gets
    if default is not None:
        model = models.get(None)
        print(f"ok: model {model.version} ({model.source.origin}), classes: {', '.join(model.names)}")
    for source in sources:
        if default is None or source.path != default.path:
            print(f"ok: model {source.version} ({source.origin})")
    return 0


def _parse_with(pairs: list[str]) -> tuple[dict, dict]:
    """--with KEY=VALUE pairs -> (setting overrides, backend kwargs)."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    overrides, kwargs = {}, {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--with {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key.lower() in fields:
            overrides[key.lower()] = value
        else:
            kwargs[key] = value
    return overrides, kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Label Studio ML backend (YOLOv7)")
    parser.add_argument("-p", "--port", type=int, default=None, help="port (default: PORT, else 9090)")
    parser.add_argument("--host", default=None, help="address to bind (default: HOST, else 0.0.0.0)")
    parser.add_argument("--debug", action="store_true", help="Flask debug mode (auto-reload, never in production)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (default: LOG_LEVEL)")
    parser.add_argument("--model-dir", default=None, help="folder of published model versions (MODEL_DIR)")
    parser.add_argument("--with", dest="with_", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="set a setting (e.g. model_path=best.pt) or pass a backend keyword argument")
    parser.add_argument("--check", action="store_true", help="load the model once and exit")
    args = parser.parse_args(argv)

    overrides, backend_kwargs = _parse_with(args.with_)
    for name in ("host", "port", "model_dir"):  # arguments win over the environment
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.log_level:
        overrides["log_level"] = args.log_level
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    if args.check:
        return check_model(settings)
    if check_model(settings, quiet=True):  # a broken model is refused before the port is bound
        return 2
    warning = exposure_warning(settings.host, settings)
    if warning:
        logging.getLogger("_wsgi").warning(warning)

    from yolo_backend.server.request_buffering import BufferingRequestHandler, ReadLimits

    try:
        limits = ReadLimits.from_settings(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    application = build_app(settings, **backend_kwargs)
    # Flask's threaded server, each request read whole within REQUEST_READ_TIMEOUT_S before the app runs.
    application.run(host=settings.host, port=settings.port, debug=args.debug, threaded=True, use_reloader=args.debug,
                    request_handler=BufferingRequestHandler.with_limits(limits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    # gunicorn _wsgi:app
    _settings = Settings.from_env()
    configure_logging(_settings.log_level)
    app = build_app(_settings)
