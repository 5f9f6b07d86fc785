"""Retrieve Predictions on N selected tasks, end to end: the /predict reply within PREDICT_DEADLINE_S, the rest by
pool scoring, until every task has exactly one prediction of the serving version.

Real parts on 127.0.0.1, started here and stopped at the end: Label Studio 1.23 (JWT, personal access token; the
e2e harness's cached venv), valkey, our backend (``_wsgi.py``) and ``--workers`` RQ workers. ``--images`` real
photos are uploaded once and the ``--tasks`` tasks are imported as JSON pointing at those uploads (cycled); backend
and workers download them from Label Studio with its key (each file once: the image cache keeps it). Prints a
markdown table; exits 1 when a task does not end with exactly one prediction of the serving version with a finite
score, or when the backend's /predict took Label Studio's 100 s or more.

    .venv/bin/python benchmarks/bench_retrieve_predictions.py --tasks 5000 --workers 1
    nice -n 5 .venv/bin/python benchmarks/bench_retrieve_predictions.py --tasks 300 --images 20 --deadline 10
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import harness  # noqa: E402  (tests/e2e/harness.py: Label Studio, processes, API client)
import requests  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DEFAULT_WEIGHTS = SHARED / "yolov7-checkpoints" / "yolov7-tiny_fire-smoke_ref-trained.pt"
DEFAULT_IMAGES = SHARED / "hot-fire" / "images" / "val"
LABEL_STUDIO_TIMEOUT_S = 100.0   # Label Studio's ML_TIMEOUT_PREDICT: slower /predict answers store nothing
IMPORT_BATCH = 1000
PAGE_SIZE = 1000


class BenchFailed(RuntimeError):
    pass


def shipped_deadline() -> float:
    from yolo_backend.settings import Settings

    return next(f.default for f in dataclasses.fields(Settings) if f.name == "predict_deadline_s")


# --- Label Studio reads ---------------------------------------------------------------------------------------
def task_ids(api: harness.LabelStudioAPI, project_id: int) -> list[int]:
    """Every task id of the project (the Data Manager list, page by page)."""
    ids: list[int] = []
    page = 1
    while True:
        response = api.request("GET", "/api/tasks", expect=(200, 404),
                               params={"project": project_id, "page": page, "page_size": PAGE_SIZE,
                                       "fields": "task_only"})
        if response.status_code == 404:  # past the last page
            break
        body = response.json()
        tasks = body["tasks"] if isinstance(body, dict) else body
        ids += [int(t["id"]) for t in tasks]
        if len(tasks) < PAGE_SIZE:
            break
        page += 1
    return ids


def predictions(api: harness.LabelStudioAPI, project_id: int) -> list[dict]:
    body = api.get("/api/predictions/", params={"project": project_id})
    return body["results"] if isinstance(body, dict) else body


def prediction_count(api: harness.LabelStudioAPI, project_id: int) -> int:
    return int(api.project(project_id).get("total_predictions_number") or 0)


# --- processes ------------------------------------------------------------------------------------------------
def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and its descendants (a worker and the work horse it forks per job; RQ puts the
    horse in a session of its own, so the process group would miss it)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])  # after the command: state, ppid, ...
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as handle:
                total += next((int(line.split()[1]) for line in handle if line.startswith("VmRSS:")), 0)
        except OSError:
            continue
    return total / 1024


class Peaks:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def sample(self, processes: list[harness.ManagedProcess]) -> None:
        for process in processes:
            if process.alive():
                self.values[process.name] = max(self.values.get(process.name, 0.0), tree_rss_mb(process.pid))

    def worst(self, prefix: str) -> float:
        return max((v for k, v in self.values.items() if k.startswith(prefix)), default=0.0)


def backend_reply(log_path: Path) -> tuple[int, float]:
    """(tasks answered with a prediction, seconds) of the last /predict, from the backend's log line
    "predicted N task(s) for project P with V in S s"; (-1, nan) when there is none."""
    found = re.findall(r"predicted (\d+) task\(s\) for project \d+ with \S+ in ([\d.]+) s",
                       harness.tail(log_path, 5000))
    return (int(found[-1][0]), float(found[-1][1])) if found else (-1, math.nan)


# --- the run --------------------------------------------------------------------------------------------------
def run(args, work: Path, processes: list, peaks: Peaks, r: dict) -> list[str]:
    """Fills ``r`` with the measurements as they come; returns the problems found at the end."""
    photos = sorted(p for p in Path(args.image_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(photos) < args.images:
        raise BenchFailed(f"{args.image_dir} has {len(photos)} images, --images asks for {args.images}")
    if args.tasks < args.images:
        raise BenchFailed("--tasks must be at least --images (each uploaded image is a task)")
    upload_dir = work / "upload"
    upload_dir.mkdir()
    upload = [Path(shutil.copy(p, upload_dir / p.name)) for p in photos[:args.images]]

    started = time.monotonic()
    label_studio = harness.LabelStudio(work / "label-studio", legacy_tokens=False)
    processes.append(label_studio)
    label_studio.start()
    print(f"Label Studio {label_studio.url} up in {time.monotonic() - started:.0f} s (personal access token)",
          flush=True)
    from yolo_backend.jobs.redis_server import RedisServer

    redis_server = RedisServer(work / "valkey").start()
    processes.append(redis_server)
    api = label_studio.api

    project_id = api.create_project("retrieve predictions bench", harness.FIRE_SMOKE_LABEL_CONFIG)["id"]
    started = time.monotonic()
    uploaded = harness.import_images(api, project_id, upload)
    refs = [api.task(t)["data"]["image"] for t in sorted(uploaded)]
    extra = [{"image": refs[i % len(refs)]} for i in range(args.tasks - len(refs))]
    for start in range(0, len(extra), IMPORT_BATCH):
        api.import_tasks(project_id, extra[start:start + IMPORT_BATCH])
    ids = task_ids(api, project_id)
    if len(ids) != args.tasks:
        raise BenchFailed(f"project {project_id} has {len(ids)} tasks after the import, expected {args.tasks}")
    print(f"project {project_id}: {len(refs)} images uploaded, {len(ids)} tasks in "
          f"{time.monotonic() - started:.0f} s", flush=True)
    # An imported task's image field is an upload URL that Label Studio serves to the key's holder.
    shared_ref = api.task(max(ids))["data"]["image"]
    image = api.request("GET", shared_ref)
    if not image.content.startswith(b"\xff\xd8") and not image.content.startswith(b"\x89PNG"):
        raise BenchFailed(f"GET {shared_ref} with the API key did not answer an image: "
                          f"{image.headers.get('content-type')} {image.content[:80]!r}")

    env = {
        "MODEL_PATH": str(args.weights), "MODEL_DIR": str(work / "models"),
        "IMAGE_CACHE_DIR": str(work / "image-cache"),
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.api_key,
        "REDIS_URL": redis_server.url, "RQ_QUEUE_NAME": "bench-retrieve",
        "IMG_SIZE": str(args.img_size), "TORCH_THREADS": str(args.torch_threads),
        "PREDICT_DEADLINE_S": str(args.deadline), "LOG_LEVEL": "INFO",
    }
    if args.chunk_size:
        env["POOL_CHUNK_SIZE"] = str(args.chunk_size)
    backend, url = harness.start_backend(work / "backend", env)
    processes.append(backend)
    workers = [harness.ManagedProcess(f"rq-worker-{n}", [sys.executable, "-m", "yolo_backend", "worker",
                                                         "--name", f"bench-worker-{n}-{os.getpid()}"],
                                      harness.child_env(env), work / "backend" / f"rq-worker-{n}.log",
                                      cwd=str(REPO)) for n in range(1, args.workers + 1)]
    processes.extend(workers)
    api.connect_ml_backend(project_id, url, "yolov7 retrieve bench")
    watched = [backend, *workers]

    def check_alive() -> None:
        for process in watched:
            if not process.alive():
                raise BenchFailed(f"{process.name} exited with code {process.proc.returncode}\n"
                                  f"{process.log_tail(60)}")

    # "Retrieve Predictions" on every task, as the Data Manager sends it.
    print(f"Retrieve Predictions on {len(ids)} tasks (PREDICT_DEADLINE_S={args.deadline:g})...", flush=True)
    api.timeout = args.timeout  # Label Studio answers only after storing the reply's predictions: can take long
    t0 = time.monotonic()
    api.retrieve_predictions(project_id, ids)
    reply_s = r["reply_s"] = time.monotonic() - t0
    api.timeout = 120.0
    r["tasks"] = len(ids)
    check_alive()
    peaks.sample(watched)
    after = predictions(api, project_id)
    by_reply = r["by_reply"] = sum(1 for p in after if p.get("cluster") is None)
    r["answered"], r["predict_s"] = backend_reply(backend.log_path)
    ls_errors = [line for line in harness.tail(label_studio.process.log_path, 400).splitlines()
                 if "Error occurred" in line or "Read timed out" in line]
    print(f"  Label Studio answered in {reply_s:.1f} s; the backend's /predict took {r['predict_s']:.1f} s and "
          f"answered {r['answered']} task(s) with a prediction; {by_reply} stored from the reply "
          f"({len(after)} in all right after the call)", flush=True)
    if ls_errors:
        print("  Label Studio logged: " + ls_errors[-1][:300], flush=True)
    r["ls_error"] = ls_errors[-1][:300] if ls_errors else None

    serving = requests.get(f"{url}/status", params={"project": project_id}, timeout=30).json()
    version = serving["projects"][0].get("serving_version")
    if not version:
        raise BenchFailed(f"the backend names no serving version: {serving['projects'][0]}")
    pool_expected = by_reply < len(ids)

    # Wait for pool scoring (queued by the deadline leftovers) to store the rest.
    deadline = t0 + args.timeout
    last_print = 0.0
    pool: dict = {}
    all_stored_s = None
    while True:
        check_alive()
        peaks.sample(watched)
        status = requests.get(f"{url}/status", params={"project": project_id}, timeout=30).json()
        pool = status["projects"][0].get("pool") or {}
        r.setdefault("pool_done_at_reply", int(pool.get("done", 0)))
        count = prediction_count(api, project_id)
        now = time.monotonic()
        if pool.get("state") == "failed":
            raise BenchFailed(f"pool scoring failed: {pool}")
        pool_finished = pool.get("state") == "done" and pool.get("version") == version
        if pool_finished:
            r.setdefault("pool_done_s", now - t0)
        if count == len(ids) and (pool_finished or not pool_expected):
            all_stored_s = r["all_stored_s"] = now - t0
            break
        if pool_finished and count != len(ids):
            break  # nothing more will come: the check below says what is wrong
        if now - last_print >= args.print_every:
            last_print = now
            print(f"  {now - t0:6.0f} s: {count} predictions in Label Studio; pool {pool.get('state', '-')} "
                  f"{pool.get('done', 0)}/{pool.get('total', '-')} stored, {pool.get('failed', 0)} failed, "
                  f"{pool.get('chunks_done', 0)}/{pool.get('chunks', '-')} chunks, {pool.get('rate') or 0:.1f}/s",
                  flush=True)
        if now > deadline:
            raise BenchFailed(f"after {args.timeout:.0f} s: {count} of {len(ids)} predictions stored; pool {pool}")
        time.sleep(args.poll)

    # Every task: exactly one prediction of the serving version, with a finite score.
    final = predictions(api, project_id)
    per_task = Counter(int(p["task"]) for p in final if p.get("model_version") == version)
    problems = []
    missing = sorted(set(ids) - set(per_task))
    doubled = sorted(t for t, n in per_task.items() if n != 1)
    other = [p for p in final if p.get("model_version") != version]
    bad_score = [p for p in final if not (isinstance(p.get("score"), (int, float)) and math.isfinite(p["score"]))]
    if len(ids) != args.tasks:
        problems.append(f"{len(ids)} tasks, expected {args.tasks}")
    if missing:
        problems.append(f"{len(missing)} task(s) without a prediction of {version}, e.g. {missing[:10]}")
    if doubled:
        examples = [(t, [(p["id"], p.get("cluster")) for p in final if int(p["task"]) == t]) for t in doubled[:5]]
        problems.append(f"{len(doubled)} task(s) with more than one prediction of {version} (cluster None: stored "
                        f"from the /predict reply; a cluster: by pool scoring); (task, [(prediction id, cluster)]): "
                        f"{examples}")
    if other:
        versions = Counter(p.get("model_version") for p in other)
        problems.append(f"{len(other)} prediction(s) of other versions: {dict(versions)}")
    if bad_score:
        problems.append(f"{len(bad_score)} prediction(s) without a finite score, e.g. "
                        f"{[(p['task'], p.get('score')) for p in bad_score[:5]]}")
    if not r["predict_s"] < LABEL_STUDIO_TIMEOUT_S or r["ls_error"]:
        problems.append(f"the backend's /predict took {r['predict_s']:.1f} s (Label Studio gives up at "
                        f"{LABEL_STUDIO_TIMEOUT_S:.0f} s); Label Studio logged: {r['ls_error']}")
    r.update(pool_stored=int(pool.get("done", 0)) if pool_expected else 0, pool_rate=pool.get("rate"),
             version=version, clusters=len({p.get("cluster") for p in final}), final=len(final))
    if all_stored_s is not None:
        r["pool_phase_s"] = all_stored_s - reply_s
    if problems:
        problems.append(f"pool: {pool}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks in the project, all selected (default 5000)")
    parser.add_argument("--images", type=int, default=50, help="real images uploaded, cycled over the tasks (50)")
    parser.add_argument("--image-dir", default=str(DEFAULT_IMAGES), help="where the images come from (hot-fire val)")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="MODEL_PATH (the shared yolov7-tiny)")
    parser.add_argument("--img-size", type=int, default=320, help="IMG_SIZE (default 320)")
    parser.add_argument("--workers", type=int, default=1, help="RQ workers (default 1)")
    parser.add_argument("--torch-threads", type=int, default=1, help="TORCH_THREADS of backend and workers (1)")
    parser.add_argument("--deadline", type=float, default=shipped_deadline(),
                        help="PREDICT_DEADLINE_S (default: what the product ships, %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=0, help="POOL_CHUNK_SIZE (default: the product's)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for all predictions (3600)")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between progress polls (2)")
    parser.add_argument("--print-every", type=float, default=30.0, help="seconds between progress lines (30)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, data) at the end")
    args = parser.parse_args()
    if not Path(args.weights).is_file():
        print(f"no checkpoint at {args.weights}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="bench-retrieve-"))
    processes: list = []
    peaks = Peaks()
    r: dict = {}
    problems: list[str] = []
    broke = True  # a part failed or time ran out (the log tails help) rather than the final check
    try:
        problems = run(args, work, processes, peaks, r)
        broke = False
    except BenchFailed as exc:
        problems = [str(exc)]
    except Exception as exc:  # a part did not start or answered wrong: say which, with the logs
        problems = [f"{type(exc).__name__}: {exc}"]
    finally:
        if broke:
            for process in processes:  # Label Studio, valkey, backend, workers
                print(process.log_tail(25), file=sys.stderr)
        for process in reversed(processes):
            try:
                process.stop()
            except Exception as exc:
                print(f"stopping {process}: {exc}", file=sys.stderr)
        if args.keep or problems:
            print(f"work folder (logs): {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    def num(key: str, digits: int = 1) -> str:
        value = r.get(key)
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    if "reply_s" in r:
        pool_rate = (r["pool_stored"] - r["pool_done_at_reply"]) / r["pool_phase_s"] \
            if r.get("pool_phase_s") and r.get("pool_stored") else None
        overall = r["tasks"] / r["all_stored_s"] if r.get("all_stored_s") else None
        print()
        print("| tasks | img size | workers | PREDICT_DEADLINE_S | Retrieve Predictions call (s) | "
              "backend /predict (s) | stored by the reply | time to all stored (s) | pool phase (pred/s) | "
              "overall tasks/s | peak worker RSS (MB) | peak backend RSS (MB) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {r['tasks']} | {args.img_size} | {args.workers} | {args.deadline:g} | {num('reply_s')} | "
              f"{num('predict_s')} | {r.get('by_reply', '–')} | {num('all_stored_s', 0)} | "
              f"{'–' if pool_rate is None else f'{pool_rate:.1f}'} | "
              f"{'–' if overall is None else f'{overall:.1f}'} | "
              f"{peaks.worst('rq-worker'):.0f} | {peaks.worst('ml-backend'):.0f} |")
        print(f"\n{os.cpu_count()} CPU(s), TORCH_THREADS={args.torch_threads}. Pool phase: from the call's return "
              f"to all stored ({num('pool_phase_s', 0)} s); the pool run stored {r.get('pool_stored', '–')} "
              f"prediction(s) in all (it rescores the reply's tasks too, for their clusters), its own rate "
              f"{num('pool_rate')} tasks/s; pool scoring done {num('pool_done_s', 0)} s after the call began.")
    if problems:
        print("\nFAILED: " + "\n".join(problems), file=sys.stderr)
        return 1
    print(f"All {r['tasks']} tasks have exactly one prediction of {r['version']} with a finite score "
          f"({r['clusters']} clusters); the backend answered /predict in {r['predict_s']:.1f} s, within Label "
          f"Studio's {LABEL_STUDIO_TIMEOUT_S:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
