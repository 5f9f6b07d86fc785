"""The layers hold: ``lint-imports`` checks the import contracts in pyproject.toml ([tool.importlinter]).

Every import counts, also those inside functions: the detector (yolov7) imports nothing of the app and has no
import cycles, and the Label Studio layer imports no torch and nothing of the detector, server, jobs or convert.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.is_file(), "import-linter is missing: run scripts/bootstrap.sh --dev"
    done = subprocess.run([str(lint_imports), "--no-cache", str(REPO / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout
