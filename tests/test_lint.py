"""Lint and types stay clean: ``ruff check .`` and ``mypy`` (both configured in pyproject.toml: [tool.ruff],
[tool.mypy]) report nothing. Run from the repository root, as by hand; mypy keeps its cache in ``.mypy_cache``
(a cold run takes about a minute, a warm one seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tool(name: str) -> Path:
    """The tool installed beside this interpreter (the virtualenv's bin/)."""
    path = Path(sys.executable).with_name(name)
    assert path.is_file(), f"{name} is missing: run scripts/bootstrap.sh --dev (requirements-dev.txt)"
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_reports_nothing():
    done = run([str(tool("ruff")), "check", "--no-cache", "."])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All checks passed" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_reports_nothing():
    done = run([str(tool("mypy")), "--cache-dir", str(REPO / ".mypy_cache")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout, done.stdout + done.stderr
