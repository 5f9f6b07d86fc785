"""Small SVG charts drawn on the server, so the dashboard needs no chart library and no network.

``line_chart`` draws points against two numeric axes (the learning curve: validation mAP against annotated
images); ``bar_chart`` draws horizontal bars per category (mAP per class). Both return one ``<svg>`` element as
text, sized by a viewBox so it scales with the page, with a ``<title>`` per mark (hover shows the numbers) and
an ``aria-label`` describing the chart. Text is escaped; numbers are the only thing taken from data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Optional, Sequence

# Colour-blind-safe pair (blue, orange) and greys for axes and grid.
PALETTE = ("#1f77b4", "#e8710a", "#2ca02c", "#9467bd")
AXIS = "#555"
GRID = "#e3e3e3"
FONT = "font-family:system-ui,sans-serif;font-size:12px"


@dataclass
class Point:
    x: float
    y: float
    filled: bool = True     # hollow marks a point that is shown but not joined (e.g. a rejected run)
    label: str = ""         # hover text


@dataclass
class Series:
    name: str
    points: list[Point] = field(default_factory=list)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= value (axis ends people read easily)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value - 1e-12:
            return step * power
    return 10 * power


def ticks(top: float, count: int = 5) -> list[float]:
    """``count`` + 1 evenly spaced tick values from 0 to ``top``."""
    return [top * i / count for i in range(count + 1)]


def _number(value: float) -> str:
    """A tick label: 4, 250, 1000; 0.1, 0.025 (three significant digits below 1, so small steps stay apart)."""
    return f"{value:g}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def line_chart(series: Sequence[Series], title: str, x_label: str, y_label: str, width: int = 640,
               height: int = 320, y_top: Optional[float] = None, y_min_top: float = 0.0,
               empty_message: str = "no data yet", note: str = "") -> str:
    """Points of each series joined by a line through its filled points; hollow points are drawn unjoined.
    The y axis ends at ``y_top``, else at a round number above the data, at least ``y_min_top`` (so that tiny
    differences do not fill the chart) and at most 1. ``note`` is a line under the legend (e.g. what filled and
    hollow mean)."""
    points = [p for s in series for p in s.points]
    if not points:
        height = min(height, 90)  # just the title and the message
    left, right, top, bottom = 56, 16, 34, 72 if note else 56
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = _titled(width, height, title)
    if not points:
        return _empty(parts, width, height, empty_message)
    x_max = nice_ceiling(max(p.x for p in points) * 1.05)
    y_max = y_top if y_top is not None else \
        min(1.0, max(y_min_top, nice_ceiling(max(p.y for p in points) * 1.1))) or 1.0

    def sx(x: float) -> float:
        return left + plot_w * x / x_max

    def sy(y: float) -> float:
        return top + plot_h * (1 - y / y_max)

    # grid and axes
    for value in ticks(y_max):
        y = sy(value)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="{GRID}"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{AXIS}" '
                     f'style="{FONT}">{_number(value)}</text>')
    for value in ticks(x_max):
        x = sx(value)
        parts.append(f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 4}" '
                     f'stroke="{AXIS}"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 17}" text-anchor="middle" fill="{AXIS}" '
                     f'style="{FONT}">{_number(value)}</text>')
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
                 f'stroke="{AXIS}"/><line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="{AXIS}"/>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h + 34}" text-anchor="middle" fill="{AXIS}" '
                 f'style="{FONT}">{escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle" '
                 f'fill="{AXIS}" style="{FONT}">{escape(y_label)}</text>')
    # series
    legend_x = left
    for index, item in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        joined = sorted((p for p in item.points if p.filled), key=lambda p: p.x)
        if len(joined) > 1:
            path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in joined)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for p in item.points:
            fill = color if p.filled else "#fff"
            parts.append(f'<circle class="point" cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="4.5" fill="{fill}" '
                         f'stroke="{color}" stroke-width="2"><title>{escape(p.label)}</title></circle>')
        legend_y = height - (30 if note else 12)
        parts.append(f'<rect x="{legend_x}" y="{legend_y - 9}" width="14" height="4" fill="{color}"/>'
                     f'<text x="{legend_x + 20}" y="{legend_y - 3}" style="{FONT}">{escape(item.name)}</text>')
        legend_x += 40 + 7 * len(item.name)
    if note:
        parts.append(f'<text x="{left}" y="{height - 8}" fill="{AXIS}" style="{FONT}">{escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(categories: Sequence[str], series: Sequence[tuple[str, Sequence[Optional[float]]]], title: str,
              width: int = 640, x_top: float = 1.0, empty_message: str = "no data yet",
              notes: Optional[Sequence[Optional[str]]] = None) -> str:
    """Horizontal bars: one group per category, one bar per series (None: no bar). A category without any value
    gets its ``notes`` entry written instead (default: it had no boxes among the validation images)."""
    left, right, top = 110, 48, 34
    bar_h, gap = 14, 12
    group_h = bar_h * max(1, len(series)) + gap
    height = top + group_h * max(1, len(categories)) + 40
    plot_w = width - left - right
    parts = _titled(width, height, title)
    if not categories:
        return _empty(parts, width, height, empty_message)
    bottom = top + group_h * len(categories)
    for tick in ticks(x_top):
        x = left + plot_w * tick / x_top
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{bottom}" stroke="{GRID}"/>'
                     f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle" fill="{AXIS}" '
                     f'style="{FONT}">{_number(tick)}</text>')
    for row, category in enumerate(categories):
        y0 = top + row * group_h
        parts.append(f'<text x="{left - 8}" y="{y0 + group_h / 2:.1f}" text-anchor="end" style="{FONT}">'
                     f'{escape(category)}</text>')
        for index, (name, values) in enumerate(series):
            value = values[row] if row < len(values) else None
            y = y0 + index * bar_h
            color = PALETTE[index % len(PALETTE)]
            if value is None:
                if all(v[row] is None for _, v in series if row < len(v)) and index == 0:
                    note = (notes[row] if notes and row < len(notes) else None) or \
                        f"no value (no {category} boxes among the validation images)"
                    parts.append(f'<text x="{left + 4}" y="{y + bar_h - 3}" fill="{AXIS}" style="{FONT}" '
                                 f'class="bar-note">{escape(note)}</text>')
                continue
            w = plot_w * max(0.0, min(value, x_top)) / x_top
            parts.append(f'<rect class="bar" x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                         f'fill="{color}"><title>{escape(category)} {escape(name)}: {value:.3f}</title></rect>'
                         f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 3}" style="{FONT}">{value:.3f}</text>')
    legend_x = left
    for index, (name, _) in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        parts.append(f'<rect x="{legend_x}" y="{height - 17}" width="14" height="8" fill="{color}"/>'
                     f'<text x="{legend_x + 20}" y="{height - 9}" style="{FONT}">{escape(name)}</text>')
        legend_x += 40 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def _titled(width: int, height: int, title: str) -> list[str]:
    """The opening of a chart: the svg element and its title line."""
    return [_svg_open(width, height, title),
            f'<text x="{width / 2:.0f}" y="20" text-anchor="middle" style="{FONT};font-size:14px;'
            f'font-weight:600">{escape(title)}</text>']


def _empty(parts: list[str], width: int, height: int, message: str) -> str:
    """A chart with nothing to draw: its title and ``message``."""
    parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" fill="{AXIS}" '
                 f'style="{FONT}" class="chart-empty">{escape(message)}</text></svg>')
    return "".join(parts)


def _svg_open(width: int, height: int, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
            f'style="max-width:{width}px" role="img" aria-label="{escape(title)}" class="chart">')
