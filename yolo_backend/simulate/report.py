"""The simulator's outputs: curves.csv (one row per strategy, seed and round), report.md (mean ± sd per labels
count, labels needed to reach random's final mAP@0.5, area under the curve; then the estimated annotation time and
boxes drawn or fixed to reach it, against random without pre-annotations) and curves.png (mAP@0.5 against labels,
one line per strategy with a ± sd band over seeds; and against estimated annotation time).

Random without pre-annotations needs no run of its own: random's picks and models do not depend on what the
annotator is shown, so its curve is random's, with every ground-truth box drawn (the rows' ``scratch_s``)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..atomic import atomic_write
from ..annotation_cost import CostModel
from .effort import EFFORT_FIELDS, RoundEffort

COLUMNS = ("strategy", "seed", "round", "labels", "map50", "map50_95", "train_s", "score_s", "published",
           "model_version", "epochs_run", "train_images", "val_images", "positives", "repeat_photos",
           "new_labels", *EFFORT_FIELDS, "annotation_s", "scratch_s")
BASELINE = "random"
NO_PRE = "random without pre-annotations"   # random's curve, every box drawn (the module doc)


# --- numbers ------------------------------------------------------------------------------------------------------

def mean_curve(rows: Sequence[dict], strategy: str, key: str = "map50") -> list[tuple[int, float, float, int]]:
    """(labels, mean, sd, seeds) per labels count of ``strategy``, by labels."""
    by_labels: dict[int, list[float]] = {}
    for row in rows:
        if row["strategy"] == strategy:
            by_labels.setdefault(int(row["labels"]), []).append(float(row[key]))
    curve = []
    for labels in sorted(by_labels):
        values = np.array(by_labels[labels])
        sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
        curve.append((labels, float(values.mean()), sd, int(values.size)))
    return curve


def complete(curve: Sequence[tuple]) -> list[tuple]:
    """The points of ``curve`` that every seed reached (a stopped or running simulation has ragged ends)."""
    seeds = max((p[3] for p in curve), default=0)
    return [p for p in curve if p[3] == seeds]


def labels_to_reach(curve: Sequence[tuple], target: float) -> Optional[float]:
    """The first labels count at which the mean curve reaches ``target`` (linear between measured points);
    None when it never does."""
    previous = None
    for labels, mean, *_ in curve:
        if mean >= target:
            if previous is None:
                return float(labels)
            (l0, m0) = previous
            return l0 + (target - m0) / (mean - m0) * (labels - l0)
        previous = (labels, mean)
    return None


def area_under_curve(curve: Sequence[tuple], upto: Optional[int] = None) -> Optional[float]:
    """Mean of the mean curve over labels (trapezoids / label span) up to ``upto`` labels; None under 2 points."""
    points = [(labels, mean) for labels, mean, *_ in curve if upto is None or labels <= upto]
    if len(points) < 2:
        return None
    x = np.array([p[0] for p in points], np.float64)
    y = np.array([p[1] for p in points], np.float64)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


# --- annotation effort ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EffortPoint:
    """One labels count of a strategy's effort curve: means over seeds of the cumulative estimated seconds, the
    cumulative boxes drawn or fixed, and mAP@0.5."""

    labels: int
    seconds: float
    worked: float
    map50: float
    seeds: int


def with_costs(rows: Sequence[dict], cost: CostModel) -> list[dict]:
    """``rows`` with ``annotation_s`` (with pre-annotations) and ``scratch_s`` (every box drawn) of their round
    under ``cost``; None for a row written before effort was counted."""
    found = []
    for row in rows:
        effort = RoundEffort.from_row(row)
        found.append({**row, "annotation_s": None if effort is None else round(cost.seconds(effort), 1),
                      "scratch_s": None if effort is None else round(cost.scratch_seconds(effort), 1)})
    return found


def effort_curve(rows: Sequence[dict], strategy: str, scratch: bool = False) -> list[EffortPoint]:
    """Mean cumulative effort and mAP@0.5 per labels count (rows from ``with_costs``); ``scratch``: without
    pre-annotations. Empty when a row of ``strategy`` has no effort counted (a run from before)."""
    mine = [r for r in rows if r["strategy"] == strategy]
    if any(r.get("annotation_s") is None for r in mine):
        return []
    by_labels: dict[int, list[tuple[float, float, float]]] = {}
    for seed in sorted({r["seed"] for r in mine}):
        seconds = worked = 0.0
        for row in sorted((r for r in mine if r["seed"] == seed), key=lambda r: int(r["round"])):
            effort = RoundEffort.from_row(row)
            assert effort is not None  # with_costs gave it seconds
            seconds += float(row["scratch_s"] if scratch else row["annotation_s"])
            worked += effort.truth_boxes if scratch else effort.worked
            by_labels.setdefault(int(row["labels"]), []).append((seconds, worked, float(row["map50"])))
    points = []
    for labels, values in sorted(by_labels.items()):
        seconds, worked, map50 = (float(np.mean([v[k] for v in values])) for k in range(3))
        points.append(EffortPoint(labels, seconds, worked, map50, len(values)))
    return points


def effort_to_reach(curve: Sequence[EffortPoint], target: float) -> Optional[tuple[float, float]]:
    """(seconds, boxes drawn or fixed) where the mean mAP@0.5 first reaches ``target``, linear between measured
    points; None when it never does."""
    previous: Optional[EffortPoint] = None
    for point in curve:
        if point.map50 >= target:
            if previous is None:
                return point.seconds, point.worked
            f = (target - previous.map50) / (point.map50 - previous.map50)
            return (previous.seconds + f * (point.seconds - previous.seconds),
                    previous.worked + f * (point.worked - previous.worked))
        previous = point
    return None


def map_at_seconds(curve: Sequence[EffortPoint], seconds: float) -> Optional[float]:
    """The mean mAP@0.5 after ``seconds`` of annotation (linear between measured points); None outside the curve."""
    if not curve or not curve[0].seconds <= seconds <= curve[-1].seconds:
        return None
    return float(np.interp(seconds, [p.seconds for p in curve], [p.map50 for p in curve]))


def effort_curves(rows: Sequence[dict], strategies: Sequence[str]) -> dict[str, list[EffortPoint]]:
    """Each strategy's effort curve with pre-annotations, and random's without (``NO_PRE``), on the labels
    counts every seed reached; strategies without effort counts are left out."""
    curves = {s: effort_curve(rows, s) for s in strategies}
    if BASELINE in strategies:
        curves = {NO_PRE: effort_curve(rows, BASELINE, scratch=True), **curves}
    complete_curves = {}
    for name, curve in curves.items():
        seeds = max((p.seeds for p in curve), default=0)
        if curve:
            complete_curves[name] = [p for p in curve if p.seeds == seeds]
    return complete_curves


def effort_markdown(rows: Sequence[dict], strategies: Sequence[str], cost: CostModel) -> list[str]:
    """The report's second summary: estimated annotation time and boxes drawn or fixed to reach random's final
    mAP@0.5, each strategy with pre-annotations against random without."""
    curves = effort_curves(rows, strategies)
    lines = ["## Annotation effort", ""]
    base = curves.get(NO_PRE)
    if not base:
        return lines + [f"No `{BASELINE}` run with effort counted: no annotation-time comparison.", ""]
    target = base[-1].map50
    reached_base = effort_to_reach(base, target)
    # strategies spend their rounds' minutes differently: compare them also after the same minutes, the fewest
    # any strategy ran to (a cheap strategy may end before it reaches the target)
    horizon = min(curve[-1].seconds for curve in curves.values())
    lines += [f"Target: {BASELINE}'s final mean mAP@0.5, {target:.4f} at {base[-1].labels} labels. Cost model "
              f"(seconds): draw {cost.draw_s:g}, adjust {cost.adjust_s:g}, delete {cost.delete_s:g}, accept "
              f"{cost.accept_s:g}, per image {cost.image_s:g}.", "",
              f"| strategy | minutes to reach the target | × {NO_PRE} | boxes drawn or fixed to reach it | "
              "final minutes | final boxes drawn or fixed | drawn / adjusted / deleted / accepted (mean per seed) | "
              f"mAP@0.5 after {horizon / 60:.1f} minutes |",
              "|---|---|---|---|---|---|---|---|"]
    for name, curve in curves.items():
        reached = effort_to_reach(curve, target)
        ratio = f"{reached[0] / reached_base[0]:.2f}" if reached and reached_base and reached_base[0] else "–"
        lines.append(f"| {name} | {_num(reached[0] / 60, 1) if reached else 'not reached'} | {ratio} | "
                     f"{_num(reached[1], 0) if reached else '–'} | {curve[-1].seconds / 60:.1f} | "
                     f"{curve[-1].worked:.0f} | {_actions(rows, name, curve[-1].labels)} | "
                     f"{_num(map_at_seconds(curve, horizon), 4)} |")
    lines += ["", "Estimated from the box actions the pool's ground truth needs on each picked image, given the "
              "boxes the serving model showed at MODEL_SCORE_THRESHOLD (same label; IoU >= 0.9 accepted, 0.5-0.9 "
              "adjusted, a shown box left over deleted, a true box left over drawn), times the cost model. The "
              "initial random batch is drawn from scratch in every run. Boxes drawn or fixed: drawn + adjusted + "
              "deleted. Interpolated linearly between measured points. The last column compares every strategy after "
              "the same estimated minutes: the fewest that any strategy's rounds took.", ""]
    return lines


def swept_thresholds(rows: Sequence[dict]) -> list[float]:
    """The thresholds a run counted effort at (rows' ``effort_at``), ascending."""
    return sorted({float(t) for row in rows for t in (row.get("effort_at") or {})})


def at_threshold(rows: Sequence[dict], threshold: float) -> list[dict]:
    """``rows`` with the effort counts they had at ``threshold`` (``effort_at``); a round without pre-annotations
    (the initial batch) costs the same at every threshold. Rows that did not count ``threshold`` are left out."""
    found = []
    for row in rows:
        counts = (row.get("effort_at") or {}).get(f"{threshold:g}")
        if counts is not None:
            found.append({**row, **dict(zip(EFFORT_FIELDS, counts))})
        elif str(row.get("round")) == "0":
            found.append(row)
    return found


def threshold_markdown(rows: Sequence[dict], strategies: Sequence[str], cost: CostModel) -> list[str]:
    """The estimated annotation time of each strategy if the server had shown boxes at each swept threshold: the
    picks and models are the run's, only what the annotator is shown changes."""
    thresholds = swept_thresholds(rows)
    base = effort_curves(with_costs(rows, cost), [BASELINE]).get(NO_PRE) if thresholds else None
    if not base:
        return []
    target = base[-1].map50
    reached_base = effort_to_reach(base, target)
    lines = ["## Pre-annotation threshold", "",
             f"The same picks and models, priced as if the server showed boxes at or above each threshold "
             f"(MODEL_SCORE_THRESHOLD). Target: {BASELINE}'s final mean mAP@0.5 ({target:.4f}); × is against "
             f"{NO_PRE} ({base[-1].seconds / 60:.1f} final minutes).", "",
             "| threshold | strategy | minutes to reach the target | × | final minutes | × | "
             "drawn / adjusted / deleted / accepted (mean per seed) |", "|---|---|---|---|---|---|---|"]
    for threshold in thresholds:
        priced = with_costs(at_threshold(rows, threshold), cost)
        for name, curve in effort_curves(priced, strategies).items():
            if name == NO_PRE:
                continue
            reached = effort_to_reach(curve, target)
            ratio = f"{reached[0] / reached_base[0]:.2f}" if reached and reached_base and reached_base[0] else "–"
            lines.append(f"| {threshold:g} | {name} | {_num(reached[0] / 60, 1) if reached else 'not reached'} | "
                         f"{ratio} | {curve[-1].seconds / 60:.1f} | {curve[-1].seconds / base[-1].seconds:.2f} | "
                         f"{_actions(priced, name, curve[-1].labels)} |")
    return lines + [""]


def _actions(rows: Sequence[dict], name: str, upto: int) -> str:
    """Mean per seed of the box actions of ``name`` up to ``upto`` labels."""
    strategy = BASELINE if name == NO_PRE else name
    mine = [RoundEffort.from_row(r) for r in rows if r["strategy"] == strategy and int(r["labels"]) <= upto]
    seeds = len({r["seed"] for r in rows if r["strategy"] == strategy}) or 1
    efforts = [e for e in mine if e is not None]
    if name == NO_PRE:
        return f"{sum(e.truth_boxes for e in efforts) / seeds:.0f} / 0 / 0 / 0"
    totals = [sum(getattr(e, k) for e in efforts) / seeds for k in ("drawn", "adjusted", "deleted", "accepted")]
    return " / ".join(f"{t:.0f}" for t in totals)


# --- files --------------------------------------------------------------------------------------------------------

def curves_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r["strategy"], r["seed"], r["round"])):
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    return buffer.getvalue()


