"""Logging set-up: the one format and the one place every entry point (serve, _wsgi/gunicorn, the worker, the CLI
commands) sets up logging."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Log lines to stderr from ``level`` (a name: DEBUG, INFO, ...; unknown names read as INFO) in LOG_FORMAT. A
    process whose logging is set up already (a test runner, an embedding application) keeps its handlers."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO), stream=sys.stderr,
                            format=LOG_FORMAT)
