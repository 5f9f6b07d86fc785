"""README.md holds the settings table and the two commands CI runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_settings_table_is_current():
    result = subprocess.run([sys.executable, "scripts/settings_table.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = "./scripts/bootstrap.sh --dev && .venv/bin/python -m pytest"
    assert test_command in readme
    assert test_command in (ROOT / ".ci" / "run").read_text()
