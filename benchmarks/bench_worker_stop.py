"""How long a training worker takes to stop while a job runs: `serve`'s stop (SIGTERM, then SIGTERM again 3 s
later: RQ's cold shutdown) against a work horse busy with ``time.sleep(600)``, timed from the second SIGTERM to the
worker's exit, for ``python -m yolo_backend worker`` and a plain ``rq worker``, on an embedded broker.

A plain rq 3.0 worker with redis-py 8 hangs 60 s in about half the stops on a busy machine (its pubsub thread reads
its own UNSUBSCRIBE reply before it is told to end; see jobs/worker.py); ``--hogs 2`` makes a 2-core machine busy.

    .venv/bin/python benchmarks/bench_worker_stop.py --runs 10 --hogs 2 [--workers ours,plain]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from redis import Redis  # noqa: E402
from rq import Queue  # noqa: E402
from rq.job import Job  # noqa: E402

from yolo_backend.jobs.redis_server import RedisServer  # noqa: E402

WARM_S = 3.0     # serve's WORKER_WARM_S
HANG_S = 90.0    # a worker still running this long after the second SIGTERM is killed and counted as such


def worker_command(which: str, url: str) -> list[str]:
    if which == "plain":
        return [str(Path(sys.executable).parent / "rq"), "worker", "-u", url, "default"]
    return [sys.executable, "-m", "yolo_backend", "worker"]


def stop_once(which: str, url: str, connection: Redis) -> float:
    env = {**os.environ, "REDIS_URL": url, "LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen(worker_command(which, url), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        job = Queue("default", connection=connection).enqueue("time.sleep", 600, job_timeout=900)
        while Job.fetch(job.id, connection=connection).get_status() != "started":
            time.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        time.sleep(WARM_S)
        worker.send_signal(signal.SIGTERM)
        began = time.monotonic()
        worker.wait(HANG_S)
        return time.monotonic() - began
    except subprocess.TimeoutExpired:
        return HANG_S
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)  # its own session: the worker and its horse
            worker.wait()
        connection.flushdb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--hogs", type=int, default=0, help="busy-loop processes to run meanwhile")
    parser.add_argument("--workers", default="ours,plain", help="comma-separated: ours, plain")
    args = parser.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.hogs)]
    server = RedisServer(tempfile.mkdtemp(prefix="bench-worker-stop-")).start()
    try:
        connection = Redis.from_url(server.url)
        print(f"{'worker':8} {'runs':>4} {'median s':>9} {'max s':>7} {'over 10 s':>9}")
        for which in args.workers.split(","):
            times = [stop_once(which, server.url, connection) for _ in range(args.runs)]
            print(f"{which:8} {len(times):4d} {statistics.median(times):9.2f} {max(times):7.2f} "
                  f"{sum(t > 10 for t in times):9d}", flush=True)
    finally:
        server.stop()
        for hog in hogs:
            hog.kill()
            hog.wait()


if __name__ == "__main__":
    main()
