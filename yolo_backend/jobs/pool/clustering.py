"""A version's image clusters: fitted once on a sample of the pool (which is then stored), kept in MODEL_DIR so every
worker and every rerun gives a task the same cluster id."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from .. import TrainingError
from .plan import cluster_path, version_seed
from .scorer import PoolScorer

log = logging.getLogger(__name__)

CLUSTER_SAMPLE = 1000        # most tasks the version's centroids are fitted on (scored and stored by the coordinator)
SAMPLE_PER_CLUSTER = 10      # ... and as many as this per cluster (at least a chunk): the rest goes to chunk jobs


def cluster_sample_size(todo: int, wanted: int, chunk: int, video: bool) -> int:
    """How many tasks the coordinator scores to fit ``wanted`` centroids: SAMPLE_PER_CLUSTER each, at least a chunk,
    at most CLUSTER_SAMPLE; in a video project at most 3 chunks (clips are slow to score, and the coordinator's job
    has a timeout too)."""
    most = 3 * chunk if video else CLUSTER_SAMPLE
    return min(most, max(chunk, SAMPLE_PER_CLUSTER * wanted), todo)


def load_or_fit_clusters(scorer: PoolScorer, version: str, todo: list[dict], total: int, stale: dict,
                         report: Callable[[int, int], object]) -> tuple[np.ndarray, list[dict], tuple[int, int]]:
    """The version's centroids (fitted on a sample of ``todo``, which is then stored, when there are none yet);
    returns (centroids, the tasks left to score, (stored, failed) of the sample)."""
    from ...clusters import ClusterModel, auto_cluster_count, fit_centroids

    path = cluster_path(scorer.settings, scorer.project_id, version)
    if path.is_file():
        try:
            return ClusterModel.load(path).centroids, todo, (0, 0)
        except Exception as exc:
            log.warning("cluster centroids %s unreadable (%s): fitting them again", path, exc)
    seed = version_seed(version)
    rng = np.random.default_rng(seed)
    wanted = scorer.settings.pool_clusters or auto_cluster_count(total)
    size = cluster_sample_size(len(todo), wanted, scorer.chunk_size, scorer.video)
    take = sorted(rng.choice(len(todo), size=size, replace=False).tolist()) if todo else []
    sample = scorer.claim(version, [todo[i] for i in take])
    try:
        scored = scorer.score(version, sample)
    except BaseException:
        scorer.unclaim(version, [int(t["id"]) for t in sample])
        raise
    embeddings = [e for _, _, e in scored if e is not None]
    if not embeddings:
        scorer.unclaim(version, [int(t["id"]) for t in sample])
        raise TrainingError(f"project {scorer.project_id}: no image of the {len(sample)} sampled task(s) could be "
                            "had (see the log lines above): nothing to cluster")
    matrix = np.stack(embeddings).astype(np.float32)
    model = ClusterModel(fit_centroids(matrix, min(wanted, len(matrix)), seed=seed), version, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    log.info("project %s: %d clusters for %s fitted on %d image embedding(s)", scorer.project_id,
             len(model.centroids), version, len(matrix))
    counts = scorer.store(version, scored, model.centroids, stale)
    report(*counts)
    chosen = {int(t["id"]) for t in [todo[i] for i in take]}
    return model.centroids, [t for t in todo if int(t["id"]) not in chosen], counts
