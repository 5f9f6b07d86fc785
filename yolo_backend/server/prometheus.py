"""Prometheus metrics of one app (``GET /prometheus``), with prometheus-client.

Counted in this process, as requests are served:
    yolo_backend_predict_seconds               histogram of /predict request durations
    yolo_backend_predict_tasks_total{outcome}  tasks sent to /predict: predicted, or failed (the request answered
                                               an error, so the task got no prediction)
    yolo_backend_predict_images_total{outcome} images of the predicted tasks: predicted, or failed (the image could
                                               not be downloaded or decoded; the task got an empty prediction)
Read from shared state when scraped (so every server process reports the same numbers):
    yolo_backend_training_jobs{project,outcome}       training runs in the project's history, by outcome
    yolo_backend_training_progress_ratio{project}     the running job's fraction done (0..1)
    yolo_backend_training_queue_jobs{state}           RQ jobs queued / started / finished / failed
    yolo_backend_training_pending_requests            training requests saved while Redis was down
    yolo_backend_redis_up                             1 when the training queue's Redis answers
    yolo_backend_serving_version_info{project,version} 1 for the version each project is served with
    yolo_backend_serving_version_number{project}      its number N (v<N>-...), -1 for a checkpoint by path
    yolo_backend_annotation_tasks{project,version}    annotated tasks the newest training run read, by the version
                                                      of the prediction they started from ("no prediction": none)
    yolo_backend_annotation_boxes{project,version,outcome}  their boxes: accepted, adjusted, deleted, drawn
    yolo_backend_annotation_median_seconds{project,version} median Label Studio lead_time per task
    (recounted by each run over all annotations, so gauges: a deleted annotation makes them go down)

Each app has its own ``CollectorRegistry`` (tests make many apps in one process). With several gunicorn workers
the request counters are per worker process; run one worker (the default) or scrape each.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Optional

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..jobs.history import OUTCOMES, read_runs
from . import status as dashboard_status
from .effort import NO_PREDICTION, newest_effort

log = logging.getLogger(__name__)

# Seconds: a small batch on a CPU answers in well under a second, a large one or a cold model in tens.
PREDICT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_VERSION_NUMBER = re.compile(r"^v(\d+)-")


def image_failed(prediction: dict) -> bool:
    """A prediction made for a task whose image could not be read (``labelstudio.results.failed_task_prediction``):
    an item without "result", or, as older versions answer, an empty result without a score (a readable image
    without boxes still gets a score)."""
    if not isinstance(prediction, dict):
        return False
    return "result" not in prediction or (not prediction["result"] and prediction.get("score") is None)


class PredictMetrics:
    """The request-side metrics of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram("yolo_backend_predict_seconds", "Duration of /predict requests (all outcomes)",
                                 buckets=PREDICT_BUCKETS, registry=self.registry)
        self.tasks = Counter("yolo_backend_predict_tasks", "Tasks sent to /predict, by outcome", ["outcome"],
                             registry=self.registry)
        self.images = Counter("yolo_backend_predict_images", "Images of predicted tasks, by outcome", ["outcome"],
                              registry=self.registry)
        for outcome in ("predicted", "failed"):  # present from the start, so rates work from the first scrape
            self.tasks.labels(outcome)
            self.images.labels(outcome)

    def predicted(self, predictions: list) -> None:
        """A /predict request answered ``predictions`` (one per task)."""
        failed = sum(1 for p in predictions if image_failed(p))
        self.tasks.labels("predicted").inc(len(predictions))
        self.images.labels("predicted").inc(len(predictions) - failed)
        self.images.labels("failed").inc(failed)

    def request_failed(self, tasks: int) -> None:
        self.tasks.labels("failed").inc(tasks)

    def install(self, app: Flask) -> None:
        """Time every /predict and count the tasks of the ones that answered an error."""

        @app.before_request
        def _predict_started() -> None:
            if request.endpoint == "ml_backend.predict":
                g.predict_started = time.perf_counter()

        @app.after_request
        def _predict_finished(response: Response) -> Response:
            started = g.pop("predict_started", None)
            if started is None:
                return response
            self.latency.observe(time.perf_counter() - started)
            if response.status_code >= 400:
                self.request_failed(_task_count())
            return response


def _task_count() -> int:
    """Tasks in the current request's body (0 when it is not the JSON /predict expects)."""
    try:
        body = json.loads(request.get_data(cache=True) or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError, HTTPException):  # HTTPException: body over the limit
        return 0
    tasks = body.get("tasks") if isinstance(body, dict) else None
    return len(tasks) if isinstance(tasks, list) else 0


