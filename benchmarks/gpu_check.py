"""The GPU check: one prepared command that proves the CUDA path (inference, fp16, AMP training, the server's
after-fork CUDA rule, pool scoring) in a few minutes on a machine with an NVIDIA GPU, and prints one table.

    benchmarks/gpu_check.sh [--cpu] [--out DIR] [--data DIR] [--budget S]   # set-up (bootstrap.sh), then this
    benchmarks/gpu_check.sh --pack [DIR]     # copy what the check reads from ../shared/data into DIR (< 60 MiB)

Steps, in order, each a child process (benchmarks/gpu_check_steps.py) with a time limit, so a crash or a hang in
one is a failed row and the others still run:

  env         torch build, CUDA device, driver, cuDNN conv precision
  prepare     the data: checkpoints with reference outputs, real images and labels from --data (default
              ../shared/data when it is there), else generated images and checkpoints built here
  parity      raw outputs of every checkpoint on the device against the CPU (fp32: the engine's bounds; fp16: a
              looser bound) and against the reference implementation's outputs where they are given
  detect      `python -m yolo_backend detect` on real images, on the device and on the CPU: the same boxes
  throughput  detector images/s at 640, batch 1 and 32, fp32 and fp16, beside the paper's yolov7-tiny figure
  finetune    a short fine-tune with AMP: its loss falls and its checkpoint loads back
  serve       `python -m yolo_backend serve` with DEVICE=auto: /predict, /health during it, no CUDA in the gunicorn
              master (its /proc/PID/maps hold no libcuda) while the worker has it
  pool        pool scoring of 200 tasks through benchmarks/bench_pool.py (tasks/s)

`--cpu` is the dry run CI makes (tests/test_gpu_check.py): the same steps on the CPU with small sizes (the device
side runs torch, the CPU side the default ONNX Runtime), fp16 and CUDA-only rows skipped.

Writes OUT/table.md (the table), OUT/results.json (every row and the run's facts) and OUT/log.txt (set-up and
every step's output), rewritten after each step so that a run cut short still leaves what it did. Exit status 1
when any row failed, 2 on bad usage. Standard library only: this process never imports torch.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
STEPS_SCRIPT = Path(__file__).resolve().parent / "gpu_check_steps.py"
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "build" / "gpu-check"
DEFAULT_PACK = REPO / "build" / "gpu-check-data"
PACK_LIMIT_MB = 60.0  # the device tool carries 64 MiB with the working tree


class Status(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass
class Row:
    step: str
    check: str
    status: Status
    value: str = ""
    bound: str = ""
    seconds: Optional[float] = None   # the step's wall time, on its first row

    @classmethod
    def from_dict(cls, data: dict) -> "Row":
        return cls(data["step"], data["check"], Status(data["status"]), data.get("value", ""), data.get("bound", ""),
                   data.get("seconds"))


@dataclass(frozen=True)
class Sizes:
    """How much each step does: the GPU run's sizes fit ~8 minutes on an H100, the dry run's ~3 on 2 busy cores."""

    detect_images: int
    bench_size: int
    bench_batches: tuple
    bench_repeats: int
    train_images: int
    val_images: int
    train_epochs: int
    train_size: int
    train_batch: int
    serve_tasks: int
    pool_tasks: int
    pool_size: int
    pool_bare: int
    health_bound_s: float   # /health must answer within this while /predict runs


GPU_SIZES = Sizes(detect_images=47, bench_size=640, bench_batches=(1, 32), bench_repeats=30, train_images=64,
                  val_images=16, train_epochs=5, train_size=320, train_batch=16, serve_tasks=8, pool_tasks=200,
                  pool_size=640, pool_bare=64, health_bound_s=1.0)  # 1 s: Label Studio's /health timeout
CPU_SIZES = Sizes(detect_images=4, bench_size=320, bench_batches=(1, 2), bench_repeats=3, train_images=16,
                  val_images=4, train_epochs=3, train_size=160, train_batch=8, serve_tasks=2, pool_tasks=20,
                  pool_size=320, pool_bare=8, health_bound_s=5.0)   # busy shared cores: the mechanism, not speed


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: float   # most seconds the step may take (the overall budget may cut it shorter)


STEPS = (Step("env", 90), Step("prepare", 120), Step("parity", 180), Step("detect", 180), Step("throughput", 150),
         Step("finetune", 180), Step("serve", 180), Step("pool", 180))


@dataclass
class Plan:
    """What every step reads (work/plan.json); ``prepare`` adds the data it found or made (work/assets.json)."""

    mode: str                 # "gpu" or "cpu"
    device: str               # "cuda" or "cpu"
    repo: str
    work: str
    data: Optional[str]       # folder with yolov7-checkpoints/ and fire-smoke/, or None: generated data
    sizes: dict = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))


# --- running the steps ------------------------------------------------------------------------------------------

def step_environment(work: Path) -> dict[str, str]:
    """The steps' environment: this checkout first on the path (a venv may hold an editable install of another),
    temporary files and ONNX exports in the work folder (exports of random checkpoints would push the user's own
    out of their cache), unless ONNX_CACHE_DIR is set (the tests share theirs)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("ONNX_CACHE_DIR", str(work / "onnx"))
    env["TMPDIR"] = str(work / "tmp")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_step(step: Step, python: str, plan_path: Path, limit: float, log) -> list[Row]:
    """Run one step in its own process group; its rows, or a failed row saying why there are none."""
    work = plan_path.parent
    result_path = work / f"rows-{step.name}.json"
    log.write(f"\n===== step {step.name} (limit {limit:.0f} s) =====\n")
    log.flush()
    started = time.monotonic()
    proc = subprocess.Popen([python, str(STEPS_SCRIPT), step.name, str(plan_path)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env=step_environment(work), start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        code = None
    seconds = time.monotonic() - started
    log.write(f"===== step {step.name}: exit {code}, {seconds:.1f} s =====\n")
    log.flush()
    rows = [Row.from_dict(r) for r in json.loads(result_path.read_text())] if result_path.is_file() else []
    if code is None:
        rows.append(Row(step.name, "step finished in time", Status.FAIL, f"stopped after {seconds:.0f} s",
                        f"< {limit:.0f} s"))
    elif code != 0 or not rows:
        rows.append(Row(step.name, "step ran", Status.FAIL, f"exit {code} after {seconds:.0f} s; see log.txt"))
    for row in rows:
        row.step = step.name
    rows[0].seconds = round(seconds, 1)
    return rows


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group (a `serve` it started stops its own children), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def setup_row(args) -> Row:
    if args.setup_status == "failed":
        return Row("setup", "scripts/bootstrap.sh", Status.FAIL, "failed; see log.txt",
                   "the CUDA torch build when nvidia-smi is present", args.setup_seconds)
    what = "reused the existing .venv" if args.setup_status == "reused" else "bootstrap.sh made .venv"
    return Row("setup", "scripts/bootstrap.sh", Status.PASS, what, seconds=args.setup_seconds)


def run_all(args, plan: Plan, python: str, out: Path) -> list[Row]:
    work = Path(plan.work)
    plan_path = work / "plan.json"
    plan.write(plan_path)
    rows = [setup_row(args)]
    deadline = time.monotonic() + args.budget
    stop = "set-up failed" if rows[0].status is Status.FAIL else None
    with open(out / "log.txt", "a") as log:
        for step in STEPS:
            left = deadline - time.monotonic()
            if stop is None and left < 10:
                stop = f"the budget of {args.budget:.0f} s ran out"
            if stop is not None:
                rows.append(Row(step.name, "step ran", Status.FAIL, f"not run: {stop}"))
                continue
            step_rows = run_step(step, python, plan_path, min(step.limit_s, left), log)
            rows += step_rows
            if step.name in ("env", "prepare") and any(r.status is Status.FAIL for r in step_rows):
                stop = f"the {step.name} step failed"
            write_outputs(out, rows, plan, facts(work))
    return rows


def facts(work: Path) -> dict:
    """What the env and prepare steps found (device, torch, data), for the table's heading."""
    path = work / "facts.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# --- the table --------------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row], plan: Plan, info: dict) -> str:
    failed = sum(r.status is Status.FAIL for r in rows)
    heading = [f"GPU check ({'CPU dry run' if plan.mode == 'cpu' else 'GPU run'}), "
               f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC: "
               f"{'all passed' if not failed else f'{failed} failed'}", ""]
    for key in ("device", "torch", "driver", "data"):
        if info.get(key):
            heading.append(f"- {key}: {info[key]}")
    lines = ["| step | check | result | value | bound / reference | step s |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = {"pass": "pass", "fail": "**FAIL**", "skip": "skip"}[r.status.value]
        seconds = f"{r.seconds:.0f}" if r.seconds is not None else ""
        lines.append(f"| {r.step} | {_cell(r.check)} | {mark} | {_cell(r.value)} | {_cell(r.bound)} | {seconds} |")
    return "\n".join(heading + [""] + lines) + "\n"


def write_outputs(out: Path, rows: list[Row], plan: Plan, info: dict) -> None:
    text = table(rows, plan, info)
    (out / "table.md").write_text(text)
    results = {"mode": plan.mode, "device": plan.device, "facts": info,
               "rows": [dict(asdict(r), status=r.status.value) for r in rows],
               "failed": sum(r.status is Status.FAIL for r in rows)}
    (out / "results.json").write_text(json.dumps(results, indent=1))


# --- packing the shared data for a device machine ---------------------------------------------------------------

def pack_files(source: Path, images: int = 64) -> list[Path]:
    """The files of ``source`` (../shared/data) the check reads, in the order they are worth carrying: the
    reference input, the yolov7-tiny checkpoints with their reference outputs, the fire-smoke valid split, then
    ``images`` training images with their labels. yolov7 (75 MB) and the mid-training file (25 MB) stay behind:
    the check builds a random yolov7 itself, and the mid-training file has the same graph as the others."""
    ckpts = source / "yolov7-checkpoints"
    wanted = [ckpts / "ref_input_1x3x320x416.npy", ckpts / "refs.json",
              ckpts / "yolov7-tiny_fire-smoke_ref-trained.valid_detections_320.json"]
    for stem in ("yolov7-tiny_fire-smoke_ref-trained", "yolov7-tiny_fire-smoke_train", "yolov7-tiny_coco_deploy"):
        wanted += [ckpts / f"{stem}.pt", ckpts / f"{stem}.ref_out.npy"]
    smoke = source / "fire-smoke"
    for split, count in (("valid", None), ("train", images)):
        for image in sorted((smoke / "images" / split).glob("*.jpg"))[:count]:
            wanted.append(image)
            label = smoke / "labels" / split / f"{image.stem}.txt"
            if label.is_file():
                wanted.append(label)
    return [path for path in wanted if path.is_file()]


def pack(source: Path, dest: Path) -> int:
    files = pack_files(source)
    if not files:
        print(f"--pack: nothing to copy: {source} has no yolov7-checkpoints/ or fire-smoke/", file=sys.stderr)
        return 2
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    if size_mb > PACK_LIMIT_MB:
        print(f"--pack: {size_mb:.1f} MiB is over the {PACK_LIMIT_MB:.0f} MiB a device call carries", file=sys.stderr)
        return 2
    if dest.exists():
        shutil.rmtree(dest)
    for path in files:
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    print(f"packed {len(files)} files, {size_mb:.1f} MiB: {dest}")
    return 0


# --- entry point ------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU with small sizes (CI)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--data", default=None,
                   help="folder with yolov7-checkpoints/ and fire-smoke/ (default ../shared/data when it is "
                        "there); 'none': generated images and checkpoints")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all steps (default 480 on a GPU, 300 for --cpu)")
    p.add_argument("--python", default=sys.executable, help="interpreter the steps run with (the project's .venv)")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one, removed at the end)")
    p.add_argument("--setup-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--setup-status", choices=("ok", "reused", "failed"), default="reused", help=argparse.SUPPRESS)
    p.add_argument("--pack", nargs="?", const=str(DEFAULT_PACK), default=None, metavar="DIR",
                   help=f"copy the shared data the check reads into DIR (default {DEFAULT_PACK}) and exit")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 300.0 if args.cpu else 480.0
    return args


def data_folder(option: Optional[str]) -> Optional[str]:
    if option is None:
        return str(SHARED_DATA) if SHARED_DATA.is_dir() else None
    if option.lower() == "none":
        return None
    path = Path(option).resolve()
    if not path.is_dir():
        raise SystemExit(f"--data {option}: no such folder (give one with yolov7-checkpoints/ and fire-smoke/, "
                         "or 'none' for generated data)")
    return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pack is not None:
        return pack(SHARED_DATA if args.data in (None, "none") else Path(args.data), Path(args.pack))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    sizes = CPU_SIZES if args.cpu else GPU_SIZES
    plan = Plan(mode="cpu" if args.cpu else "gpu", device="cpu" if args.cpu else "cuda", repo=str(REPO),
                work=str(work), data=data_folder(args.data), sizes=asdict(sizes))
    try:
        rows = run_all(args, plan, args.python, out)
        write_outputs(out, rows, plan, facts(work))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print((out / "table.md").read_text())
    print(f"written: {out / 'table.md'}, {out / 'results.json'}, {out / 'log.txt'}")
    return 1 if any(r.status is Status.FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
