"""Every benchmark script still starts: ``--help`` runs its imports and argument parser.

The benchmarks are not run by the suite (they print tables of timings), so a rename below them would otherwise go
unnoticed until someone needs the numbers: ``bench_threshold_effort.py`` imported ``CostModel`` from the module it
had moved out of."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "gpu_check_steps.py")


def test_every_script_is_listed():
    # gpu_check_steps.py is a step runner (no options), started by gpu_check.py; the rest take --help
    assert "bench_threshold_effort.py" in SCRIPTS and "gpu_check.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs(script):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_step_runner_says_how_to_call_it():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check_steps.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "usage:" in (done.stdout + done.stderr)
    assert "Traceback" not in done.stderr
