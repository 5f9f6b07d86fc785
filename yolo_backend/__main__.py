"""``python -m yolo_backend``: see yolo_backend/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
