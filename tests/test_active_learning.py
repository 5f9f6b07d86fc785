"""Task score ordering: low = label first."""

import numpy as np
import pytest

from yolo_backend.active_learning import (
    class_margin_uncertainty,
    decision_probability,
    detection_uncertainty,
    task_score,
)
from yolo_backend.yolov7.detections import Detections

T = 0.25


def dets(scores, class_probs=None, names=("fire", "smoke")):
    scores = np.asarray(scores, np.float32)
    n = len(scores)
    if class_probs is None:
        class_probs = np.tile(np.array([[0.95, 0.02]], np.float32), (n, 1))
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1))
    probs = np.asarray(class_probs, np.float32).reshape(n, len(names))
    return Detections(boxes, scores, np.zeros(n, np.int64), scores, probs, 100, 100, names)


def score(d, strategy="uncertainty"):
    return task_score(d, strategy, threshold=T, floor=0.05)


def test_threshold_is_the_most_uncertain_point():
    assert decision_probability(np.array([T]), T)[0] == pytest.approx(0.5)
    u = detection_uncertainty(np.array([0.06, 0.15, T, 0.5, 0.95]), np.tile([[1.0, 0.0]], (5, 1)), T)
    assert u[2] == pytest.approx(1.0)
    assert u[1] > u[0] and u[3] > u[4] and u[2] > u[3]


def test_near_threshold_images_come_first():
    near = score(dets([0.27]))
    sure_fire = score(dets([0.95]))
    faint = score(dets([0.06]))
    negative = score(dets([]))
    assert near < faint < negative
    assert near < sure_fire < negative
    assert 0.0 <= near < 0.05 and negative == 1.0


def test_negative_images_do_not_come_first():
    # A fire/smoke set has many empty frames: they must sort after images with anything doubtful on them.
    images = {"empty": dets([]), "doubtful": dets([0.2]), "confident": dets([0.97, 0.9])}
    order = sorted(images, key=lambda k: score(images[k]))
    assert order[0] == "doubtful" and order[-1] == "empty"


def test_hidden_detections_count():
    # The shown box is confident, but a hidden one sits just below the threshold: the image is uncertain.
    assert score(dets([0.95, 0.22])) < score(dets([0.95]))


def test_most_uncertain_detection_decides():
    assert score(dets([0.95, 0.9, 0.26])) == pytest.approx(score(dets([0.26])))


def test_class_confusion_counts_for_likely_objects():
    clear = dets([0.9], [[0.95, 0.05]])
    confused = dets([0.9], [[0.5, 0.48]])
    assert score(confused) < score(clear)
    assert class_margin_uncertainty(np.array([[0.5, 0.5]]))[0] == pytest.approx(1.0)
    assert class_margin_uncertainty(np.array([[0.9]]))[0] == 0.0  # one class: no confusion possible


def test_floor_ignores_tiny_detections():
    assert score(dets([0.01, 0.02])) == 1.0


def test_classic_strategies():
    d = dets([0.9, 0.5, 0.1])
    assert score(d, "max_confidence") == pytest.approx(0.9)
    assert score(d, "mean_confidence") == pytest.approx(0.7)
    assert score(d, "count") == 2.0
    assert score(dets([]), "max_confidence") == 0.0
    with pytest.raises(ValueError, match="unknown"):
        score(d, "random")


def test_scores_stay_in_range():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(0, 6))
        s = task_score(dets(rng.random(n), rng.random((n, 2))), "uncertainty", T, 0.05)
        assert 0.0 <= s <= 1.0


# --- aggregations over boxes, objectness ----------------------------------------------------------------------

from yolo_backend.active_learning import (  # noqa: E402  (the new strategies, tested on hand-made boxes)
    aggregate_score,
    objectness_score,
    outcome_distribution,
    per_box_uncertainty,
    select_diverse_lowest,
    select_k_center,
    select_lowest,
    select_random,
)


def boxes_with(objectness, class_probs):
    """Detections whose confidence is objectness x best class probability, as the detector reports them."""
    obj = np.asarray(objectness, np.float32)
    probs = np.asarray(class_probs, np.float32).reshape(len(obj), -1)
    scores = obj * probs.max(axis=1)
    n = len(obj)
    return Detections(np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1)), scores, probs.argmax(1),
                      obj, probs, 100, 100, ("fire", "smoke"))


