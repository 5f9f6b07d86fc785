"""The simulator's outputs: curves.csv (one row per strategy, seed and round), report.md (mean ± sd per labels
count, labels needed to reach random's final mAP@0.5, area under the curve) and curves.png (mAP@0.5 against
labels, one line per strategy with a ± sd band over seeds)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..atomic import atomic_write

COLUMNS = ("strategy", "seed", "round", "labels", "map50", "map50_95", "train_s", "score_s", "published",
           "model_version", "epochs_run", "train_images", "val_images", "positives", "repeat_photos")
BASELINE = "random"


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


def report_markdown(rows: Sequence[dict], strategies: Sequence[str]) -> str:
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
    return "\n".join(lines)


def points_above(curve: Sequence[tuple], baseline: Sequence[tuple]) -> tuple[int, int]:
    """(label counts where the mean curve lies above the baseline's, label counts both have)."""
    base = {labels: mean for labels, mean, *_ in baseline}
    shared = [(mean, base[labels]) for labels, mean, *_ in curve if labels in base]
    return sum(1 for mine, theirs in shared if mine > theirs), len(shared)


def _num(value: Optional[float], digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def plot_png(path: Path, rows: Sequence[dict], strategies: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    try:
        for strategy in strategies:
            curve = mean_curve(rows, strategy)
            if not curve:
                continue
            x = np.array([p[0] for p in curve])
            mean = np.array([p[1] for p in curve])
            sd = np.array([p[2] for p in curve])
            axes.plot(x, mean, marker="o", markersize=3, label=strategy)
            axes.fill_between(x, mean - sd, mean + sd, alpha=0.2)
        axes.set_xlabel("labelled images")
        axes.set_ylabel("test mAP@0.5")
        axes.set_title("Active learning: mean over seeds, band ± sd")
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        with atomic_write(path, durable=False) as handle:
            figure.savefig(handle, format="png")
    finally:
        plt.close(figure)


def write_outputs(out: Path, rows: Sequence[dict], strategies: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "curves.csv", durable=False) as handle:
        handle.write(curves_csv(rows).encode())
    with atomic_write(out / "report.md", durable=False) as handle:
        handle.write(report_markdown(rows, strategies).encode())
    plot_png(out / "curves.png", rows, strategies)
