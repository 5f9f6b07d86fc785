"""The pool-based simulation of the product's loop, round by round.

For every (strategy, seed) a run has its own MODEL_DIR (a project registry, like the worker's) and a state file.
Round r: train on everything labelled so far exactly as the worker's ``fit()`` does
(``jobs.training.train_and_publish``: split by task id, fine-tune from the project's newest version, else
``--weights``; publish only when not worse on its own validation split), evaluate the current model (newest
published) on the test split, then score the whole pool with it as the server would and label the next ``step``
images the strategy picks, counting what the annotator does with that model's pre-annotations on them
(``effort``). Round 0's ``initial`` images are random (seeded) and the same for every strategy of a
seed, so round 0 is trained once per seed and its registry copied into each strategy's run.

Runs advance round by round across all (strategy, seed) pairs, so curves grow together and a stopped run has
comparable numbers. A killed run resumes from the last finished round: the state files say what was labelled and
which versions were published; versions a killed round published are removed before it is run again (before
its pool is scored, so the resumed round picks with the same model as an uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..atomic import atomic_write
from ..clusters import assign_clusters, auto_cluster_count, fit_centroids, solved_counts
from ..hashing import file_sha256
from ..jobs.dataset import Example, scale_to
from ..jobs.publish import current_model
from ..jobs.training import train_and_publish
from ..registry import Registry
from ..settings import Settings
from ..annotation_cost import CostModel
from .effort import RoundEffort, effort_at_thresholds, scratch_effort, truth_boxes
from .report import write_outputs
from .scoring import ScoredPool, score_pool
from .strategies import Strategy, choose, parse_strategy

log = logging.getLogger(__name__)

PROJECT_ID = 1          # the simulated Label Studio project (its id seeds the train/validation split)
STATE_VERSION = 1
CLUSTER_MODES = ("none", "source", "kmeans")


@dataclass
class SimConfig:
    pool: str
    test: str
    weights: Optional[str]
    out: str
    strategies: list[str] = field(default_factory=lambda: ["random", "default"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    initial: int = 50
    step: int = 50
    rounds: int = 5
    epochs: Optional[int] = None          # None: TRAIN_EPOCHS
    time_budget: Optional[float] = None   # None: TRAIN_TIME_BUDGET_S
    img_size: Optional[int] = None        # training size; None: TRAIN_IMG_SIZE
    serve_img_size: Optional[int] = None  # scoring and test size; None: IMG_SIZE
    clusters: str = "none"                # none | source (Roboflow source photo: near-duplicates share a cluster)
    #                                       | kmeans (each round: k-means on the pool's embeddings, see clusters.py)
    cluster_count: Optional[int] = None   # kmeans: k; None: clusters.auto_cluster_count(pool size)
    progress: str = "auto"                # auto | bar | log
    cost: CostModel = field(default_factory=CostModel)  # annotator seconds per box action (effort.py)
    effort_thresholds: list[float] = field(default_factory=list)  # also count effort at these thresholds (rows'
    #                                       ``effort_at``): which MODEL_SCORE_THRESHOLD costs annotators least


# --- the data -----------------------------------------------------------------------------------------------------

@dataclass
class Pool:
    """The pool's samples (task id = index + 1), the test samples and the class names."""

    samples: list        # yolov7.dataset.Sample, lazily read from disk
    test: list
    names: list[str]
    clusters: Optional[list[int]]

    @property
    def sample_names(self) -> list[str]:
        return [s.name for s in self.samples]

    @property
    def ids(self) -> list[int]:
        return list(range(1, len(self.samples) + 1))

    def sample(self, task_id: int):
        return self.samples[task_id - 1]


def source_clusters(names: list[str]) -> list[int]:
    """A cluster id per image name: Roboflow's augmented variants ``<photo>_jpg.rf.<hash>.jpg`` of one photo share
    one (the near-duplicates a real pool holds as consecutive frames)."""
    ids: dict[str, int] = {}
    return [ids.setdefault(name.split(".rf.")[0], len(ids)) for name in names]


def repeated_sources(names: list[str], labelled: list[int], picked: list[int]) -> int:
    """How many of ``picked`` show a source photo (``source_clusters``) that was already labelled or picked
    earlier in the batch: labels spent on near-duplicates."""
    clusters = source_clusters(names)
    seen = {clusters[i - 1] for i in labelled}
    repeats = 0
    for i in picked:
        repeats += clusters[i - 1] in seen
        seen.add(clusters[i - 1])
    return repeats


