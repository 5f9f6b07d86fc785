"""The active-learning simulator: end to end on a tiny generated dataset (outputs, determinism by seed, resume after
an interrupted round), and its pieces (strategy names, report numbers, clusters) on hand-made inputs."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_backend.settings import Settings
from yolo_backend.simulate import SimConfig, Simulation, loop
from yolo_backend.simulate.report import (area_under_curve, labels_to_reach, mean_curve, points_above,
                                          report_markdown)
from yolo_backend.yolov7.model import neck_embedding
from yolo_backend.simulate.strategies import parse_strategy

SIZE = 64          # image side: training, scoring and test all at 64 px keep a round to about a second
POOL_IMAGES = 14
TEST_IMAGES = 4


# --- a tiny dataset and a start checkpoint ---------------------------------------------------------------------

def _write_split(root: Path, split: str, count: int, rng: np.random.Generator) -> None:
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i in range(count):
        image = np.full((SIZE, SIZE, 3), int(rng.integers(30, 90)), np.uint8)
        lines = []
        for _ in range(int(rng.integers(0, 3))):  # 0 boxes: a negative, as real pools hold
            cls = int(rng.integers(0, 2))
            w, h = rng.uniform(0.2, 0.4, size=2)
            cx, cy = rng.uniform(0.25, 0.75, size=2)
            x1, y1 = int((cx - w / 2) * SIZE), int((cy - h / 2) * SIZE)
            x2, y2 = int((cx + w / 2) * SIZE), int((cy + h / 2) * SIZE)
            colour = (230, 80, 20) if cls == 0 else (170, 170, 170)
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, -1)
            lines.append(f"{cls} {cx:.4f} {cy:.4f} {w:.4f} {h:.4f}")
        # Two variants per source photo, named the way Roboflow names augmented copies.
        name = f"{i // 2:04d}_jpg.rf.{i:032x}"
        cv2.imwrite(str(root / "images" / split / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        (root / "labels" / split / f"{name}.txt").write_text("\n".join(lines))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from yolo_backend.yolov7.untrained import build_untrained_checkpoint

    root = tmp_path_factory.mktemp("tiny-pool")
    rng = np.random.default_rng(7)
    _write_split(root, "train", POOL_IMAGES, rng)
    _write_split(root, "val", TEST_IMAGES, rng)
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [fire, smoke]\n")
    weights = build_untrained_checkpoint(root / "start.pt", ["fire", "smoke"])
    return {"data": str(root / "data.yaml"), "weights": str(weights)}


@pytest.fixture
def one_thread(torch_one_thread):
    yield


def _settings() -> Settings:
    return Settings.from_env(env={}, device="cpu", torch_threads=1, train_batch_size=4, predict_batch_size=4)


def _config(tiny: dict, out: Path, **changes) -> SimConfig:
    config = SimConfig(pool=tiny["data"], test=tiny["data"], weights=tiny["weights"], out=str(out),
                       strategies=["random", "uncertainty+kcenter"], seeds=[0], initial=4, step=3, rounds=2,
                       epochs=1, img_size=SIZE, serve_img_size=SIZE, progress="log")
    return dataclasses.replace(config, **changes)


def _curve(out: Path) -> list[dict]:
    with open(out / "curves.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _labelled(out: Path, strategy: str, seed: int) -> list[int]:
    state = loop.RunState.load(out / "runs" / f"{strategy.replace('+', '-')}-s{seed}" / "state.json")
    return state.labelled


TIMING = ("train_s", "score_s", "model_version")  # wall time and timestamped version names differ between runs


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory) -> Path:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("sim-reference")
        Simulation(_config(tiny, out, effort_thresholds=[0.05, 1.0]), _settings()).run()
    finally:
        torch.set_num_threads(previous)
    return out


# --- end to end ----------------------------------------------------------------------------------------------

def test_simulation_writes_curves_report_and_plot(reference_run):
    rows = _curve(reference_run)
    assert {r["strategy"] for r in rows} == {"random", "uncertainty+kcenter"}
    for strategy in ("random", "uncertainty+kcenter"):
        labels = [int(r["labels"]) for r in rows if r["strategy"] == strategy]
        assert labels == [4, 7, 10]  # initial + 2 rounds of 3
    assert all(0.0 <= float(r["map50"]) <= 1.0 and float(r["train_s"]) > 0 for r in rows)
    # round 0 is the same random labels (and the same trained model) for every strategy of a seed
    first = [r for r in rows if r["round"] == "0"]
    assert len({(r["map50"], r["map50_95"]) for r in first}) == 1
    assert _labelled(reference_run, "random", 0)[:4] == _labelled(reference_run, "uncertainty+kcenter", 0)[:4]
    for strategy in ("random", "uncertainty+kcenter"):
        picked = _labelled(reference_run, strategy, 0)
        assert len(picked) == len(set(picked)) == 10
    report = (reference_run / "report.md").read_text()
    assert "| labels | random | uncertainty+kcenter |" in report and "±" in report
    assert "labels to reach the target" in report
    assert (reference_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every round trained through the worker's code path: the runs' registries hold published versions
    assert list((reference_run / "runs" / "_round0-s0" / "models" / "projects" / "1").glob("v*/model.pt"))


def test_same_seed_same_curve_other_seed_other_labels(tiny, reference_run, tmp_path, one_thread):
    again = tmp_path / "again"
    Simulation(_config(tiny, again), _settings()).run()
    assert _without_timing(_curve(again)) == _without_timing(_curve(reference_run))
    for strategy in ("random", "uncertainty+kcenter"):
        assert _labelled(again, strategy, 0) == _labelled(reference_run, strategy, 0)
    other = tmp_path / "other"
    Simulation(_config(tiny, other, strategies=["random"], seeds=[1], rounds=0), _settings()).run()
    assert _labelled(other, "random", 1) != _labelled(reference_run, "random", 0)


def test_an_interrupted_run_resumes_from_its_last_finished_round(tiny, reference_run, tmp_path, monkeypatch,
                                                                  one_thread):
    out = tmp_path / "resumed"
    real = loop.train_and_publish
    calls = {"n": 0}

    def killed_after_publishing(*args, **kwargs):
        # The 3rd training (round 1 of the second strategy) publishes, then the process "dies" before the
        # round is recorded: the resumed run must drop that version before it scores the pool (its picks come from
        # the last finished round's model, as in the uninterrupted run) and train the round again from that model.
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(loop, "train_and_publish", killed_after_publishing)
    with pytest.raises(KeyboardInterrupt):
        Simulation(_config(tiny, out), _settings()).run()
    assert len(_curve(out)) == 3  # two round-0 rows and random's round 1
    run = out / "runs" / "uncertainty-kcenter-s0"
    state = loop.RunState.load(run / "state.json")
    from yolo_backend.registry import Registry

    published = Registry.for_project(run / "models", loop.PROJECT_ID).versions()
    assert published and published[-1].number > state.last_version  # the unfinished round's version is there

    monkeypatch.setattr(loop, "train_and_publish", real)
    trained = []
    monkeypatch.setattr(loop, "train_and_publish", lambda *a, **k: trained.append(1) or real(*a, **k))
    Simulation(_config(tiny, out), _settings()).run()
    assert len(trained) == 3  # only the rounds not finished before: not round 0, not random's round 1
    assert _without_timing(_curve(out)) == _without_timing(_curve(reference_run))
    for strategy in ("random", "uncertainty+kcenter"):
        assert _labelled(out, strategy, 0) == _labelled(reference_run, strategy, 0)


def test_cli_simulate_runs_and_refuses_bad_input(tiny, tmp_path, one_thread, capsys, monkeypatch):
    from yolo_backend.cli import main

    monkeypatch.setenv("TORCH_THREADS", "1")
    monkeypatch.setenv("DEVICE", "cpu")
    base = ["simulate", "--pool", tiny["data"], "--test", tiny["data"], "--weights", tiny["weights"],
            "--img-size", str(SIZE), "--serve-img-size", str(SIZE), "--epochs", "1", "--progress", "log"]
    assert main(base + ["--strategies", "random,uncertainty", "--seeds", "0", "--initial", "4", "--step", "2",
                        "--rounds", "1", "--clusters", "source", "--out", str(tmp_path / "cli")]) == 0
    rows = _curve(tmp_path / "cli")
    assert [r["labels"] for r in rows if r["strategy"] == "uncertainty"] == ["4", "6"]
    # Label Studio's cluster rule: the two picks come from source photos with no labelled image yet
    labelled = _labelled(tmp_path / "cli", "uncertainty", 0)
    clusters = loop.source_clusters(sorted(p.name for p in (Path(tiny["data"]).parent / "images" / "train").iterdir()))
    assert not {clusters[i - 1] for i in labelled[4:]} & {clusters[i - 1] for i in labelled[:4]}
    assert main(base + ["--strategies", "oracle", "--out", str(tmp_path / "bad")]) == 2
    assert "strategy 'oracle' is unknown" in capsys.readouterr().err
    assert main(base + ["--initial", "10", "--step", "10", "--rounds", "1", "--out", str(tmp_path / "big")]) == 2
    assert "exceed the pool" in capsys.readouterr().err
    assert main(base + ["--clusters", "source", "--cluster-count", "3", "--out", str(tmp_path / "count")]) == 2
    assert "--cluster-count (at least 1) goes only with --clusters kmeans" in capsys.readouterr().err
    assert main(base + ["--draw-s", "-1", "--out", str(tmp_path / "cost")]) == 2
    assert "none may be negative" in capsys.readouterr().err
    # the cost flags reach the report: 35 s a box is ILSVRC's figure
    assert main(base + ["--strategies", "random", "--seeds", "0", "--initial", "4", "--step", "2", "--rounds", "1",
                        "--draw-s", "35", "--image-s", "0", "--out", str(tmp_path / "cost35")]) == 0
    assert "draw 35, adjust 3.5, delete 1, accept 1.6, per image 0." in (tmp_path / "cost35" / "report.md").read_text()
    assert main(base + ["--effort-thresholds", "0.01", "--out", str(tmp_path / "floor")]) == 2
    assert "between SCORE_FLOOR (0.05" in capsys.readouterr().err
    assert main(base + ["--effort-thresholds", "0.2,high", "--out", str(tmp_path / "word")]) == 2
    assert "expected comma-separated numbers" in capsys.readouterr().err


def test_kmeans_clusters_follow_label_studios_rule_and_leave_random_alone(tiny, reference_run, tmp_path,
                                                                         one_thread):
    from yolo_backend.clusters import next_task_order, solved_counts

    out = tmp_path / "kmeans"
    config = _config(tiny, out, strategies=["random", "uncertainty"], rounds=1, clusters="kmeans")
    simulation = Simulation(config, _settings())
    simulation.run()
    # random ignores clusters: the same labels as the reference run's (no clusters) for the same seed
    assert _labelled(out, "random", 0) == _labelled(reference_run, "random", 0)[:7]
    # uncertainty's 3 picks are what Label Studio serves one annotator, one after another: with the round-0
    # model's scores and k-means clusters of the pool (3 = auto_cluster_count(14)), each pick is the first of
    # next_task_order given what was labelled before it
    labelled = _labelled(out, "uncertainty", 0)
    initial, picked = labelled[:4], labelled[4:]
    scored = simulation.score(out / "runs" / "_round0-s0", lambda n: None)   # the round-0 model, from the cache
    ids = simulation.cluster_ids(scored, 0, 0)
    assert len(set(ids)) == 3 and ids == simulation.cluster_ids(scored, 0, 0)   # deterministic per seed
    scores = scored.scores("uncertainty", simulation.base_settings)
    done = list(initial)
    for task_id in picked:
        candidates = [i for i in simulation.pool.ids if i not in done]
        order = next_task_order(scores[[i - 1 for i in candidates]], [ids[i - 1] for i in candidates],
                                solved_counts(ids[i - 1] for i in done))
        assert task_id == candidates[order[0]]
        done.append(task_id)
    with pytest.raises(ValueError, match="cluster count"):
        Simulation(dataclasses.replace(config, clusters="none", cluster_count=3), _settings())
    with pytest.raises(ValueError, match="unknown"):
        Simulation(dataclasses.replace(config, clusters="photos"), _settings())


def test_kmeans_cluster_ids_of_the_pool(tiny):
    from yolo_backend.simulate.scoring import ScoredPool

    config = _config(tiny, Path("unused"), clusters="kmeans", cluster_count=2)
    simulation = Simulation(config, _settings())
    # two far apart groups of embeddings: the odd and the even task ids
    embeddings = np.array([[1.0, 0.1 * i, 0.0] if i % 2 else [0.0, 0.1 * i, 1.0] for i in range(POOL_IMAGES)])
    scored = ScoredPool(simulation.pool.ids, [], embeddings)
    ids = simulation.cluster_ids(scored, seed=0, round_index=1)
    assert ids == [i % 2 for i in range(POOL_IMAGES)] or ids == [1 - i % 2 for i in range(POOL_IMAGES)]
    assert simulation.cluster_ids(scored, seed=0, round_index=1) == ids
    with pytest.raises(ValueError, match="task-id order"):
        simulation.cluster_ids(ScoredPool(simulation.pool.ids[::-1], [], embeddings), seed=0, round_index=1)


def test_a_held_out_folder_without_splits_is_all_test(tiny):
    folder = Path(tiny["data"]).parent / "images" / "val"  # a bare folder of images, labels in ../labels
    pool = loop.load_pool(SimConfig(pool=tiny["data"], test=str(folder), weights=None, out="unused"))
    assert len(pool.samples) == POOL_IMAGES and len(pool.test) == TEST_IMAGES
    with pytest.raises(ValueError, match="no test images"):
        loop.load_pool(SimConfig(pool=str(folder), test=str(folder), weights=None, out="unused"))


# --- pieces on hand-made inputs --------------------------------------------------------------------------------

def test_strategy_names():
    settings = Settings.from_env(env={})
    assert parse_strategy("default", settings).score == settings.task_score
    assert not parse_strategy("random", settings).needs_scoring
    kcenter = parse_strategy("kcenter", settings)
    assert kcenter.diverse and kcenter.score is None
    combined = parse_strategy("entropy_sum+kcenter", settings)
    assert combined.diverse and combined.score == "entropy_sum"
    with pytest.raises(ValueError, match="unknown"):
        parse_strategy("nonsense+kcenter", settings)


def test_source_clusters_group_variants_of_one_photo():
    names = ["0050_jpg.rf.aa.jpg", "0050_jpg.rf.bb.jpg", "0052_jpg.rf.cc.jpg", "plain.jpg"]
    assert loop.source_clusters(names) == [0, 0, 1, 2]
    # task ids are 1-based: 2 repeats labelled 1's photo, 4 is new; picking 3 twice would count once more
    assert loop.repeated_sources(names, labelled=[1], picked=[2, 4]) == 1
    assert loop.repeated_sources(names, labelled=[], picked=[3, 4]) == 0


def test_neck_embedding_pools_each_level_and_concatenates():
    import torch

    maps = [torch.ones(2, 3, 8, 8), torch.arange(2 * 5 * 4 * 4, dtype=torch.float32).reshape(2, 5, 4, 4)]
    emb = neck_embedding(maps).numpy()
    assert emb.shape == (2, 8)
    assert np.allclose(emb[:, :3], 1.0)
    assert emb[0, 3] == pytest.approx(float(maps[1][0, 0].mean()))


def _rows(strategy, points):
    return [{"strategy": strategy, "seed": seed, "labels": labels, "map50": value, "map50_95": value / 2}
            for seed, (labels, value) in points]


def test_report_numbers():
    rows = _rows("random", [(0, (50, 0.1)), (1, (50, 0.2)), (0, (100, 0.3)), (1, (100, 0.3))])
    rows += _rows("smart", [(0, (50, 0.2)), (1, (50, 0.4)), (0, (100, 0.5)), (1, (100, 0.5))])
    curve = mean_curve(rows, "random")
    assert [(p[0], round(p[1], 6), p[3]) for p in curve] == [(50, 0.15, 2), (100, 0.3, 2)]
    assert curve[0][2] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    smart = mean_curve(rows, "smart")
    assert labels_to_reach(smart, 0.3) == pytest.approx(50.0)       # already above at the first point
    assert labels_to_reach(curve, 0.225) == pytest.approx(75.0)     # halfway between 0.15 and 0.3
    assert labels_to_reach(curve, 0.9) is None
    assert area_under_curve(curve) == pytest.approx(0.225)
    assert area_under_curve(curve[:1]) is None
    text = report_markdown(rows, ["random", "smart"])
    assert "0.1500 ± 0.0707 (2)" in text
    assert "| smart | 50 | 0.50 |" in text
    assert "2 of 2 points" in text
    # a seed still running: its lone point at 150 labels is in the table but not in the summary
    ragged = report_markdown(rows + _rows("random", [(0, (150, 0.9))]), ["random", "smart"])
    assert "| 150 | 0.9000 ± 0.0000 (1) |" in ragged
    assert "Target: random's final mean mAP@0.5, 0.3000 at 100 labels." in ragged
    assert points_above(curve, smart) == (0, 2)


# --- annotation effort ----------------------------------------------------------------------------------------

def _box(label, x1, y1, x2, y2):
    from yolo_backend.labelstudio.regions import RegionBox

    return RegionBox(label, x1, y1, x2, y2)


def test_effort_of_a_hand_made_batch_counts_and_times():
    from yolo_backend.annotation_cost import CostModel
    from yolo_backend.simulate.effort import batch_effort, scratch_effort

    truth = [[_box("fire", 0, 0, 0.5, 0.5), _box("smoke", 0.5, 0.5, 1, 1)],  # A
             [_box("fire", 0.1, 0.1, 0.3, 0.3)],                                # B: nothing shown
             [],                                                                 # C: a negative
             [_box("fire", 0.2, 0.2, 0.6, 0.6)]]                                # D: shown with the wrong label
    shown = [[_box("Fire", 0, 0, 0.5, 0.49),       # IoU 0.98, label case aside: accepted
              _box("smoke", 0.5, 0.5, 1, 0.8),     # IoU 0.6: adjusted
              _box("fire", 0.7, 0, 0.9, 0.2)],     # nothing there: deleted
             [],
             [_box("smoke", 0.1, 0.1, 0.2, 0.2)],  # on a negative: deleted
             [_box("smoke", 0.2, 0.2, 0.6, 0.6)]]  # a label change: deleted, and the fire box drawn
    effort = batch_effort(shown, truth)
    assert (effort.images, effort.accepted, effort.adjusted, effort.deleted, effort.drawn, effort.truth_boxes) == \
        (4, 1, 1, 3, 2, 4)
    assert effort.worked == 6
    cost = CostModel(draw_s=7, adjust_s=3.5, delete_s=1, accept_s=1.6, image_s=3)
    assert cost.seconds(effort) == pytest.approx(4 * 3 + 2 * 7 + 3.5 + 3 * 1 + 1.6)   # 34.1
    assert cost.scratch_seconds(effort) == pytest.approx(4 * 3 + 4 * 7)               # 40
    assert scratch_effort([2, 1, 0, 1]) == type(effort)(4, 0, 0, 0, 4, 4)
    with pytest.raises(ValueError, match="4 predictions for 3 images"):
        batch_effort(shown, truth[:3])
    with pytest.raises(ValueError, match="negative"):
        CostModel(delete_s=-1)


def test_shown_boxes_are_the_detections_at_the_serving_threshold():
    from yolo_backend.simulate.effort import predicted_boxes, truth_boxes
    from yolo_backend.yolov7.detections import Detections

    detections = Detections(np.array([[0, 0, 50, 100], [10, 10, 20, 20], [0, 0, 200, 100]], np.float32),
                            np.array([0.25, 0.2, 0.9], np.float32), np.array([1, 0, 0]), np.ones(3, np.float32),
                            np.zeros((3, 2), np.float32), 200, 100, ("fire", "smoke"))
    shown = predicted_boxes(detections, 0.25)  # at the threshold is shown, below it is not
    assert [(b.label, b.x1, b.y1, b.x2, b.y2) for b in shown] == [("smoke", 0, 0, 0.25, 1), ("fire", 0, 0, 1, 1)]
    truth = truth_boxes(np.array([[0, 0, 50, 100]]), np.array([1]), ["fire", "smoke"], 200, 100)
    assert [(b.label, b.x2) for b in truth] == [("smoke", 0.25)]


def test_effort_at_thresholds_shows_fewer_boxes_as_the_threshold_rises():
    from yolo_backend.simulate.effort import effort_at_thresholds, truth_boxes
    from yolo_backend.yolov7.detections import Detections

    # one image 100 x 100 with one true fire box; the model finds it at 0.6 and adds a wrong box at 0.2
    detections = Detections(np.array([[10, 10, 50, 50], [60, 60, 90, 90]], np.float32),
                            np.array([0.6, 0.2], np.float32), np.array([0, 0]), np.ones(2, np.float32),
                            np.zeros((2, 2), np.float32), 100, 100, ("fire", "smoke"))
    truth = [truth_boxes(np.array([[10, 10, 50, 50]]), np.array([0]), ["fire", "smoke"], 100, 100)]
    counted = effort_at_thresholds([detections], truth, [0.1, 0.5, 0.7])
    row = {t: (e.accepted, e.adjusted, e.deleted, e.drawn) for t, e in counted.items()}
    assert row == {0.1: (1, 0, 1, 0), 0.5: (1, 0, 0, 0), 0.7: (0, 0, 0, 1)}


def test_the_simulation_counts_effort_per_round(reference_run):
    rows = _curve(reference_run)
    for row in rows:
        counts = {k: int(row[k]) for k in ("boxes_accepted", "boxes_adjusted", "boxes_deleted", "boxes_drawn",
                                           "truth_boxes", "new_labels")}
        # every true box ends up accepted, adjusted or drawn
        assert counts["boxes_accepted"] + counts["boxes_adjusted"] + counts["boxes_drawn"] == counts["truth_boxes"]
        assert counts["new_labels"] == (4 if row["round"] == "0" else 3)
        assert float(row["annotation_s"]) > 0 and float(row["scratch_s"]) > 0
        if row["round"] == "0":  # the initial batch is drawn from scratch
            assert counts["boxes_drawn"] == counts["truth_boxes"] and float(row["annotation_s"]) == \
                float(row["scratch_s"])
    report = (reference_run / "report.md").read_text()
    assert "## Annotation effort" in report
    assert "| random without pre-annotations |" in report and "| uncertainty+kcenter |" in report


def test_effort_is_also_counted_at_each_swept_threshold(reference_run):
    import json

    state = json.loads((reference_run / "runs" / "uncertainty-kcenter-s0" / "state.json").read_text())
    later = [row for row in state["rows"] if row["round"] > 0]
    assert later and all(set(row["effort_at"]) == {"0.05", "0.25", "1"} for row in later)
    for row in later:
        served = [row[k] for k in ("boxes_accepted", "boxes_adjusted", "boxes_deleted", "boxes_drawn", "truth_boxes")]
        assert row["effort_at"]["0.25"] == served   # MODEL_SCORE_THRESHOLD is the row's own count
        accepted, adjusted, deleted, drawn, truth = row["effort_at"]["1"]
        assert (accepted, adjusted, deleted, drawn) == (0, 0, 0, truth)   # nothing scores 1: every box drawn
        accepted, adjusted, deleted, drawn, truth = row["effort_at"]["0.05"]
        assert accepted + adjusted + drawn == truth
    report = (reference_run / "report.md").read_text()
    assert "## Pre-annotation threshold" in report
    assert "| 1 | uncertainty+kcenter |" in report and "| 0.05 | random |" in report


def test_threshold_table_of_hand_made_rows():
    from yolo_backend.annotation_cost import CostModel
    from yolo_backend.simulate.report import threshold_markdown

    def row(strategy, round_index, labels, value, counts, effort_at=None):
        fields = dict(zip(("boxes_accepted", "boxes_adjusted", "boxes_deleted", "boxes_drawn", "truth_boxes"),
                          counts))
        return {"strategy": strategy, "seed": 0, "round": round_index, "labels": labels, "map50": value,
                "map50_95": value / 2, "new_labels": 10, **fields, **({"effort_at": effort_at} if effort_at else {})}

    # one later round of 10 images and 20 true boxes: at 0.2 the model shows 30 boxes (20 right, 10 wrong),
    # at 0.6 it shows 10, all right
    swept = {"0.2": [20, 0, 10, 0, 20], "0.6": [10, 0, 0, 10, 20]}
    rows = [row("random", 0, 10, 0.1, [0, 0, 0, 20, 20]), row("random", 1, 20, 0.3, [10, 0, 0, 10, 20], swept)]
    cost = CostModel(draw_s=10, adjust_s=5, delete_s=1, accept_s=1, image_s=0)
    text = "\n".join(threshold_markdown(rows, ["random"], cost))
    # without pre-annotations: 200 s + 200 s; at 0.2: 200 + 20 x 1 + 10 x 1 = 230 s; at 0.6: 200 + 10 + 100 = 310 s
    # (drawn counts include the initial batch's 20)
    assert "| 0.2 | random | 3.8 | 0.57 | 3.8 | 0.57 | 20 / 0 / 10 / 20 |" in text
    assert "| 0.6 | random | 5.2 | 0.78 | 5.2 | 0.78 | 30 / 0 / 0 / 10 |" in text
    assert threshold_markdown([{**r, "effort_at": None} for r in rows], ["random"], cost) == []


def test_effort_summary_of_hand_made_rows():
    from yolo_backend.annotation_cost import CostModel
    from yolo_backend.simulate.report import NO_PRE, effort_curves, effort_to_reach, map_at_seconds, with_costs

    def row(strategy, seed, round_index, labels, value, accepted, drawn, truth):
        return {"strategy": strategy, "seed": seed, "round": round_index, "labels": labels, "map50": value,
                "map50_95": value / 2, "new_labels": 10, "boxes_accepted": accepted, "boxes_adjusted": 0,
                "boxes_deleted": 0, "boxes_drawn": drawn, "truth_boxes": truth}

    rows = [row("random", 0, 0, 10, 0.1, 0, 20, 20), row("random", 0, 1, 20, 0.3, 10, 10, 20),
            row("smart", 0, 0, 10, 0.1, 0, 20, 20), row("smart", 0, 1, 20, 0.5, 20, 0, 20)]
    cost = CostModel(draw_s=10, adjust_s=5, delete_s=1, accept_s=1, image_s=0)
    costed = with_costs(rows, cost)
    assert [r["annotation_s"] for r in costed] == [200, 110, 200, 20]
    curves = effort_curves(costed, ["random", "smart"])
    assert [(p.labels, p.seconds, p.worked) for p in curves[NO_PRE]] == [(10, 200, 20), (20, 400, 40)]
    assert [(p.seconds, p.worked) for p in curves["random"]] == [(200, 20), (310, 30)]
    # smart reaches random's 0.3 halfway between its points: 200 + (220 - 200) / 2 s, 20 + 0 boxes
    assert effort_to_reach(curves["smart"], 0.3) == pytest.approx((210, 20))
    assert effort_to_reach(curves["smart"], 0.9) is None
    text = report_markdown(rows, ["random", "smart"], cost)
    # the last column: mAP@0.5 after smart's 220 s, the fewest any strategy took (linear between points)
    assert "mAP@0.5 after 3.7 minutes |" in text
    assert f"| {NO_PRE} | 6.7 | 1.00 | 40 | 6.7 | 40 | 40 / 0 / 0 / 0 | 0.1200 |" in text   # 400 s
    assert "| smart | 3.5 | 0.53 | 20 | 3.7 | 20 | 20 / 0 / 0 / 20 | 0.5000 |" in text    # 210 s of 400; 220 in all
    assert "| random | 5.2 | 0.78 | 30 | 5.2 | 30 | 30 / 0 / 0 / 10 | 0.1364 |" in text   # 310 s
    assert map_at_seconds(curves["random"], 199) is None and map_at_seconds(curves["random"], 311) is None
    # rows from before effort was counted: the summary says so instead of failing
    old = [{k: v for k, v in r.items() if not k.startswith(("boxes_", "truth_"))} for r in rows]
    assert "no annotation-time comparison" in report_markdown(old, ["random", "smart"])
