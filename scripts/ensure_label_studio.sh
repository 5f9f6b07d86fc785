#!/usr/bin/env bash
# Create (or verify) the cached Label Studio 1.23 virtualenv the end-to-end tests use.
# Location: ${YOLO_BACKEND_TEST_CACHE:-~/.cache/yolo-backend-tests}/label-studio-1.23 (outside the repository).
# Safe to run repeatedly and concurrently: a lock guards the install, a marker file marks a complete one.
# Usage: scripts/ensure_label_studio.sh   (uses $PYTHON, else python3, only to run the harness; the venv itself is
#        built from that interpreter's base CPython, or from $LABEL_STUDIO_PYTHON when set)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tests/e2e/harness.py ensure-label-studio
