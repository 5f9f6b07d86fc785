"""Image clusters (spherical k-means on embeddings) and Label Studio's uncertainty-sampling order, on hand-made
inputs."""

from __future__ import annotations

import numpy as np
import pytest

from yolo_backend.clusters import (ClusterModel, assign_clusters, auto_cluster_count, fit_centroids,
                                   next_task_order, serve_sequence, solved_counts)


def _blobs(sizes=(30, 20, 10), dim=16, spread=0.05, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Well separated blobs: each around its own axis direction (orthogonal, so cosine-far apart), shuffled."""
    rng = np.random.default_rng(seed)
    points, truth = [], []
    for b, size in enumerate(sizes):
        centre = np.zeros(dim)
        centre[b] = 1.0
        points.append(centre + rng.normal(scale=spread, size=(size, dim)))
        truth += [b] * size
    order = rng.permutation(sum(sizes))
    return np.concatenate(points)[order] * rng.uniform(0.5, 3.0, size=(sum(sizes), 1)), np.array(truth)[order]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --- k-means ----------------------------------------------------------------------------------------------------

def test_auto_cluster_count():
    assert auto_cluster_count(0) == 0
    assert auto_cluster_count(1) == 1 and auto_cluster_count(2) == 2  # never more than n
    assert auto_cluster_count(10) == 2       # at least 2
    assert auto_cluster_count(1000) == 22
    assert auto_cluster_count(10_000) == 71
    assert auto_cluster_count(1_000_000) == 100  # at most 100


def test_well_separated_blobs_are_recovered_largest_first():
    x, truth = _blobs()
    centroids = fit_centroids(x, 3, seed=0)
    assert centroids.shape == (3, 16)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0)
    labels = assign_clusters(x, centroids)
    assert _same_partition(labels, truth)
    # ids ordered by size: the 30-image blob is cluster 0, the 10-image blob cluster 2
    assert [int((labels == c).sum()) for c in range(3)] == [30, 20, 10]
    for seed in range(1, 6):   # any seeding finds them
        assert _same_partition(assign_clusters(x, fit_centroids(x, 3, seed=seed)), truth)


def test_deterministic_for_a_seed():
    x = np.random.default_rng(3).normal(size=(200, 8))
    a, b = fit_centroids(x, 7, seed=5), fit_centroids(x, 7, seed=5)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, fit_centroids(x, 7, seed=6))


def test_equal_sized_clusters_are_numbered_by_their_first_member():
    x, _ = _blobs(sizes=(10, 10, 10), seed=1)
    labels = assign_clusters(x, fit_centroids(x, 3, seed=4))
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(3)]
    assert firsts == sorted(firsts) and firsts[0] == 0


def test_k_larger_than_the_pool_and_identical_points():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    centroids = fit_centroids(x, 10)
    assert len(centroids) == 3   # at most one per point
    assert sorted(assign_clusters(x, centroids).tolist()) == [0, 1, 2]
    same = np.tile([[0.3, -0.2, 0.9]], (12, 1))
    centroids = fit_centroids(same, 4)
    assert len(centroids) == 1 and np.isfinite(centroids).all()
    assert assign_clusters(same, centroids).tolist() == [0] * 12
    # duplicates of two distinct points (one scaled: same direction): two clusters, never NaN
    dup = np.array([[1.0, 0.0]] * 5 + [[0.0, 2.0]] * 3 + [[0.0, 1.0]] * 2)
    centroids = fit_centroids(dup, 5, seed=2)
    assert len(centroids) == 2 and np.isfinite(centroids).all()
    assert assign_clusters(dup, centroids).tolist() == [0] * 5 + [1] * 5
    # zero and non-finite rows count as zero vectors: finite centroids all the same
    odd = np.array([[0.0, 0.0], [np.nan, 1.0], [1.0, 0.0], [np.inf, 0.0]])
    assert np.isfinite(fit_centroids(odd, 3)).all()
    with pytest.raises(ValueError):
        fit_centroids(np.zeros((0, 4)), 2)
    with pytest.raises(ValueError):
        fit_centroids(x, 0)


def test_empty_clusters_are_reseeded(monkeypatch):
    from yolo_backend import clusters

    # Seed both centres on two copies of one point: the second centre ties with the first everywhere and loses
    # every point (ties go to the lower id), so it must be re-seeded from the farthest point, the other blob.
    x, truth = _blobs(sizes=(15, 10), dim=8, seed=2)
    x = np.concatenate([x[:1], x])
    truth = np.concatenate([truth[:1], truth])
    monkeypatch.setattr(clusters, "_kmeans_pp", lambda points, k, rng: np.array([0, 1]))
    centroids = fit_centroids(x, 2)
    assert len(centroids) == 2 and np.isfinite(centroids).all()
    assert _same_partition(assign_clusters(x, centroids), truth)
    monkeypatch.undo()
    # k above the number of blobs: every returned centroid has members, ids by size
    x, _ = _blobs(sizes=(15, 15, 15, 15), dim=8, seed=2)
    centroids = fit_centroids(x, 6, seed=0)
    counts = np.bincount(assign_clusters(x, centroids), minlength=len(centroids))
    assert len(centroids) == 6 and (counts > 0).all()
    assert list(counts) == sorted(counts, reverse=True)


def test_chunked_assignment_equals_unchunked():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(1003, 32)).astype(np.float32)
    centroids = fit_centroids(x[:300], 12, seed=1)
    full = np.argmax((x / np.linalg.norm(x, axis=1, keepdims=True)) @ centroids.T, axis=1)
    for chunk in (1, 7, 256, 5000):
        assert np.array_equal(assign_clusters(x, centroids, chunk=chunk), full)


def test_a_saved_model_gives_the_same_ids(tmp_path):
    x, _ = _blobs(sizes=(12, 9, 5), seed=3)
    model = ClusterModel.fit(x, "project-1-v3", k=3, seed=7)
    path = model.save(tmp_path / "versions" / "v3" / "clusters.npz")
    loaded = ClusterModel.load(path)
    assert loaded.version == "project-1-v3" and loaded.seed == 7 and loaded.count == 3
    assert np.array_equal(loaded.centroids, model.centroids)
    assert np.array_equal(loaded.assign(x), model.assign(x))
    # refitting with the same seed gives the same ids (a second worker, another process)
    assert np.array_equal(ClusterModel.fit(x, "project-1-v3", k=3, seed=7).assign(x), model.assign(x))
    assert [p.name for p in path.parent.iterdir()] == ["clusters.npz"]   # no temporary file left
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError):
        ClusterModel.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", centroids=np.ones((2, 2)))
    with pytest.raises(ValueError):
        ClusterModel.load(tmp_path / "other.npz")
    with pytest.raises(ValueError):
        ClusterModel(np.full((2, 2), np.nan), "v")


# --- Label Studio's order ---------------------------------------------------------------------------------------

def test_next_task_order_is_label_studios_rule():
    scores = [0.5, 0.1, 0.3, 0.9, 0.2, 0.1]
    clusters = [0, 0, 1, 1, 2, 2]
    # nothing labelled: lowest score first, ties by position
    assert next_task_order(scores, clusters, {}) == [1, 5, 4, 2, 0, 3]
    # cluster 2 holds 2 labels and cluster 0 one: cluster 1's tasks first, then cluster 0's, then cluster 2's
    assert next_task_order(scores, clusters, {2: 2, 0: 1}) == [2, 3, 1, 0, 5, 4]
    assert solved_counts([2, 0, 2]) == {2: 2, 0: 1}
    # a cluster nobody labelled counts 0 even when others are unknown to the count
    assert next_task_order([0.4, 0.6], [7, 8], {7: 1})[0] == 1
    with pytest.raises(ValueError):
        next_task_order([0.1], [0, 1], {})


def test_serve_sequence_walks_through_the_clusters():
    scores = [0.1, 0.2, 0.3, 0.8, 0.9]
    clusters = [0, 0, 0, 1, 2]
    # one annotator labels each task as it comes: one of each cluster, then the next pass
    assert serve_sequence(scores, clusters, {}, 4) == [0, 3, 4, 1]
    assert serve_sequence(scores, clusters, {1: 2, 2: 2}, 4) == [0, 1, 2, 3]
    assert serve_sequence(scores, clusters, {}, 10) == [0, 3, 4, 1, 2]
    # it is, step by step, the first of next_task_order given what was labelled so far
    rng = np.random.default_rng(0)
    s, c = rng.random(40), rng.integers(0, 5, size=40).tolist()
    picked, solved = serve_sequence(s, c, {3: 1}, 15), {3: 1}
    remaining = list(range(40))
    for j in picked:
        assert j == remaining[next_task_order(s[remaining], [c[i] for i in remaining], solved)[0]]
        remaining.remove(j)
        solved[c[j]] = solved.get(c[j], 0) + 1
