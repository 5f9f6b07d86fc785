"""Issue 14, end to end: pool scoring with a real Label Studio 1.23 (JWT, personal access token), a real
Redis-protocol server and two real RQ workers.

A project of 120 hot-fire images (../shared's, or generated ones) is connected and trained once (a few annotations,
training on submit). After the publish the worker scores the whole pool in chunk jobs that both workers share:
every task then has exactly one prediction of the new version, with a finite score and a cluster; the project's
sampling is uncertainty sampling (UNCERTAINTY_SAMPLING=true) and Label Studio's own ``/api/projects/{id}/next``
serves the tasks in the order its rule gives for the stored scores and clusters (least-solved cluster first, then
the lowest score), which is not simply the score order.
"""
from __future__ import annotations

import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests

from . import harness
from .test_training_loop import yolo_result

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

POOL_IMAGES = 120
ANNOTATED = 8
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def pool_images(shared_data, tmp_path_factory) -> dict[Path, list[dict]]:
    root = shared_data / "hot-fire"
    photos = sorted((root / "images" / "val").glob("*.jpg"))
    assert len(photos) >= POOL_IMAGES, f"needs {POOL_IMAGES} hot-fire validation images in {root}"
    folder = tmp_path_factory.mktemp("pool-images")
    return {Path(shutil.copy(p, folder / p.name)): yolo_result(root / "labels" / "val" / (p.stem + ".txt"))
            for p in photos[:POOL_IMAGES]}


def _next_by_rule(predictions: dict[int, dict], unlabelled: set[int], solved: list[int]) -> int:
    """Label Studio 1.23's uncertainty sampling for one annotator, from the stored predictions: the task of the
    cluster this annotator solved least, then the lowest score (ties: the lowest task id)."""
    from yolo_backend.clusters import next_task_order

    candidates = sorted(unlabelled)
    counts = Counter(predictions[t]["cluster"] for t in solved)
    order = next_task_order([predictions[t]["score"] for t in candidates],
                            [predictions[t]["cluster"] for t in candidates], dict(counts))
    return candidates[order[0]]


