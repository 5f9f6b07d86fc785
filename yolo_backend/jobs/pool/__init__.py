"""Pool scoring: one prediction of the serving version for every task of a project (regions, task score and an
image cluster), stored in Label Studio, so that its Data Manager sorts, and its uncertainty sampling serves, by them.

A run for (project, version):
1. the coordinator (``run_pool_job``) lists the project's tasks and predictions, skips tasks that already have a
   prediction of this version with a cluster, and, once per version, fits the cluster centroids on a sample of the
   pool (saved in MODEL_DIR, so every worker and every rerun gives a task the same cluster id); it scores and
   stores that sample itself, then queues the rest as chunk jobs (``run_pool_chunk``, POOL_CHUNK_SIZE tasks each) on
   the same RQ queue, so every worker listening shares the pool;
2. a chunk job claims its tasks (a Redis set per version: a retried or doubled chunk stores no second prediction),
   scores them a few batches at a time (boxes and embedding from one forward pass; never the whole pool in
   memory), stores one prediction per task through ``/api/predictions`` (the only call that keeps ``cluster``), and
   deletes the task's stale predictions: this version's without a cluster (stored from ``/predict`` replies or by
   the version switch) and, unless KEEP_OLD_PREDICTIONS, the backend's older versions' (Label Studio takes the
   ``Max`` cluster over all of a solved task's predictions); predictions it did not make are never touched;
3. a chunk of a version that no longer serves the project stops at once: the newer version's run covers it;
4. the job that completes the run lists the predictions once more and deletes the stale ones stored since the plan
   (Label Studio stores a ``/predict`` reply after it was sent; a run started by that reply's deadline leftovers
   also waits for it to be stored before it plans).

Progress (done, failed, total, chunks, rate, ETA) is a Redis hash per project, read by ``/status``, the dashboard
and ``/prometheus``. Without Redis (``score-pool --here``) the run goes through every chunk in process.

Modules: ``plan`` (which predictions a task needs), ``progress`` (the run's state in Redis), ``scorer`` (score and store
tasks), ``clustering`` (a version's centroids), ``run`` (coordinator and chunk), ``queueing`` (RQ entry points; RQ
jobs name ``yolo_backend.jobs.pool.run_pool_job`` / ``run_pool_chunk``, re-exported here).
"""

from .clustering import CLUSTER_SAMPLE, load_or_fit_clusters
from .plan import cluster_path, plan, stale_of_done_tasks, version_seed
from .progress import RunStatus, queued_run, read_status
from .queueing import COORDINATOR_FUNCTION, enqueue_pool_run, run_pool_chunk, run_pool_job
from .run import CHUNK_FUNCTION, score_chunk, score_project
from .scorer import SLICE, PoolScorer, Superseded

__all__ = ["CHUNK_FUNCTION", "CLUSTER_SAMPLE", "COORDINATOR_FUNCTION", "SLICE", "PoolScorer", "RunStatus",
           "Superseded", "cluster_path", "enqueue_pool_run", "load_or_fit_clusters", "plan", "queued_run",
           "read_status", "run_pool_chunk", "run_pool_job", "score_chunk", "score_project", "stale_of_done_tasks",
           "version_seed"]
