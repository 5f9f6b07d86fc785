"""One logging set-up (yolo_backend/logs.py) for every entry point."""

import subprocess
import sys

SCRIPT = """
import logging
from yolo_backend.logs import configure_logging
configure_logging("warning")
logging.getLogger("a.b").info("hidden")
logging.getLogger("a.b").warning("shown")
configure_logging("debug")   # set up already: kept as it is
logging.getLogger("a.b").info("still hidden")
"""


def test_one_format_to_stderr_at_the_level():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("[") and line.endswith("] [WARNING] [a.b] shown")