def _cell(point: Optional[tuple]) -> str:
    if point is None:
        return "–"
    _, mean, sd, n = point
    return f"{mean:.4f} ± {sd:.4f} ({n})"


def _table(rows: Sequence[dict], strategies: Sequence[str], key: str) -> list[str]:
    curves = {s: {p[0]: p for p in mean_curve(rows, s, key)} for s in strategies}
    labels = sorted({labels for curve in curves.values() for labels in curve})
    lines = ["| labels | " + " | ".join(strategies) + " |", "|---" * (len(strategies) + 1) + "|"]
    for count in labels:
        lines.append(f"| {count} | " + " | ".join(_cell(curves[s].get(count)) for s in strategies) + " |")
    return lines


def report_markdown(rows: Sequence[dict], strategies: Sequence[str], cost: Optional[CostModel] = None) -> str:
    strategies = [s for s in strategies if any(r["strategy"] == s for r in rows)]
    lines = ["# Active-learning simulation", "",
             "mAP on the test split of the model served after each round (mean ± sd over seeds, number of seeds).",
             "", "## mAP@0.5", "", *_table(rows, strategies, "map50"), "",
             "## mAP@0.5:0.95", "", *_table(rows, strategies, "map50_95"), ""]
    # A run still going has label counts that only some seeds reached: the summary uses those all seeds reached.
    curves = {s: complete(mean_curve(rows, s)) for s in strategies}
    common = min((c[-1][0] for c in curves.values() if c), default=None)
    lines += ["## Summary", ""]
    baseline = curves.get(BASELINE)
    if baseline:
        target_labels, target = baseline[-1][0], baseline[-1][1]
        lines.append(f"Target: {BASELINE}'s final mean mAP@0.5, {target:.4f} at {target_labels} labels.")
    else:
        target_labels = target = None
        lines.append(f"No `{BASELINE}` strategy in this run: no labels-to-target comparison.")
    lines += ["", f"| strategy | labels to reach the target | × {BASELINE}'s | area under the mAP@0.5 curve "
              f"(mean mAP@0.5 up to {common} labels) | mean above {BASELINE}'s at | final labels | final mAP@0.5 |",
              "|---|---|---|---|---|---|---|"]
    for s in strategies:
        curve = curves[s]
        reached = labels_to_reach(curve, target) if target is not None else None
        ratio = f"{reached / target_labels:.2f}" if reached is not None and target_labels else "–"
        auc = area_under_curve(curve, common)
        above, shared = points_above(curve, baseline) if baseline and s != BASELINE else (None, None)
        lines.append(f"| {s} | {'not reached' if reached is None and target is not None else _num(reached, 0)} | "
                     f"{ratio} | {_num(auc, 4)} | {'–' if above is None else f'{above} of {shared} points'} | "
                     f"{curve[-1][0] if curve else '–'} | {_num(curve[-1][1] if curve else None, 4)} |")
    lines += ["", "Labels count annotated images, negatives included. Labels to reach the target are interpolated "
              "linearly between measured points; the first point counts as reached when it is already above. The "
              "summary uses the label counts every seed of a strategy has reached.", ""]
    cost = cost or CostModel()
    lines += effort_markdown(with_costs(rows, cost), strategies, cost)
    lines += threshold_markdown(rows, strategies, cost)
    return "\n".join(lines)