def load_pool(config: SimConfig) -> Pool:
    from ..yolov7.dataset import load_data

    pool, test = load_data(config.pool), load_data(config.test)
    if not pool.train:
        raise ValueError(f"{config.pool}: the pool (train split) holds no images")
    test_samples = test.val
    if not test_samples and Path(config.test).resolve() != Path(config.pool).resolve():
        # A held-out folder of images and labels has one split only: all of it is the test set.
        log.info("%s has no val split: testing on all its %d images", config.test, len(test.train))
        test_samples = test.train
    if not test_samples:
        raise ValueError(f"{config.test}: no test images (its val split is empty; the pool itself cannot be the test)")
    samples = sorted(pool.train, key=lambda s: s.name)
    clusters = source_clusters([s.name for s in samples]) if config.clusters == "source" else None
    return Pool(samples, list(test_samples), list(pool.names), clusters)


class ExampleCache:
    """Labelled images as the worker gets them (scaled to the training size), read once."""

    def __init__(self, pool: Pool, size: int):
        self.pool, self.size = pool, size
        self._examples: dict[int, Example] = {}

    def get(self, task_id: int) -> Example:
        if task_id not in self._examples:
            sample = self.pool.sample(task_id)
            small, r = scale_to(sample.load_image(), self.size)
            # sample.load_image reads the original again when a start model is measured at a larger size
            self._examples[task_id] = Example(task_id, np.ascontiguousarray(small), sample.boxes * r,
                                              sample.classes.copy(), sample.load_image, r)
        return self._examples[task_id]


# --- one run's state ----------------------------------------------------------------------------------------------

@dataclass
class RunState:
    strategy: str
    seed: int
    labelled: list[int] = field(default_factory=list)   # task ids in the order they were labelled
    rows: list[dict] = field(default_factory=list)      # one per finished round
    last_version: int = 0                               # highest registry version number a finished round made

    @classmethod
    def load(cls, path: Path) -> Optional["RunState"]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.pop("state_version", None) != STATE_VERSION:
            return None
        return cls(**data)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            handle.write(json.dumps({"state_version": STATE_VERSION, **asdict(self)}, indent=1).encode())


def drop_unfinished_versions(model_dir: Path, last_version: int) -> None:
    """Remove versions a killed round published after the last finished one (so the resumed round starts from
    the same model as the first try)."""
    registry = Registry.for_project(model_dir, PROJECT_ID)
    stale = [v.name for v in registry.versions() if v.number > last_version]
    for name in registry.remove(stale):
        log.info("removed %s, published by an unfinished round", name)


# --- the simulation -----------------------------------------------------------------------------------------------