def test_outcome_distribution_adds_background_and_sums_to_one():
    q = outcome_distribution(np.array([[0.6, 0.2]]), np.array([0.8]))
    assert q.shape == (1, 3)
    assert q.sum() == pytest.approx(1.0)
    assert q[0, 2] == pytest.approx(0.2 / 1.0)  # background 1 - 0.8 against class scores 0.6 + 0.2


def test_per_box_margin_and_entropy_rank_doubtful_boxes_higher():
    sure = per_box_uncertainty(np.array([0.99]), np.array([[0.99, 0.01]]), "margin")[0]
    torn = per_box_uncertainty(np.array([0.9]), np.array([[0.5, 0.5]]), "margin")[0]
    assert torn > sure
    flat = per_box_uncertainty(np.array([2 / 3]), np.array([[0.5, 0.5]]), "entropy")[0]  # 1/3 each outcome
    assert flat == pytest.approx(1.0)
    assert per_box_uncertainty(np.array([0.99]), np.array([[0.99, 0.01]]), "entropy")[0] < 0.2
    with pytest.raises(ValueError):
        per_box_uncertainty(np.array([0.5]), np.array([[0.5, 0.5]]), "variance")


def test_sum_counts_every_doubtful_box_mean_does_not():
    one = boxes_with([0.5], [[0.5, 0.5]])
    three = boxes_with([0.5, 0.5, 0.5], [[0.5, 0.5]] * 3)
    assert score(three, "entropy_sum") < score(one, "entropy_sum")      # more to learn: label first
    assert score(three, "entropy_mean") == pytest.approx(score(one, "entropy_mean"))
    assert score(three, "margin_sum") < score(one, "margin_sum")
    assert aggregate_score(np.array([1.0, 1.0]), "sum") == pytest.approx(1 / 3)
    assert aggregate_score(np.array([0.2, 0.4]), "mean") == pytest.approx(0.7)


def test_new_scores_put_empty_images_last_like_uncertainty():
    empty = dets([])
    doubtful = boxes_with([0.3], [[0.6, 0.4]])
    for strategy in ("margin_sum", "margin_mean", "entropy_sum", "entropy_mean", "objectness"):
        assert score(empty, strategy) == 1.0
        assert score(doubtful, strategy) < score(empty, strategy), strategy


def test_objectness_score_ignores_the_class():
    torn_class = boxes_with([0.95], [[0.5, 0.5]])
    sure_class = boxes_with([0.95], [[0.99, 0.01]])
    unsure_object = boxes_with([0.5], [[0.99, 0.01]])
    assert score(torn_class, "objectness") == pytest.approx(score(sure_class, "objectness"))
    assert score(unsure_object, "objectness") < score(sure_class, "objectness")
    assert objectness_score(np.array([0.5])) == pytest.approx(0.5)  # one bit of doubt: 1 / (1 + 1)


# --- batch selection ------------------------------------------------------------------------------------------

def test_select_lowest_is_label_studios_order():
    assert select_lowest([10, 11, 12, 13], [0.9, 0.1, 0.5, 0.1], 3) == [11, 13, 12]


def test_select_lowest_with_clusters_takes_the_least_solved_cluster_first():
    candidates = [1, 2, 3, 4, 5]
    scores = [0.1, 0.2, 0.3, 0.8, 0.9]
    clusters = [0, 0, 0, 1, 2]
    # nothing solved: cluster 0's best, then clusters 1 and 2 (fewest labelled), then cluster 0 again
    assert select_lowest(candidates, scores, 4, clusters, {}) == [1, 4, 5, 2]
    # clusters 1 and 2 already hold 2 labels each: cluster 0 first until it holds 2, then the tie goes to the
    # lower score (cluster 0's 0.3 before cluster 1's 0.8)
    assert select_lowest(candidates, scores, 4, clusters, {1: 2, 2: 2}) == [1, 2, 3, 4]
    # equal counts and scores: the earlier candidate, whatever the cluster ids
    assert select_lowest([7, 8, 9], [0.5, 0.5, 0.5], 3, [2, 1, 0], {}) == [7, 8, 9]


