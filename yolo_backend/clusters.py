"""Image clusters for Label Studio's uncertainty sampling, and the order in which Label Studio then serves tasks.

Label Studio (1.23, ``projects/functions/next_task.py``) serves the next task of a project with "Uncertainty
sampling" like this: of the tasks whose prediction has the project's ``model_version``, it orders by
``cluster_num_solved`` (how many tasks this annotator already labelled whose prediction ``cluster`` equals the
task's; a labelled task counts with ``Max(predictions__cluster)``), then by prediction ``score`` ascending, and
serves the first. So with a ``cluster`` per prediction an annotator walks through the clusters (one task of each
before a second of any), the most doubtful task of each first; without one, it is the plain lowest score first.

Here the clusters come from image embeddings (the detector's neck outputs averaged over space,
``Detections.embedding``): spherical k-means (k-means++ seeding, then Lloyd iterations on L2-normalised vectors,
cosine similarity), so near-duplicate frames of one scene share a cluster and do not all jump the queue.

- ``auto_cluster_count(n)``: a default k for a pool of n images.
- ``fit_centroids(embeddings, k, seed)``: the centroids, ids ordered deterministically (largest cluster first).
- ``assign_clusters(embeddings, centroids)``: the nearest centroid of each row, a chunk at a time.
- ``ClusterModel``: centroids + model version + seed, saved as ``.npz`` so every worker sharing MODEL_DIR gives
  the same image the same cluster id within one model version.
- ``next_task_order(scores, clusters, solved)`` and ``serve_sequence``: Label Studio's serving rule above, the
  reference the simulator and the tests use.

Numpy and the standard library only (a low layer: the worker, the server and the simulator may all use it).
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable, Optional, Sequence, Union

import numpy as np

_EPS = 1e-12

Scores = Union[Sequence[float], np.ndarray]  # one score per task
_CHUNK = 2048           # rows per block in assignment: 2048 x 896 float64 is 14 MiB, whatever the pool size
_FORMAT = 1             # ClusterModel file format


def auto_cluster_count(n: int) -> int:
    """A default number of clusters for a pool of ``n`` images: ``round(sqrt(n / 2))`` within [2, 100], never
    more than ``n`` (0 for an empty pool).

    Why: the square-root rule of thumb (Mardia et al.) grows k slowly, so clusters hold about ``sqrt(2n)`` images
    each (10 for 50, 45 for 1000, 140 for 10 000): large enough that a cluster is a scene or a camera rather than a
    single photo and its augmented copies, small enough that Label Studio's walk through the clusters (one label
    per cluster per pass) spreads a round of a few dozen labels over many scenes. At least 2, or the rule is plain
    lowest-score-first; at most 100, so one pass over the clusters stays a handful of rounds of labelling.
    """
    if n <= 0:
        return 0
    return int(min(n, max(2, min(100, round(math.sqrt(n / 2))))))


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64); non-finite values count as 0, an all-zero row stays zero."""
    x = np.nan_to_num(np.asarray(embeddings, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (images x features), not of shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > _EPS)


def _nearest(embeddings: np.ndarray, centroids: np.ndarray, chunk: int = _CHUNK,
             normalised: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(index of the most similar centroid, that cosine similarity) per row, ``chunk`` rows at a time. Ties go to
    the lower centroid index."""
    c = normalise(centroids)
    n = len(embeddings)
    labels = np.zeros(n, np.int64)
    best = np.zeros(n, np.float64)
    if not len(c):
        raise ValueError("no centroids")
    for start in range(0, n, max(1, int(chunk))):
        block = np.asarray(embeddings[start:start + chunk])
        block = block.astype(np.float64, copy=False) if normalised else normalise(block)
        if block.shape[1] != c.shape[1]:
            raise ValueError(f"embeddings have {block.shape[1]} features, the centroids {c.shape[1]}")
        sims = block @ c.T
        labels[start:start + len(block)] = np.argmax(sims, axis=1)
        best[start:start + len(block)] = sims[np.arange(len(block)), labels[start:start + len(block)]]
    return labels, best


def assign_clusters(embeddings: np.ndarray, centroids: np.ndarray, chunk: int = _CHUNK) -> np.ndarray:
    """The cluster id (row of ``centroids``) of each embedding: the highest cosine similarity, ties to the lower id.
    Works through ``chunk`` rows at a time, so only a chunk x features block is ever converted and compared."""
    return _nearest(embeddings, centroids, chunk)[0]


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on unit rows: the first centre uniformly, each next one with probability proportional to
    the squared distance to the nearest centre chosen so far. Stops early when every point coincides with a
    centre (fewer distinct points than k). Returns the chosen row indices."""
    n = len(x)
    chosen = [int(rng.integers(n))]
    squared = np.einsum("ij,ij->i", x, x)
    d2 = np.maximum(squared + squared[chosen[0]] - 2.0 * (x @ x[chosen[0]]), 0.0)
    while len(chosen) < k:
        total = float(d2.sum())
        if total <= _EPS:
            break
        # Inverse-CDF sampling with one uniform draw (numerically safe, and independent of how numpy's
        # ``choice`` consumes the generator).
        j = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
        j = min(j, n - 1)
        while d2[j] <= 0.0:   # the draw fell on a zero-width step at the end of the cumulative sum
            j -= 1
        chosen.append(j)
        d2 = np.minimum(d2, np.maximum(squared + squared[j] - 2.0 * (x @ x[j]), 0.0))
    return np.array(chosen, np.int64)


def _means(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit mean direction, member count) of each of the ``k`` clusters; an empty one gets a zero row."""
    sums = np.zeros((k, x.shape[1]), np.float64)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k)
    return normalise(sums), counts


def fit_centroids(embeddings: np.ndarray, k: int, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """Spherical k-means: k-means++ seeding, then up to ``iterations`` Lloyd steps (assign each L2-normalised
    embedding to the most similar centroid, move each centroid to its members' normalised mean).

    Returns unit centroids, float64 (clusters x features), at most ``k`` of them: fewer when the embeddings hold
    fewer distinct directions than ``k`` (``k >= n``, duplicates), never an empty one. A cluster that loses all its
    members during the iterations is re-seeded from the point farthest from its centroid. Row order, so the cluster
    id, is deterministic: the largest cluster first, ties by its lowest member index. The same input and seed give
    the same centroids; never NaN (non-finite inputs count as 0).
    """
    x = normalise(embeddings)
    n = len(x)
    if n == 0:
        raise ValueError("no embeddings to cluster")
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    rng = np.random.default_rng(seed)
    centroids = x[_kmeans_pp(x, min(int(k), n), rng)]
    k = len(centroids)
    previous: Optional[np.ndarray] = None
    for _ in range(max(0, int(iterations))):
        labels, similarity = _nearest(x, centroids, normalised=True)
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if not len(empty) and previous is not None and np.array_equal(labels, previous):
            break   # converged: the means below would be the centroids we already have
        if len(empty):
            # Re-seed each empty cluster with the point worst served by its centroid, and take that point out
            # of its old cluster (a singleton's point is at distance 0, so no cluster is emptied this way while
            # another point is farther).
            distance = 1.0 - similarity
            for cluster in empty:
                j = int(np.argmax(distance))
                if distance[j] <= _EPS:
                    break
                labels[j] = cluster
                distance[j] = -np.inf
        centroids, counts = _means(x, labels, k)
        keep = counts > 0
        if not keep.all():   # only when every point already sits on a centroid: drop the leftovers
            centroids, k = centroids[keep], int(keep.sum())
        previous = labels if keep.all() else None
    labels = _nearest(x, centroids, normalised=True)[0]
    counts = np.bincount(labels, minlength=k)
    first = np.full(k, n, np.int64)
    np.minimum.at(first, labels, np.arange(n))
    order = [c for c in np.lexsort((first, -counts)) if counts[c] > 0]
    return np.ascontiguousarray(centroids[order])


# --- a fitted model on disk ---------------------------------------------------------------------------------------

@dataclass
class ClusterModel:
    """Centroids fitted for one model version (``version``, the Label Studio ``model_version``) with ``seed``.
    Saved next to the version (``.npz``, no pickles), so every worker sharing MODEL_DIR assigns an image the same
    cluster id for as long as that version is served."""

    centroids: np.ndarray
    version: str
    seed: int = 0

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, np.float64)
        if self.centroids.ndim != 2 or not len(self.centroids):
            raise ValueError(f"centroids must be a non-empty 2-D array, not of shape {self.centroids.shape}")
        if not np.isfinite(self.centroids).all():
            raise ValueError("centroids hold NaN or infinity")
        self.version, self.seed = str(self.version), int(self.seed)

    @classmethod
    def fit(cls, embeddings: np.ndarray, version: str, k: Optional[int] = None, seed: int = 0,
            iterations: int = 25) -> "ClusterModel":
        """Fit on ``embeddings`` (k: ``auto_cluster_count`` of their number unless given)."""
        k = auto_cluster_count(len(embeddings)) if k is None else k
        return cls(fit_centroids(embeddings, k, seed, iterations), version, seed)

    @property
    def count(self) -> int:
        return len(self.centroids)

    def assign(self, embeddings: np.ndarray, chunk: int = _CHUNK) -> np.ndarray:
        return assign_clusters(embeddings, self.centroids, chunk)

    def save(self, path: Union[str, Path]) -> Path:
        """Write atomically (a temporary file in the same folder, then renamed): a worker reading it concurrently
        sees the old file or the new one, never half of one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, format=np.int64(_FORMAT), centroids=self.centroids,
                         version=np.array(self.version), seed=np.int64(self.seed))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ClusterModel":
        """Read a file ``save`` wrote; ValueError for anything else (OSError when it cannot be read)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format"]) != _FORMAT:
                    raise ValueError(f"{path}: cluster file format {int(data['format'])}, expected {_FORMAT}")
                return cls(data["centroids"], str(data["version"]), int(data["seed"]))
        except (KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a cluster model file ({exc!r})") from None


# --- Label Studio's serving rule ----------------------------------------------------------------------------------

def solved_counts(labelled_clusters: Iterable[Hashable]) -> dict:
    """``solved_clusters`` for ``next_task_order``: cluster id -> how many labelled tasks hold it."""
    return dict(Counter(labelled_clusters))


def next_task_order(scores: Scores, clusters: Sequence[Hashable],
                    solved_clusters: dict) -> list[int]:
    """The positions of the tasks (``scores`` and ``clusters`` aligned, one per task with a current prediction) in
    the order Label Studio's uncertainty sampling ranks them for one annotator: fewest already-labelled tasks in
    the task's cluster first (``solved_clusters``: cluster -> count, missing = 0), then the lowest score, ties by
    position. A NaN score sorts last. The first of this list is the task Label Studio serves next."""
    values = np.asarray(scores, np.float64).reshape(-1)
    if len(clusters) != values.size:
        raise ValueError(f"{values.size} scores but {len(clusters)} cluster ids")
    solved = np.array([solved_clusters.get(c, 0) for c in clusters], np.int64)
    index = np.arange(values.size)
    return [int(j) for j in np.lexsort((index, values, solved))]


def serve_sequence(scores: Scores, clusters: Sequence[Hashable], solved_clusters: dict,
                   k: int) -> list[int]:
    """The positions of the next ``k`` tasks Label Studio serves one annotator who labels each as it comes: the
    first of ``next_task_order``, then counted as solved in its cluster, again (fewer when the tasks run out)."""
    values = np.asarray(scores, np.float64).reshape(-1)
    clusters = list(clusters)
    solved = dict(solved_clusters)
    remaining = list(range(values.size))
    picked: list[int] = []
    while len(picked) < k and remaining:
        first = remaining[next_task_order(values[remaining], [clusters[j] for j in remaining], solved)[0]]
        picked.append(first)
        remaining.remove(first)
        solved[clusters[first]] = solved.get(clusters[first], 0) + 1
    return picked
