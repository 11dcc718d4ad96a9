"""Small inline SVG plots: loss curves, activation histograms, the checks' line plots.

Each returns the numbers a template draws (points, bars, ticks) rather than
markup, so jinja2's autoescape stays in charge of everything that reaches HTML.
"""

from __future__ import annotations

import math

import numpy as np


def _num(value: float) -> str:
    """A coordinate to one decimal, without a trailing `.0`."""
    return f"{value:.1f}".removesuffix(".0")


def loss_points(curve: np.ndarray, width: int = 160, height: int = 40) -> str:
    """SVG polyline points of a loss curve, scaled to fill width x height."""
    curve = np.nan_to_num(np.asarray(curve, np.float64))
    if curve.size < 2:
        return ""
    lo, hi = float(curve.min()), float(curve.max())
    span = hi - lo or 1.0
    xs = np.linspace(0, width, curve.size)
    ys = height - (curve - lo) / span * height
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))


HIST_WIDTH, HIST_HEIGHT = 240, 60  # plot area of an activation histogram, SVG user units


def _label(value: float) -> str:
    text = f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return text.replace("-", "−")


def histogram_plot(counts: np.ndarray, edges: np.ndarray, marks: dict[str, float] | None = None) -> dict | None:
    """Bars of a histogram on fixed bins, cut to the bins that have counts plus one empty bin each side.

    Args:
        counts: [B] counts per bin.
        edges: [B + 1] bin edges.
        marks: label -> value drawn as a vertical line (the range widens to show it).

    Returns:
        The bars as one SVG path in a HIST_WIDTH x HIST_HEIGHT box, the counts
        per bin as text, the end labels, where 0 and each mark fall; None when
        every count is 0.
    """
    counts = np.asarray(counts, np.int64)
    edges = np.asarray(edges, np.float64)
    filled = np.flatnonzero(counts > 0)
    if not filled.size or len(edges) != len(counts) + 1:
        return None
    at = lambda v: float(np.interp(np.arcsinh(v), np.arcsinh(edges), np.arange(len(edges))))  # noqa: E731
    marks = {k: v for k, v in (marks or {}).items() if v is not None and np.isfinite(v)}
    lo = min([filled[0] - 1] + [math.floor(at(v)) for v in marks.values()])
    hi = max([filled[-1] + 2] + [math.ceil(at(v)) for v in marks.values()])
    lo, hi = max(lo, 0), min(hi, len(counts))
    unit = HIST_WIDTH / (hi - lo)
    top = int(counts.max())
    width = _num(max(unit - 1, 0.5))
    path = "".join(f"M{_num((b - lo) * unit)} {HIST_HEIGHT}V{_num(HIST_HEIGHT * (1 - counts[b] / top))}h{width}"
                   f"V{HIST_HEIGHT}z" for b in filled)
    listed = "; ".join(f"{_label(edges[b])} to {_label(edges[b + 1])}: {counts[b]}" for b in filled)
    x = lambda v: f"{(at(v) - lo) * unit:.1f}"  # noqa: E731
    zero = (at(0.0) - lo) * unit
    return {"path": path, "counts": listed, "width": HIST_WIDTH, "height": HIST_HEIGHT, "top": top,
            "left": _label(edges[lo]), "right": _label(edges[hi]),
            "zero": x(0.0) if edges[lo] < 0 < edges[hi] else None,
            "zero_label": 30 < zero < HIST_WIDTH - 30,  # clear of the end labels
            "marks": [{"label": k, "x": x(v), "value": _label(v), "anchor": _anchor((at(v) - lo) * unit)}
                      for k, v in marks.items()]}


def _anchor(x: float) -> str:
    """Text anchor that keeps a label near either end inside the plot."""
    return "end" if x > HIST_WIDTH - 40 else "start" if x < 40 else "middle"


PLOT_WIDTH, PLOT_HEIGHT = 220, 90  # plot area of a check's line plot, SVG user units


def line_plot(series: list[tuple[str, str, np.ndarray]], xs: np.ndarray, y_range: tuple[float, float],
              x_labels: list[str] | None = None, level: float | None = None) -> dict:
    """A small line plot for inline SVG: polylines, axis ticks, an optional horizontal level.

    Args:
        series: (label, CSS class, ys) per line; ys are aligned with `xs`, NaN points are dropped.
        xs: x values.
        y_range: the y axis (widened to hold the data).
        x_labels: a label per x value (drawn slanted under the axis); else the ends of xs.
        level: y of a dashed horizontal line (a threshold).

    Returns:
        width, height (of the plot area), lines (label, cls, points), x_ticks and
        y_ticks (position and label), level (its y), and bottom and right (room
        beside the plot area for labels).
    """
    xs = np.asarray(xs, np.float64)
    finite = [np.asarray(ys, np.float64) for _, _, ys in series]
    values = np.concatenate([v[np.isfinite(v)] for v in finite] + [np.array(y_range, np.float64)])
    lo, hi = float(values.min()), float(values.max())
    lo = lo if lo >= y_range[0] else math.floor(lo * 10) / 10  # round numbers at the ends of the axis
    hi = hi if hi <= y_range[1] else math.ceil(hi * 10) / 10
    span_x = float(xs.max() - xs.min()) or 1.0
    x = lambda v: (v - xs.min()) / span_x * PLOT_WIDTH  # noqa: E731
    y = lambda v: PLOT_HEIGHT - (v - lo) / ((hi - lo) or 1.0) * PLOT_HEIGHT  # noqa: E731
    lines = []
    for (label, cls, _), ys in zip(series, finite):
        ok = np.isfinite(ys)
        lines.append({"label": label, "cls": cls,
                      "points": " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(xs[ok], ys[ok]))})
    if x_labels is not None:
        x_ticks = [{"x": f"{x(a):.1f}", "label": text} for a, text in zip(xs, x_labels)]
    else:
        x_ticks = [{"x": f"{x(a):.1f}", "label": _label(a)} for a in (xs.min(), xs.max())]
    y_ticks = [{"y": f"{y(v):.1f}", "label": _label(v)} for v in sorted({lo, hi, 0.0}) if lo <= v <= hi]
    return {"width": PLOT_WIDTH, "height": PLOT_HEIGHT, "lines": lines, "x_ticks": x_ticks,
            "slanted": x_labels is not None, "y_ticks": y_ticks,
            "level": f"{y(level):.1f}" if level is not None and lo <= level <= hi else None,
            "bottom": 64 if x_labels is not None else 16, "right": 66 if x_labels is not None else 10}