def points_above(curve: Sequence[tuple], baseline: Sequence[tuple]) -> tuple[int, int]:
    """(label counts where the mean curve lies above the baseline's, label counts both have)."""
    base = {labels: mean for labels, mean, *_ in baseline}
    shared = [(mean, base[labels]) for labels, mean, *_ in curve if labels in base]
    return sum(1 for mine, theirs in shared if mine > theirs), len(shared)


def _num(value: Optional[float], digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def plot_png(path: Path, rows: Sequence[dict], strategies: Sequence[str]) -> None:
    """mAP@0.5 against labelled images (left) and against estimated annotation time (right; rows from
    ``with_costs``; empty when no run counted effort)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (by_labels, by_time) = plt.subplots(1, 2, figsize=(11.5, 4.2), dpi=100)
    colours = {s: f"C{i}" for i, s in enumerate(strategies)}  # one colour per strategy in both panels
    colours[NO_PRE] = colours.get(BASELINE, "k")               # random's colour, dashed
    try:
        for strategy in strategies:
            curve = mean_curve(rows, strategy)
            if not curve:
                continue
            x = np.array([p[0] for p in curve])
            mean = np.array([p[1] for p in curve])
            sd = np.array([p[2] for p in curve])
            by_labels.plot(x, mean, marker="o", markersize=3, label=strategy, color=colours[strategy])
            by_labels.fill_between(x, mean - sd, mean + sd, alpha=0.2, color=colours[strategy])
        by_labels.set_xlabel("labelled images")
        by_labels.set_ylabel("test mAP@0.5")
        by_labels.set_title("Active learning: mean over seeds, band ± sd")
        for name, points in effort_curves(rows, strategies).items():
            by_time.plot([p.seconds / 60 for p in points], [p.map50 for p in points], marker="o", markersize=3,
                         label=name, linestyle="--" if name == NO_PRE else "-", color=colours[name])
        by_time.set_xlabel("estimated annotation minutes (cost model)")
        by_time.set_ylabel("test mAP@0.5")
        by_time.set_title("Against annotation time, with pre-annotations")
        for axes in (by_labels, by_time):
            axes.grid(alpha=0.3)
            if axes.get_legend_handles_labels()[0]:
                axes.legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        with atomic_write(path, durable=False) as handle:
            figure.savefig(handle, format="png")
    finally:
        plt.close(figure)


def write_outputs(out: Path, rows: Sequence[dict], strategies: Sequence[str],
                  cost: Optional[CostModel] = None) -> None:
    """curves.csv, report.md and curves.png in ``out``; annotation time under ``cost`` (default ``CostModel()``)."""
    cost = cost or CostModel()
    rows = with_costs(rows, cost)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "curves.csv", durable=False) as handle:
        handle.write(curves_csv(rows).encode())
    with atomic_write(out / "report.md", durable=False) as handle:
        handle.write(report_markdown(rows, strategies, cost).encode())
    plot_png(out / "curves.png", rows, strategies)