class Simulation:
    def __init__(self, config: SimConfig, settings: Optional[Settings] = None):
        if config.clusters not in CLUSTER_MODES:
            raise ValueError(f"clusters {config.clusters!r} is unknown; use one of {', '.join(CLUSTER_MODES)}")
        if config.cluster_count is not None and (config.clusters != "kmeans" or config.cluster_count < 1):
            raise ValueError("a cluster count (at least 1) goes only with kmeans clusters")
        self.config = config
        self.out = Path(config.out)
        self.base_settings = settings or Settings.from_env()
        self.strategies: list[Strategy] = [parse_strategy(n, self.base_settings) for n in config.strategies]
        self.pool = load_pool(config)
        self.train_size = config.img_size or self.base_settings.train_img_size
        self.examples = ExampleCache(self.pool, self.train_size)
        self._test_sets: dict = {}  # serving size -> the test split at that size
        floor = self.base_settings.score_floor
        if any(not floor <= t <= 1 for t in config.effort_thresholds):
            raise ValueError(f"effort thresholds must lie between SCORE_FLOOR ({floor:g}: detections below it are "
                             f"not kept) and 1; got {', '.join(f'{t:g}' for t in config.effort_thresholds)}")
        if config.initial + config.step * config.rounds > len(self.pool.samples):
            raise ValueError(f"{config.initial} + {config.rounds} x {config.step} labels exceed the pool's "
                             f"{len(self.pool.samples)} images")

    # settings of one run: its own MODEL_DIR, the start weights, the per-round training bounds
    def settings_for(self, run_dir: Path) -> Settings:
        c, s = self.config, self.base_settings
        return dataclasses.replace(
            s, model_dir=str(run_dir / "models"), model_path=c.weights, model_version=None,
            train_epochs=c.epochs or s.train_epochs, train_time_budget_s=c.time_budget or s.train_time_budget_s,
            train_img_size=self.train_size, img_size=c.serve_img_size or s.img_size)

    def run_dir(self, strategy: str, seed: int) -> Path:
        return self.out / "runs" / f"{strategy.replace('+', '-')}-s{seed}"

    def state_path(self, run_dir: Path) -> Path:
        return run_dir / "state.json"

    # --- the steps ------------------------------------------------------------------------------------------------
    def initial_labels(self, seed: int) -> list[int]:
        rng = np.random.default_rng([seed, 0])
        return sorted(int(i) for i in rng.choice(self.pool.ids, size=self.config.initial, replace=False))

    def train_round(self, run_dir: Path, state: RunState, round_index: int) -> dict:
        """Train on ``state.labelled`` as the worker does, evaluate on the test split; the round's row."""
        settings = self.settings_for(run_dir)
        drop_unfinished_versions(Path(settings.model_dir), state.last_version)
        examples = sorted((self.examples.get(i) for i in state.labelled), key=lambda e: e.task_id)
        started = time.monotonic()
        outcome, version = train_and_publish(
            settings, PROJECT_ID, examples, list(self.pool.names), job_id=f"sim-r{round_index}",
            meta={"annotations": len(examples), "simulation": {"strategy": state.strategy, "seed": state.seed,
                                                               "round": round_index}},
            extra={"seed": state.seed * 1000 + round_index})
        train_s = time.monotonic() - started
        if version is not None:
            state.last_version = version.number
        checkpoint, name = self.served_model(settings)
        metrics = self.evaluate(checkpoint, settings)
        return {"strategy": state.strategy, "seed": state.seed, "round": round_index, "labels": len(examples),
                "map50": round(float(metrics["map50"]), 5), "map50_95": round(float(metrics["map"]), 5),
                "train_s": round(train_s, 1), "published": version is not None, "model_version": name,
                "epochs_run": outcome.get("epochs_run"), "train_images": outcome.get("train_images"),
                "val_images": outcome.get("val_images"),
                "positives": sum(1 for e in examples if len(e.boxes)), "score_s": None}

    @staticmethod
    def served_model(settings: Settings) -> tuple[str, str]:
        """(checkpoint, version name) the server would serve now: the newest published version, else the start."""
        checkpoint, name = current_model(settings, PROJECT_ID)
        if checkpoint is None or name is None:
            raise ValueError("no model to evaluate: nothing was published and there are no --weights")
        return checkpoint, name

    def evaluate(self, checkpoint: str, settings: Settings) -> dict:
        """mAP@0.5 and mAP@0.5:0.95 (``map50``, ``map``) on the test split of the served model, at the serving size
        (the engine's evaluation). Cached by checkpoint hash: a round that publishes nothing serves the same model
        as the round before."""
        from ..detector_settings import img_size_for
        from ..yolov7.checkpoint import load_checkpoint, model_from_checkpoint
        from ..yolov7.dataset import EvalSet
        from ..yolov7.train import evaluate

        # the server's rule: IMG_SIZE, else a size measured in the run's MODEL_DIR, else the training size, else 640
        size, _ = img_size_for(checkpoint, settings)
        key = json.dumps([file_sha256(checkpoint), size, settings.model_score_threshold, self.config.test])
        path = self.out / "cache" / f"test-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        loaded = load_checkpoint(checkpoint)
        if size not in self._test_sets:
            self._test_sets[size] = EvalSet(self.pool.test, size)
        model = model_from_checkpoint(loaded, device="cpu", fuse=True)
        found = evaluate(model, self._test_sets[size], list(self.pool.names), img_size=size,
                         serve_conf=settings.model_score_threshold)
        metrics = {"map50": float(found["map50"]), "map": float(found["map"])}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, durable=False) as handle:
            handle.write(json.dumps(metrics).encode())
        return metrics

    def score(self, run_dir: Path, progress: Callable[[int], None]) -> ScoredPool:
        settings = self.settings_for(run_dir)
        checkpoint, _ = self.served_model(settings)
        loaders = [self.pool.sample(i).load_image for i in self.pool.ids]
        return score_pool(checkpoint, self.pool.ids, loaders, settings, self.out / "cache", progress)

    def select(self, strategy: Strategy, state: RunState, round_index: int, scored: Optional[ScoredPool]) \
            -> list[int]:
        labelled = set(state.labelled)
        candidates = [i for i in self.pool.ids if i not in labelled]
        rng = np.random.default_rng([state.seed, round_index + 1])
        k = self.config.step
        if scored is None:
            return choose(strategy, candidates, k, rng)
        row = {task_id: j for j, task_id in enumerate(scored.ids)}
        cand_rows = [row[i] for i in candidates]
        scores = scored.scores(strategy.score, self.base_settings)[cand_rows] if strategy.score else None
        embeddings = scored.embeddings[cand_rows]
        labelled_embeddings = scored.embeddings[[row[i] for i in state.labelled]]
        clusters = solved = None
        pool_clusters = self.cluster_ids(scored, state.seed, round_index) if strategy.uses_clusters else None
        if pool_clusters is not None:
            clusters = [pool_clusters[i - 1] for i in candidates]
            solved = solved_counts(pool_clusters[i - 1] for i in state.labelled)
        return choose(strategy, candidates, k, rng, scores, embeddings, labelled_embeddings, clusters, solved)

    def effort(self, run_dir: Path, picked: list[int], scored: Optional[ScoredPool]) -> tuple[RoundEffort, dict]:
        """What labelling ``picked`` takes with the pre-annotations the server shows on them: the detections at
        or above MODEL_SCORE_THRESHOLD of the model that picked them (``scored``; a strategy that scores nothing,
        random, has its picked images scored with that model now). Second: the same counted at each of the
        ``effort_thresholds`` (with MODEL_SCORE_THRESHOLD among them), as ``{"0.4": [counts of EFFORT_FIELDS]}``;
        the picks and models do not depend on what is shown, so one run prices every threshold."""
        if scored is None:
            settings = self.settings_for(run_dir)
            checkpoint, _ = self.served_model(settings)
            scored = score_pool(checkpoint, picked, [self.pool.sample(i).load_image for i in picked], settings,
                                self.out / "cache")
        row = {task_id: j for j, task_id in enumerate(scored.ids)}
        found, truth = [], []
        for task_id in picked:
            detections = scored.detections[row[task_id]]
            sample = self.pool.sample(task_id)
            found.append(detections)
            truth.append(truth_boxes(sample.boxes, sample.classes, self.pool.names, detections.width,
                                     detections.height))
        served = self.base_settings.model_score_threshold
        swept = set(self.config.effort_thresholds) | {served} if self.config.effort_thresholds else {served}
        counted = effort_at_thresholds(found, truth, sorted(swept))
        at = {f"{t:g}": list(e.row().values()) for t, e in counted.items()} if self.config.effort_thresholds else {}
        return counted[served], at

    def cluster_ids(self, scored: ScoredPool, seed: int, round_index: int) -> Optional[list[int]]:
        """A cluster id per pool image (task id - 1) as the predictions of this round's model would carry them:
        ``source`` photos, or ``kmeans`` on the pool's embeddings from this round's scoring (the model version's
        clusters, refitted each round; seeded by the run's seed and the round); None without clusters."""
        if self.config.clusters == "source":
            return self.pool.clusters
        if self.config.clusters != "kmeans":
            return None
        if list(scored.ids) != self.pool.ids:
            raise ValueError("the scored pool is not the pool in task-id order")
        k = self.config.cluster_count or auto_cluster_count(len(scored.ids))
        centroids = fit_centroids(scored.embeddings, k, seed=seed * 1000 + round_index)
        ids = assign_clusters(scored.embeddings, centroids)
        log.info("round %d: %d k-means clusters of the pool's %d images (largest %d)", round_index + 1,
                 len(centroids), len(ids), int(np.bincount(ids).max()))
        return [int(c) for c in ids]

    # --- round 0, shared by a seed's strategies ---------------------------------------------------------------
    def base_round(self, seed: int) -> tuple[Path, RunState]:
        base_dir = self.out / "runs" / f"_round0-s{seed}"
        path = self.state_path(base_dir)
        state = RunState.load(path)
        if state is None or not state.rows:
            state = RunState("_round0", seed, self.initial_labels(seed))
            row = self.train_round(base_dir, state, 0)
            # a new project has no model of its own yet: the initial batch is drawn from scratch in every run
            row.update(new_labels=len(state.labelled),
                       **scratch_effort([len(self.pool.sample(i).boxes) for i in state.labelled]).row())
            state.rows.append(row)
            state.save(path)
        return base_dir, state

    def start_run(self, strategy: Strategy, seed: int) -> RunState:
        run_dir = self.run_dir(strategy.name, seed)
        state = RunState.load(self.state_path(run_dir))
        if state is not None and state.rows:
            return state
        base_dir, base = self.base_round(seed)
        shutil.rmtree(run_dir / "models", ignore_errors=True)
        if (base_dir / "models").is_dir():
            shutil.copytree(base_dir / "models", run_dir / "models")
        row = {**base.rows[0], "strategy": strategy.name}
        state = RunState(strategy.name, seed, list(base.labelled), [row], base.last_version)
        state.save(self.state_path(run_dir))
        return state

    def advance(self, strategy: Strategy, state: RunState, progress: Callable[[int], None]) -> None:
        """Pick the next batch with the current model, then train and evaluate the next round."""
        run_dir = self.run_dir(strategy.name, state.seed)
        round_index = len(state.rows)
        # A killed try of this round may have published its model before it died: remove that version before
        # scoring, or the resumed round would pick with the model it is about to retrain instead of the one the
        # uninterrupted run picks with (the last finished round's; train_round drops it again, a no-op then).
        drop_unfinished_versions(Path(self.settings_for(run_dir).model_dir), state.last_version)
        started = time.monotonic()
        scored = self.score(run_dir, progress) if strategy.needs_scoring else None
        picked = self.select(strategy, state, round_index - 1, scored)
        score_s = round(time.monotonic() - started, 1)
        effort, effort_at = self.effort(run_dir, picked, scored)
        trial = RunState(state.strategy, state.seed, state.labelled + picked, list(state.rows), state.last_version)
        row = self.train_round(run_dir, trial, round_index)
        row["score_s"] = score_s
        row["repeat_photos"] = repeated_sources(self.pool.sample_names, state.labelled, picked)
        row.update(new_labels=len(picked), **effort.row())
        if effort_at:
            row["effort_at"] = effort_at
        trial.rows.append(row)
        trial.save(self.state_path(run_dir))
        state.labelled, state.rows, state.last_version = trial.labelled, trial.rows, trial.last_version

    # --- all of it ------------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(asdict(self.config), indent=1))
        pairs = [(s, seed) for seed in self.config.seeds for s in self.strategies]
        total = len(pairs) * (self.config.rounds + 1)
        with _Progress(total, self.config.progress) as bar:
            states = {}
            for strategy, seed in pairs:
                states[(strategy.name, seed)] = self.start_run(strategy, seed)
                bar.done(f"{strategy.name} seed {seed} round 0", states[(strategy.name, seed)].rows[-1])
                self.write()
            for round_index in range(1, self.config.rounds + 1):
                for strategy, seed in pairs:
                    state = states[(strategy.name, seed)]
                    if len(state.rows) > round_index:
                        bar.done(f"{strategy.name} seed {seed} round {round_index} (done before)",
                                 state.rows[round_index])
                        continue
                    self.advance(strategy, state, lambda n: None)
                    bar.done(f"{strategy.name} seed {seed} round {round_index}", state.rows[-1])
                    self.write()
        return self.rows()

    def rows(self) -> list[dict]:
        found = []
        for strategy in self.strategies:
            for seed in self.config.seeds:
                state = RunState.load(self.state_path(self.run_dir(strategy.name, seed)))
                found.extend(state.rows if state else [])
        return found

    def write(self) -> None:
        write_outputs(self.out, self.rows(), [s.name for s in self.strategies], self.config.cost)


class _Progress:
    """A tqdm bar over rounds in a terminal; log lines otherwise."""

    def __init__(self, total: int, mode: str):
        self.total, self.count = total, 0
        self.bar: Any = None
        self._redirect: Any = None
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, unit="round", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()  # log lines print above the bar instead of through it

    def __enter__(self) -> "_Progress":
        if self._redirect is not None:
            self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(*exc)
        if self.bar is not None:
            self.bar.close()

    def done(self, what: str, row: dict) -> None:
        self.count += 1
        text = f"{what}: {row['labels']} labels, mAP@0.5 {row['map50']:.4f}, mAP@0.5:0.95 {row['map50_95']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            log.info("[%d/%d] %s (train %.0fs)", self.count, self.total, text, row.get("train_s") or 0.0)


def simulate(config: SimConfig, settings: Optional[Settings] = None) -> list[dict]:
    """Run (or resume) the simulation; returns the curve rows. Writes curves.csv, report.md, curves.png."""
    return Simulation(config, settings).run()
