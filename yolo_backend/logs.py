"""Logging set-up: the one format and the one place every entry point (serve, _wsgi/gunicorn, the worker, the CLI
commands) sets up logging."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"
# The longest message a log line carries. User strings are shortened where they are logged (``urls.shorten``);
# this is the net under that: a task with a megabyte URL or label cannot grow the log by megabytes.
MAX_MESSAGE_CHARS = 4000


class CapLength(logging.Filter):
    """Cuts a record's message to ``limit`` characters (saying how long it was); never drops a record."""

    def __init__(self, limit: int = MAX_MESSAGE_CHARS):
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it itself
            return True
        if len(message) > self.limit:
            record.msg, record.args = f"{message[:self.limit]}... ({len(message)} characters)", None
        return True


def configure_logging(level: str = "INFO") -> None:
    """Log lines to stderr from ``level`` (a name: DEBUG, INFO, ...; unknown names read as INFO) in LOG_FORMAT,
    each message at most MAX_MESSAGE_CHARS long. A process whose logging is set up already (a test runner, an
    embedding application) keeps its handlers."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO), stream=sys.stderr,
                            format=LOG_FORMAT)
        for handler in root.handlers:
            handler.addFilter(CapLength())
