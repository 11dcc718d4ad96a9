"""Image encoding for the site: compact files, sprite sheets, heatmaps, crop styles.

Every image is encoded once. Layer grids draw their units from a few sprite
sheets; dataset examples are CSS crops of the one JPEG stored per dataset
image, so no crop is ever written as a file of its own.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, features

WEBP = features.check("webp")
PICTURE_EXT = "webp" if WEBP else "jpg"  # feature visualizations, sprites, heatmaps
CELL = 64  # displayed side of one grid cell, CSS pixels
SHEET_COLUMNS = 16
SHEET_UNITS = 256  # units per sprite sheet: a 2,048-unit layer needs 8 sheets
PREVIEW_UNITS = 8  # units in a layer's preview strip
EMPTY = 235  # grey of a unit that has no visualization yet

# Diverging colormap anchors (blue - white - red), from -1 to +1.
_ANCHORS = np.array([[5, 48, 97], [33, 102, 172], [67, 147, 195], [146, 197, 222], [209, 229, 240],
                     [247, 247, 247], [253, 219, 199], [244, 165, 130], [214, 96, 77],
                     [178, 24, 43], [103, 0, 31]], np.float32)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                 for c in range(3)], axis=1).round().astype(np.uint8)


def encode(pixels: np.ndarray, ext: str = PICTURE_EXT, quality: int = 85) -> bytes:
    """Encodes a uint8 [H, W, 3] image as WebP, JPEG or PNG bytes (by `ext`)."""
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    buf = io.BytesIO()
    if ext == "webp":
        image.save(buf, "WEBP", quality=quality, method=4)
    elif ext == "jpg":
        image.save(buf, "JPEG", quality=quality, optimize=True)
    else:
        image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _tile(images: np.ndarray, columns: int) -> np.ndarray:
    """[N, S, S, 3] -> one [rows*S, columns*S, 3] image, row-major, padded with grey."""
    n, s = images.shape[0], images.shape[1]
    rows = math.ceil(n / columns)
    padded = np.full((rows * columns, s, s, 3), EMPTY, np.uint8)
    padded[:n] = images
    return padded.reshape(rows, columns, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * s, columns * s, 3)


def _shrink(sheet: np.ndarray, size: int, cell: int) -> np.ndarray:
    """Resizes a sheet of `size`-pixel tiles to `cell`-pixel tiles.

    Integer ratios average whole tiles exactly, so no tile bleeds into the next.
    """
    if cell == size:
        return sheet
    image = Image.fromarray(sheet)
    if size % cell == 0:
        image = image.reduce(size // cell)
    else:
        shape = (sheet.shape[1] // size * cell, sheet.shape[0] // size * cell)
        image = image.resize(shape, Image.Resampling.BOX)
    return np.asarray(image)


@dataclass(frozen=True)
class Sheet:
    """Where a sprite sheet puts its units."""

    columns: int
    rows: int
    cell: int  # pixels of one unit in the sheet

    def css_size(self) -> str:
        return f"{self.columns * CELL}px {self.rows * CELL}px"


def sprite_sheet(images: np.ndarray, done: np.ndarray) -> tuple[np.ndarray, Sheet]:
    """Tiles up to SHEET_UNITS visualizations [n, S, S, 3] into one sheet of thumbnails.

    Units not rendered yet (`done` False) are grey. Thumbnails are at most CELL
    pixels, the displayed size, so sheets stay small.
    """
    size = images.shape[1]
    cell = min(CELL, size)
    chunk = images[:SHEET_UNITS].copy()
    chunk[~done[:SHEET_UNITS]] = EMPTY
    columns = min(SHEET_COLUMNS, len(chunk))
    return _shrink(_tile(chunk, columns), size, cell), Sheet(columns, math.ceil(len(chunk) / columns), cell)


def strip(images: np.ndarray) -> np.ndarray:
    """A set of images [k, S, S, 3] side by side: [S, k*S, 3], one file instead of k."""
    return _tile(images, len(images))


def preview_strip(images: np.ndarray, done: np.ndarray) -> np.ndarray:
    """The first PREVIEW_UNITS visualizations side by side, as thumbnails."""
    n = min(PREVIEW_UNITS, len(images))
    chunk = images[:n].copy()
    chunk[~done[:n]] = EMPTY
    size = images.shape[1]
    return _shrink(_tile(chunk, n), size, min(CELL, size))


def heatmap(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Colours a signed map [H, W] symmetrically around 0: blue < 0 < red.

    The scale is the 99.5th percentile of |value|, so a few extreme pixels do
    not wash the rest out; returns the RGB image and that scale.
    """
    values = np.nan_to_num(values.astype(np.float32))
    scale = float(np.percentile(np.abs(values), 99.5)) or float(np.abs(values).max()) or 1.0
    index = np.clip((values / scale + 1) * 127.5, 0, 255).astype(np.uint8)
    return _LUT[index], scale


def colorbar_css() -> str:
    """A CSS linear-gradient of the heatmap colormap, for the legend."""
    stops = ", ".join(f"rgb({r},{g},{b})" for r, g, b in _ANCHORS.astype(int))
    return f"linear-gradient(to right, {stops})"


def _px(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0") + "px"


def crop_style(box: np.ndarray, image_href: str, image_size: int, display: int = 96) -> str:
    """Inline CSS that shows the box `x0, y0, x1, y1` of a stored image, `display` px wide at most.

    The element's background is the whole dataset image, scaled and shifted so
    that only the box shows: one JPEG serves every crop of that image. The
    stylesheet makes crops `display` px square; other shapes set their size.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    s = display / max(w, h)
    size = "" if w == h else f"width:{_px(w * s)};height:{_px(h * s)};"
    return f"{size}background:url({image_href}) {_px(-x0 * s)} {_px(-y0 * s)}/{_px(image_size * s)} no-repeat"


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
        Bars (x, y, w, h, title) in a HIST_WIDTH x HIST_HEIGHT box, the end labels,
        where 0 and each mark fall; None when every count is 0.
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
    bars = [{"x": f"{(b - lo) * unit:.1f}", "w": f"{max(unit - 1, 0.5):.1f}",
             "y": f"{HIST_HEIGHT * (1 - counts[b] / top):.1f}", "h": f"{HIST_HEIGHT * counts[b] / top:.1f}",
             "title": f"{_label(edges[b])} to {_label(edges[b + 1])}: {counts[b]}"} for b in filled]
    x = lambda v: f"{(at(v) - lo) * unit:.1f}"  # noqa: E731
    zero = (at(0.0) - lo) * unit
    return {"bars": bars, "width": HIST_WIDTH, "height": HIST_HEIGHT, "top": top,
            "left": _label(edges[lo]), "right": _label(edges[hi]),
            "zero": x(0.0) if edges[lo] < 0 < edges[hi] else None,
            "zero_label": 30 < zero < HIST_WIDTH - 30,  # clear of the end labels
            "marks": [{"label": k, "x": x(v), "value": _label(v), "anchor": _anchor((at(v) - lo) * unit)}
                      for k, v in marks.items()]}


def _anchor(x: float) -> str:
    """Text anchor that keeps a label near either end inside the plot."""
    return "end" if x > HIST_WIDTH - 40 else "start" if x < 40 else "middle"