def test_select_lowest_with_clusters_is_clusters_serve_sequence():
    from yolo_backend.clusters import serve_sequence

    rng = np.random.default_rng(1)
    candidates = list(range(100, 160))
    scores, clusters = rng.random(60).round(1), rng.integers(0, 6, size=60).tolist()
    expected = [candidates[j] for j in serve_sequence(scores, clusters, {0: 3, 4: 1}, 20)]
    assert select_lowest(candidates, scores, 20, clusters, {0: 3, 4: 1}) == expected


def test_select_random_is_deterministic_per_seed_and_never_repeats():
    a = select_random(range(100), 10, np.random.default_rng(3))
    b = select_random(range(100), 10, np.random.default_rng(3))
    c = select_random(range(100), 10, np.random.default_rng(4))
    assert a == b and a != c and len(set(a)) == 10
    assert sorted(select_random([5, 6], 10, np.random.default_rng(0))) == [5, 6]


def test_k_center_skips_near_duplicates():
    # two near-identical images (1, 2), and two distinct ones (3, 4); one labelled image near 1 and 2
    embeddings = np.array([[1.0, 0.0, 0.0], [0.99, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labelled = np.array([[1.0, 0.05, 0.0]])
    picked = select_k_center([1, 2, 3, 4], embeddings, labelled, 2)
    assert sorted(picked) == [3, 4]
    # with nothing labelled, the first pick is the farthest from the mean and a near-duplicate comes last
    order = select_k_center([1, 2, 3, 4], embeddings, np.zeros((0, 3)), 4)
    assert order[-1] in (1, 2) and set(order) == {1, 2, 3, 4}


def test_diverse_lowest_takes_doubtful_images_but_not_two_copies_of_one():
    embeddings = np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [0.7, 0.7]])
    scores = [0.1, 0.11, 0.2, 0.95]  # 1 and 2 are copies of one doubtful photo; 4 is sure
    picked = select_diverse_lowest([1, 2, 3, 4], scores, embeddings, np.zeros((0, 2)), 2, shortlist_factor=2)
    assert sorted(picked) in ([1, 3], [2, 3])
    # the shortlist bounds it: with only the k lowest to choose from, diversity cannot help
    assert sorted(select_diverse_lowest([1, 2, 3, 4], scores, embeddings, np.zeros((0, 2)), 2,
                                        shortlist_factor=1)) == [1, 2]
    assert select_lowest([1, 2, 3, 4], scores, 2) == [1, 2]  # what plain lowest-first would take


# --- uncertainty per second of expected annotation work ------------------------------------------------------

def test_expected_seconds_prices_each_detection_by_its_confidence():
    from yolo_backend.annotation_cost import CostModel

    cost = CostModel(draw_s=10, adjust_s=4, delete_s=2, accept_s=1, image_s=3)
    assert cost.expected_seconds(np.array([]), T) == 3.0
    # shown at 0.75: adjusted with p 0.75, deleted with p 0.25; hidden at 0.2: drawn with p 0.2
    assert cost.expected_seconds(np.array([0.75, 0.2]), T) == pytest.approx(3 + 0.75 * 4 + 0.25 * 2 + 0.2 * 10)


def test_per_second_puts_a_cheap_doubtful_image_before_a_busy_one():
    sparse = dets([0.26])
    busy = dets([0.26, 0.9, 0.9, 0.85, 0.8, 0.2, 0.15])
    # plain uncertainty cannot tell them apart (the same most uncertain box) ...
    assert score(sparse) == pytest.approx(score(busy))
    # ... per second of work, the one with less to fix comes first, and empty images still come last
    assert score(sparse, "uncertainty_per_second") < score(busy, "uncertainty_per_second")
    assert score(dets([]), "uncertainty_per_second") == 1.0
    assert score(dets([0.95]), "uncertainty_per_second") > score(sparse, "uncertainty_per_second")


def test_per_second_is_uncertainty_scaled_by_the_image_share_of_the_cost():
    from yolo_backend.annotation_cost import CostModel

    d = dets([0.3, 0.7])
    u = 1.0 - score(d)
    share = CostModel().image_s / CostModel().expected_seconds(np.array([0.3, 0.7]), T)
    assert score(d, "uncertainty_per_second") == pytest.approx(1.0 - u * share)
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(0, 8))
        assert 0.0 <= task_score(dets(rng.random(n), rng.random((n, 2))), "uncertainty_per_second", T, 0.05) <= 1.0