@pytest.mark.parametrize("label_studio", ["jwt"], indirect=True)
def test_pool_scoring_clusters_and_uncertainty_sampling(label_studio, redis_server, pool_images, detector_checkpoint,
                                                        tmp_path_factory):
    from redis import Redis
    from rq import Queue
    from rq.job import Job
    from rq.registry import FinishedJobRegistry

    api = label_studio.api
    project_id = api.create_project("pool scoring e2e", harness.FIRE_SMOKE_LABEL_CONFIG)["id"]
    tasks = harness.import_images(api, project_id, list(pool_images))
    assert len(tasks) == POOL_IMAGES
    by_name = {path.name: path for path in pool_images}

    workdir = tmp_path_factory.mktemp("pool-backend")
    queue_name = "e2e-pool"
    env = {
        "MODEL_PATH": str(detector_checkpoint), "MODEL_DIR": str(workdir / "models"),
        "IMAGE_CACHE_DIR": str(workdir / "image-cache"),
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.api_key,
        "REDIS_URL": redis_server.url, "RQ_QUEUE_NAME": queue_name,
        "IMG_SIZE": "320", "TORCH_THREADS": "1", "LOG_LEVEL": "INFO",
        "TRAIN_IMG_SIZE": "320", "TRAIN_EPOCHS": "1", "TRAIN_TIME_BUDGET_S": "30", "TRAIN_BATCH_SIZE": "4",
        "FORCE_PUBLISH": "true", "POOL_CHUNK_SIZE": "15", "POOL_CLUSTERS": "3", "UNCERTAINTY_SAMPLING": "true",
        "MIN_ANNOTATIONS_FIRST_TRAINING": str(ANNOTATED),  # the one training below sees all of them
    }
    backend, url = harness.start_backend(workdir, env)
    workers = [harness.ManagedProcess(f"rq-worker-{n}", [sys.executable, "-m", "yolo_backend", "worker"],
                                      harness.child_env(env), workdir / f"rq-worker-{n}.log",
                                      cwd=str(harness.REPO_ROOT)) for n in (1, 2)]
    try:
        api.connect_ml_backend(project_id, url, "yolov7 pool")
        annotated = sorted(tasks)[:ANNOTATED]
        for task_id in annotated:
            api.create_annotation(task_id, pool_images[by_name[tasks[task_id].name]])
        # Train once (what Label Studio's "Start Training" sends), so one version is published and scored.
        queued = requests.post(f"{url}/webhook", json={"action": "START_TRAINING", "project": {"id": project_id}},
                               timeout=10).json()
        assert queued.get("job"), queued

        def pool_done():
            for worker in workers:
                assert worker.alive(), f"{worker.name} died\n{worker.log_tail(80)}"
            status = requests.get(f"{url}/status", params={"project": project_id}, timeout=10).json()
            pool = status["projects"][0].get("pool") or {}
            assert pool.get("state") != "failed", pool
            return pool if pool.get("state") == "done" and pool.get("version", "").startswith("v") else None

        pool = harness.wait_until(pool_done, TIMEOUT_S, interval=2, message="pool scoring of the new version done")
        version = pool["version"]
        assert pool["done"] == pool["total"] == POOL_IMAGES and pool["failed"] == 0, pool

        # Every task: exactly one prediction of the new version, finite score, a cluster.
        project = api.project(project_id)
        assert project["model_version"] == version
        assert project["sampling"] == "Uncertainty sampling"
        stored = api.get(f"/api/predictions/?project={project_id}")
        of_version = [p for p in stored if p["model_version"] == version]
        per_task = Counter(p["task"] for p in of_version)
        assert set(per_task) == set(tasks) and set(per_task.values()) == {1}, per_task
        assert all(p["cluster"] is not None and math.isfinite(p["score"]) for p in of_version)
        assert len({p["cluster"] for p in of_version}) >= 2
        assert not [p for p in stored if p["cluster"] is not None and p["model_version"] != version]

        # The chunks were shared by both workers.
        connection = Redis.from_url(redis_server.url)
        registry = FinishedJobRegistry(queue=Queue(queue_name, connection=connection))
        chunk_workers = {Job.fetch(j, connection=connection).worker_name for j in registry.get_job_ids()
                         if (Job.fetch(j, connection=connection).meta or {}).get("kind") == "pool-chunk"}
        assert len(chunk_workers) == 2, chunk_workers

        # A rerun adds nothing (idempotent).
        again = requests.post(f"{url}/score_pool", json={"project": project_id}, timeout=10)
        assert again.status_code == 202, again.text
        harness.wait_until(lambda: (pool_done() or {}).get("started_iso") != pool["started_iso"], 300, interval=2,
                           message="the rerun to finish")
        assert len([p for p in api.get(f"/api/predictions/?project={project_id}")
                    if p["model_version"] == version]) == POOL_IMAGES

        # Label Studio's next task follows its cluster rule on our scores and clusters.
        predictions = {p["task"]: p for p in of_version}
        unlabelled = set(tasks) - set(annotated)
        solved = list(annotated)
        not_score_order = 0
        for step in range(6):
            expected = _next_by_rule(predictions, unlabelled, solved)
            served = api.get(f"/api/projects/{project_id}/next")["id"]
            lowest = min(unlabelled, key=lambda t: (predictions[t]["score"], t))
            print(f"step {step}: served {served} (cluster {predictions[served]['cluster']}), rule {expected}, "
                  f"lowest score {lowest} (cluster {predictions[lowest]['cluster']}); solved per cluster "
                  f"{dict(Counter(predictions[t]['cluster'] for t in solved))}")
            assert served == expected
            not_score_order += served != lowest
            api.create_annotation(served, pool_images[by_name[tasks[served].name]])
            unlabelled.discard(served)
            solved.append(served)
        assert not_score_order >= 1, "the clusters never changed the order: every served task was the lowest score"
    finally:
        for worker in workers:
            worker.stop()
        backend.stop()
