"""benchmarks/gpu_check.sh: the prepared GPU check. Its CPU dry run (`--cpu`) runs here, so that the script cannot
rot between the rare runs on a lent GPU machine: every step runs, every row is in the table, the files are written;
the fp16 bound it applies on CUDA is checked against fp16 arithmetic on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

# (step, start of the check's name, status in a CPU dry run); parity rows are per checkpoint, listed apart.
DRY_RUN_ROWS = [
    ("setup", "scripts/bootstrap.sh", "pass"),
    ("env", "torch build", "pass"),
    ("env", "CUDA device", "skip"),
    ("prepare", "data", "pass"),
    ("parity", "fp16 parity", "skip"),
    ("detect", "detect fp32 on CPU (torch) finds the CPU's boxes", "pass"),
    ("detect", "detect fp16", "skip"),
    ("throughput", "raw forward fp32, 320, batch 1", "pass"),
    ("throughput", "raw forward fp32, 320, batch 2", "pass"),
    ("throughput", "raw forward fp16, 320, batch 1", "skip"),
    ("throughput", "raw forward fp16, 320, batch 2", "skip"),
    ("throughput", "Detector.detect fp32, 320, batch 2", "pass"),
    ("finetune", "loss falls", "pass"),
    ("finetune", "AMP", "skip"),
    ("finetune", "the checkpoint loads back", "pass"),
    ("serve", "serve answers /health", "pass"),
    ("serve", "/predict, 2 tasks", "pass"),
    ("serve", "/health during /predict", "pass"),
    ("serve", "/predict again", "pass"),
    ("serve", "no CUDA in the gunicorn master", "pass"),
    ("serve", "CUDA in the gunicorn worker", "skip"),
    ("serve", "serve stops on SIGTERM", "pass"),
    ("pool", "pool scoring, 20 tasks at 320 on CPU", "pass"),
]


def dry_run(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, Path, dict]:
    out = tmp_path / "out"
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the check's scratch folder goes here: it must be removed
    # --budget: the default 300 s is a target for a dry run, not a bound for a CI machine that others share
    result = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(out), "--budget", "900", *options],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    return result, out, results


def assert_dry_run_table(result, out: Path, results: dict, parity_names: list[str], compared: bool = True) -> None:
    """Exit 0, the three files, every row once with its status (the detect comparison is skipped for a random
    detector), a parity row per checkpoint."""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "table.md"]
    rows = [(r["step"], r["check"], r["status"]) for r in results["rows"]]
    table = (out / "table.md").read_text()
    assert table in result.stdout and "all passed" in table.splitlines()[0]
    for step, check, status in DRY_RUN_ROWS:
        status = "skip" if check.startswith("detect fp32") and not compared else status
        found = [r for r in rows if r[0] == step and r[1].startswith(check)]
        assert len(found) == 1 and found[0][2] == status, (step, check, found, rows)
        assert f"| {step} | {check}" in table
    parity = [r for r in rows if r[0] == "parity" and r[1] != "fp16 parity"]
    assert sorted(r[1].split(":")[0] for r in parity) == sorted(parity_names)
    assert all(r[2] == "pass" for r in parity), parity
    assert len(rows) == len(DRY_RUN_ROWS) + len(parity_names)
    assert results["failed"] == 0 and results["mode"] == "cpu"
    log = (out / "log.txt").read_text()
    assert "set-up: --cpu reuses the existing .venv" in log and "===== step pool: exit 0" in log


@pytest.fixture(scope="module")
def packed(reference_outputs, tmp_path_factory) -> Path:
    """What `gpu_check.sh --pack` copies for a device machine (the data a GPU run uses): ../shared's own files,
    the reference outputs among them."""
    dest = tmp_path_factory.mktemp("pack") / "gpu-check-data"
    result = subprocess.run(["bash", str(SCRIPT), "--pack", str(dest)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return dest


def test_pack_fits_a_device_call(packed):
    size_mb = sum(p.stat().st_size for p in packed.rglob("*") if p.is_file()) / 2**20
    assert size_mb < gpu_check.PACK_LIMIT_MB
    ckpts = packed / "yolov7-checkpoints"
    assert (ckpts / "ref_input_1x3x320x416.npy").is_file()
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["yolov7-tiny_coco_deploy.pt",
                                                         "yolov7-tiny_fire-smoke_ref-trained.pt",
                                                         "yolov7-tiny_fire-smoke_train.pt"]
    assert all((ckpts / f"{p.stem}.ref_out.npy").is_file() for p in ckpts.glob("*.pt"))
    assert len(list((packed / "fire-smoke/images/valid").glob("*.jpg"))) == 47
    assert len(list((packed / "fire-smoke/images/train").glob("*.jpg"))) == 64
    assert len(list((packed / "fire-smoke/labels/train").glob("*.txt"))) == 64


@pytest.mark.slow
def test_cpu_dry_run_on_the_packed_data(tmp_path, packed):
    """The data a GPU run carries: three shared yolov7-tiny checkpoints, and a random yolov7 built by the check."""
    result, out, results = dry_run(tmp_path, "--data", str(packed))
    assert_dry_run_table(result, out, results, ["yolov7-tiny_coco_deploy", "yolov7-tiny_fire-smoke_ref-trained",
                                                "yolov7-tiny_fire-smoke_train", "generated-yolov7"])
    detect = next(r for r in results["rows"] if r["check"].startswith("detect fp32"))
    assert detect["value"].startswith("4 images: ") and "not compared" not in detect["value"]
    assert "from the trained checkpoint" in next(r["check"] for r in results["rows"] if r["step"] == "finetune")
    assert not list(tmp_path.glob("gpu-check-*")), "the scratch folder was left behind"


@pytest.mark.slow
def test_cpu_dry_run_on_generated_data(tmp_path):
    """No data at all (a device machine the shared folder was not carried to): images and checkpoints are built."""
    result, out, results = dry_run(tmp_path, "--data", "none")
    assert_dry_run_table(result, out, results, ["generated-yolov7-tiny", "generated-yolov7"], compared=False)
    assert "random yolov7-tiny and yolov7 built here" in results["facts"]["data"]
    detect = next(r for r in results["rows"] if r["check"].startswith("detect fp32"))
    assert "not compared (a random detector" in detect["value"]
    assert not list(tmp_path.glob("gpu-check-*")), "the scratch folder was left behind"


def test_a_failed_set_up_fails_the_run_and_says_so(tmp_path):
    """bootstrap.sh failed (no registry, no CUDA wheel): every step is a failed row, exit 1, the files still there."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out),
                             "--data", "none", "--setup-status", "failed", "--work", str(tmp_path / "work")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["step"] for r in rows] == ["setup"] + [step.name for step in gpu_check.STEPS]
    assert all(r["status"] == "fail" for r in rows)
    assert all(r["value"] == "not run: set-up failed" for r in rows[1:])
    assert "**FAIL**" in (out / "table.md").read_text() and (out / "log.txt").is_file()


def test_fp16_bound_holds_for_fp16_arithmetic_on_the_cpu(shared_dir, reference_outputs):
    """The fp16 bound the GPU run applies (gpu_check_steps: 2 px, 0.01) against fp16 on the CPU, the same
    arithmetic width: the shared yolov7-tiny checkpoints stay well inside it (measured 0.47 px, 1.6e-3)."""
    import numpy as np
    import torch

    from gpu_check_steps import FP16_BOX_PX, FP16_PROB, _max_diffs
    from yolo_backend.yolov7.checkpoint import load_model

    ckpts = shared_dir / "data" / "yolov7-checkpoints"
    x = torch.from_numpy(np.load(ckpts / "ref_input_1x3x320x416.npy"))
    for name in ("yolov7-tiny_fire-smoke_ref-trained", "yolov7-tiny_coco_deploy"):
        model = load_model(ckpts / f"{name}.pt", backend="torch")
        with torch.inference_mode():
            fp32 = model(x)
            fp16 = model.half()(x.half()).float()
        box, prob = _max_diffs(fp16, fp32)
        assert 0 < box < FP16_BOX_PX / 2 and 0 < prob < FP16_PROB / 2, (name, box, prob)