class StateCollector:
    """Training and serving state, read when Prometheus scrapes."""

    def __init__(self, context) -> None:
        self.context = context

    def describe(self):
        return []  # collected on demand only: describing would read Redis at registration time

    def collect(self):
        context = self.context
        projects = dashboard_status.known_projects(context)
        jobs = GaugeMetricFamily("yolo_backend_training_jobs", "Training runs recorded in the project's history, "
                                 "by outcome", labels=["project", "outcome"])
        progress = GaugeMetricFamily("yolo_backend_training_progress_ratio", "Fraction done of the project's "
                                     "running training job", labels=["project"])
        info = GaugeMetricFamily("yolo_backend_serving_version_info", "The version a project is served with",
                                 labels=["project", "version"])
        number = GaugeMetricFamily("yolo_backend_serving_version_number", "Number N of the served version "
                                   "v<N>-... (-1: a checkpoint given by path)", labels=["project"])
        pool_tasks = GaugeMetricFamily("yolo_backend_pool_scoring_tasks", "Tasks of the project's newest "
                                       "pool-scoring run, by state (done, failed, left, total)",
                                       labels=["project", "version", "state"])
        pool_rate = GaugeMetricFamily("yolo_backend_pool_scoring_rate", "Tasks scored per second by the project's "
                                      "pool-scoring run", labels=["project"])
        for project_id in projects:
            label = str(project_id)
            try:
                pool = dashboard_status.pool_progress(context, project_id)
            except Exception as exc:  # a scrape must not fail on one project
                log.debug("pool scoring status of project %s: %s", project_id, exc)
                pool = None
            if pool:
                for state in ("done", "failed", "left", "total"):
                    pool_tasks.add_metric([label, pool.get("version") or "", state], pool.get(state) or 0)
                pool_rate.add_metric([label], pool.get("rate") or 0.0)
            counts = dict.fromkeys(OUTCOMES, 0)
            for run in read_runs(context.settings.model_dir, project_id):
                counts[run["outcome"]] += 1
            for outcome, count in counts.items():
                jobs.add_metric([label, outcome], count)
            version, _ = dashboard_status.serving_version(context, project_id)
            if version:
                info.add_metric([label, version], 1)
                match = _VERSION_NUMBER.match(version)
                number.add_metric([label], int(match.group(1)) if match else -1)
            fraction = self._running_fraction(project_id)
            if fraction is not None:
                progress.add_metric([label], fraction)
        yield from (jobs, progress, info, number, pool_tasks, pool_rate)
        yield from self._effort(projects)
        yield from self._queue()

    def _effort(self, projects: list[int]):
        tasks = GaugeMetricFamily("yolo_backend_annotation_tasks", "Annotated tasks the newest training run read, "
                                  "by the model version of the prediction they started from",
                                  labels=["project", "version"])
        boxes = GaugeMetricFamily("yolo_backend_annotation_boxes", "Boxes of those tasks by outcome: predicted and "
                                  "accepted, adjusted, deleted; or drawn", labels=["project", "version", "outcome"])
        seconds = GaugeMetricFamily("yolo_backend_annotation_median_seconds", "Median Label Studio lead_time per "
                                    "task", labels=["project", "version"])
        for project_id in projects:
            found, _ = newest_effort(self.context.settings, project_id)
            for summary in found:
                labels = [str(project_id), summary.version if summary.version is not None else NO_PREDICTION]
                tasks.add_metric(labels, summary.tasks)
                for outcome in ("accepted", "adjusted", "deleted", "drawn"):
                    boxes.add_metric([*labels, outcome], getattr(summary, outcome))
                if summary.median_seconds is not None:
                    seconds.add_metric(labels, summary.median_seconds)
        yield from (tasks, boxes, seconds)

    def _running_fraction(self, project_id: int) -> Optional[float]:
        try:
            job, training = dashboard_status.current_job(self.context, project_id)
        except Exception as exc:  # a scrape must not fail on one project
            log.debug("training status of project %s: %s", project_id, exc)
            return None
        if not training.get("is_training"):
            return None
        state = dashboard_status.job_progress(job, self.context.settings.train_time_budget_s) or {}
        return state.get("fraction")

    def _queue(self):
        queue = dashboard_status.queue_status(self.context)
        if queue is None:
            return
        up = GaugeMetricFamily("yolo_backend_redis_up", "1 when the training queue's Redis answers")
        up.add_metric([], 1 if queue.get("redis") == "up" else 0)
        yield up
        pending = GaugeMetricFamily("yolo_backend_training_pending_requests",
                                    "Training requests saved while Redis was unreachable")
        pending.add_metric([], queue.get("pending_requests") or 0)
        yield pending
        if queue.get("redis") == "up":
            states = GaugeMetricFamily("yolo_backend_training_queue_jobs", "RQ training jobs by state",
                                       labels=["state"])
            for state in ("queued", "started", "finished", "failed"):
                states.add_metric([state], queue.get(state) or 0)
            yield states


def exposition(metrics: PredictMetrics) -> Response:
    return Response(generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
