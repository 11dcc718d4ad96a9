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

# Feature visualizations, sprites and heatmaps: AVIF where Pillow can write it. On
# real 128 px renders AVIF at quality 50 takes 3.6 KB for what WebP at quality 85
# (which looks alike) takes 8.6 KB; without AVIF, WebP; without either, JPEG.
PICTURE_EXT = "avif" if features.check("avif") else "webp" if features.check("webp") else "jpg"
# Quality per kind of picture, on each format's own scale.
# Heatmaps are encoded at 4:4:4; AVIF 55 errs like WebP 70 on real maps and is 10 % smaller.
# The randomization strips ("strip") compare maps that differ little, in one file per model.
QUALITY = {"avif": {"picture": 50, "sprite": 45, "heat": 55, "strip": 80, "crops": 50},
           "webp": {"picture": 85, "sprite": 80, "heat": 70, "strip": 90, "crops": 80},
           "jpg": {"picture": 85, "sprite": 80, "heat": 75, "strip": 90, "photo": 88, "crops": 85}}
AVIF_SPEED = 9  # encoder effort: 2 ms per 128 px image, within 3 % of the size speed 6 reaches in 15 ms
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


def encode(pixels: np.ndarray, kind: str = "picture", ext: str = PICTURE_EXT) -> bytes:
    """Encodes a uint8 [H, W, 3] image as AVIF, WebP, JPEG or PNG bytes (by `ext`).

    `kind` picks the quality (see QUALITY): "picture" for feature
    visualizations, "sprite" for grid thumbnails, "heat" for attribution maps,
    "strip" for the checks page's randomization strips, "crops" for a unit's
    dataset-example crops, "photo" for dataset images (JPEG only).
    """
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    buf = io.BytesIO()
    if ext == "avif":
        image.save(buf, "AVIF", quality=QUALITY["avif"][kind], speed=AVIF_SPEED,
                   subsampling="4:4:4" if kind in ("heat", "strip") else "4:2:0")
    elif ext == "webp":
        image.save(buf, "WEBP", quality=QUALITY["webp"][kind], method=4)
    elif ext == "jpg":
        image.save(buf, "JPEG", quality=QUALITY["jpg"][kind], optimize=True)
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


def shrink(pixels: np.ndarray, side: int) -> np.ndarray:
    """A square picture [S, S, 3] at `side` pixels (Lanczos); as it is when `side` is S or more."""
    if side >= pixels.shape[0]:
        return pixels
    image = Image.fromarray(np.ascontiguousarray(pixels)).resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(image)


def views_strip(views: list[np.ndarray], scale: float = 1.0) -> np.ndarray:
    """One unit's views other than `channel` in one strip [s, n*s, 3], each image at `scale` of its side.

    Each view is a picture [S, S, 3] or a set [k, S, S, 3]; their images go
    side by side in the order given. One file per unit instead of one per view:
    an AVIF file carries about 300 bytes of container, a large share of a 64 px image.
    """
    tiles = [t for v in views for t in (v if v.ndim == 4 else v[None])]
    side = max(16, round(tiles[0].shape[0] * scale))
    return strip(np.stack([shrink(t, side) for t in tiles]))


def decode_crops(data: np.ndarray, k: int) -> np.ndarray:
    """A stored strip of k example crops (JPEG bytes, see atlas/dataset/examples.py) as [k, s, s, 3].

    A strip cut when fewer than k images had been seen holds fewer tiles: the missing ones are grey."""
    strip_ = np.asarray(Image.open(io.BytesIO(np.asarray(data, np.uint8).tobytes())).convert("RGB"))
    side = strip_.shape[0]
    held = min(k, strip_.shape[1] // side)
    tiles = np.full((k, side, side, 3), EMPTY, np.uint8)
    tiles[:held] = strip_[:, :held * side].reshape(side, held, side, 3).transpose(1, 0, 2, 3)
    return tiles


def examples_strip(lists: list[np.ndarray], side: int) -> np.ndarray:
    """A unit's example crops, every list ([k, s, s, 3] each: top, then bottom) in one strip at `side` px."""
    tiles = np.concatenate(lists)
    return strip(np.stack([shrink(t, side) for t in tiles]) if side < tiles.shape[1] else tiles)


def window(first: int, count: int, total: int) -> str:
    """CSS background position and size that show tiles first..first+count-1 of a strip of `total`
    tiles in an element as wide as `count` tiles (percentages, so the element may shrink)."""
    return f"{tile_position(first, total - count + 1)} 0/{total / count * 100:.4g}% 100%"


def preview_strip(images: np.ndarray, done: np.ndarray) -> np.ndarray:
    """The first PREVIEW_UNITS visualizations side by side, as thumbnails."""
    n = min(PREVIEW_UNITS, len(images))
    chunk = images[:n].copy()
    chunk[~done[:n]] = EMPTY
    size = images.shape[1]
    return _shrink(_tile(chunk, n), size, min(CELL, size))


# Sequential colormap anchors (white - yellow - orange - red), from 0 to +1, for unsigned maps.
_SEQ_ANCHORS = np.array([[255, 255, 255], [255, 237, 160], [254, 217, 118], [254, 178, 76], [253, 141, 60],
                         [252, 78, 42], [227, 26, 28], [189, 0, 38], [128, 0, 38]], np.float32)
_SEQ_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_SEQ_ANCHORS)), _SEQ_ANCHORS[:, c])
                     for c in range(3)], axis=1).round().astype(np.uint8)
HEAT_SIDE = 112  # pixels of one heatmap in an image page's sprite (half a 224 px input, shown at ~140 CSS px)
STRIP_SIDE = 56  # pixels (and CSS pixels) of one map of a randomization strip on the checks page
UNIT_HEAT_SIDE = 48  # pixels of one unit-attribution map (shown over a 96 px crop): one file per unit
# Layers under a heatmap tile: a white veil over the photo, desaturated; the tile multiplies onto them,
# so white (no attribution) leaves the photo visible and colour tints it.
UNDER = "linear-gradient(#fff9,#fff9),linear-gradient(#888,#888)"


def heatmap(values: np.ndarray, signed: bool = True) -> tuple[np.ndarray, float]:
    """Colours a map [H, W]: signed maps symmetrically around 0 (blue < 0 < red), unsigned from 0 up.

    The scale is the 99.5th percentile of |value| (of the positive part for an
    unsigned map), so a few extreme pixels do not wash the rest out; NaN counts
    as 0. Returns the RGB image and that scale.
    """
    values = np.nan_to_num(values.astype(np.float32))
    if not signed:
        values = np.maximum(values, 0)
    magnitude = np.abs(values)
    scale = float(np.percentile(magnitude, 99.5)) or float(magnitude.max()) or 1.0
    if signed:
        return _LUT[np.clip((values / scale + 1) * 127.5, 0, 255).astype(np.uint8)], scale
    return _SEQ_LUT[np.clip(values / scale * 255, 0, 255).astype(np.uint8)], scale


def sequential(values: np.ndarray) -> np.ndarray:
    """Colours values in [0, 1] (clipped; NaN as 0) with the unsigned colormap, on that fixed scale: uint8 [..., 3]."""
    return _SEQ_LUT[np.clip(np.rint(np.nan_to_num(np.asarray(values, np.float64)) * 255), 0, 255).astype(np.uint8)]


def resize_map(values: np.ndarray, side: int) -> np.ndarray:
    """A float map [H, W] averaged (or stretched) to [side, side]; a NaN spreads to the pixels it touches."""
    values = np.asarray(values, np.float32)
    if values.shape == (side, side):
        return values
    resample = Image.Resampling.BOX if side <= min(values.shape) else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(values, "F").resize((side, side), resample))


def map_sprite(rows: list[list[np.ndarray | None]], signed: list[bool],
               side: int) -> tuple[np.ndarray, list[list[float | None]]]:
    """Heatmaps in a grid, one column per method and one row per target; returns the RGB sheet and each scale.

    Args:
        rows: maps [H, W] per row and column; None leaves a white tile.
        signed: per column, whether the method's maps are signed.
        side: pixels of one tile.
    """
    return heat_grid([[None if v is None else (v, signed[c]) for c, v in enumerate(row)] for row in rows],
                     side, len(signed))


def heat_grid(cells: list[list[tuple[np.ndarray, bool] | None]], side: int,
              columns: int | None = None) -> tuple[np.ndarray, list[list[float | None]]]:
    """Heatmaps in a grid, each tile on its own palette and scale; returns the RGB sheet and each scale.

    Args:
        cells: per row, (map [H, W], signed) per column; None, or a short row, leaves white tiles.
        side: pixels of one tile.
        columns: tiles per row; default the longest row.
    """
    columns = columns if columns is not None else max((len(row) for row in cells), default=0)
    sheet = np.full((len(cells) * side, columns * side, 3), 255, np.uint8)
    scales: list[list[float | None]] = []
    for r, row in enumerate(cells):
        scales.append([])
        for c, cell in enumerate(row):
            if cell is None:
                scales[-1].append(None)
                continue
            colours, scale = heatmap(resize_map(cell[0], side), cell[1])
            sheet[r * side:(r + 1) * side, c * side:(c + 1) * side] = colours
            scales[-1].append(scale)
    return sheet, scales


def unit_strip(maps: np.ndarray, side: int) -> tuple[np.ndarray | None, float]:
    """A unit's attribution maps [K, R, R] side by side on one scale (signed): [side, K*side, 3].

    A map that is all NaN (no image) stays white. Returns None when every map is NaN.
    """
    maps = np.asarray(maps, np.float32)
    if not np.isfinite(maps).any():
        return None, 0.0
    colours, scale = heatmap(np.concatenate([resize_map(m, side) for m in maps], axis=1))
    return colours, scale


def tile_position(index: int, count: int) -> str:
    """CSS background-position (a percentage) of tile `index` of `count` along one axis of a sprite."""
    return "0%" if count <= 1 else f"{index / (count - 1) * 100:.4g}%"


def overlay_background(tile: str, tile_at: str, tile_size: str, photo: str, photo_at: str, photo_size: str) -> str:
    """The `background` shorthand that draws a heatmap tile over a grey, veiled photo (see atlas.css `.hu`).

    Four layers: the tile, a white veil, a grey that takes the photo's colour
    away, the photo; the stylesheet supplies their repeat and blend modes.
    """
    return f"background:url({tile}) {tile_at}/{tile_size},{UNDER},url({photo}) {photo_at}/{photo_size}"


def colorbar_css(signed: bool = True) -> str:
    """A CSS linear-gradient of the diverging (signed) or sequential heatmap colormap, for the legend."""
    anchors = _ANCHORS if signed else _SEQ_ANCHORS
    stops = ", ".join(f"rgb({r},{g},{b})" for r, g, b in anchors.astype(int))
    return f"linear-gradient(to right, {stops})"


def _px(value: float) -> str:
    """CSS pixels, whole: half a pixel of a crop's offset is invisible, and a unit page has many crops."""
    return f"{round(value)}px"


def crop_geometry(box: np.ndarray, image_size: int, display: int = 96) -> dict:
    """Where a crop box `x0, y0, x1, y1` of a stored image shows in an element `display` px wide at most.

    Returns the element's size ("" for the stylesheet's square), and the
    image's background position and size that leave only the box visible.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    s = display / max(w, h)
    return {"size": "" if w == h else f"width:{_px(w * s)};height:{_px(h * s)};",
            "at": f"{_px(-x0 * s)} {_px(-y0 * s)}", "scale": _px(image_size * s)}


def crop_style(box: np.ndarray, image_href: str, image_size: int, display: int = 96) -> str:
    """Inline CSS that shows the box `x0, y0, x1, y1` of a stored image, `display` px wide at most.

    The element's background is the whole dataset image, scaled and shifted so
    that only the box shows: one JPEG serves every crop of that image. The
    stylesheet makes crops `display` px square and unrepeated; other shapes set their size.
    """
    g = crop_geometry(box, image_size, display)
    return f"{g['size']}background:url({image_href}) {g['at']}/{g['scale']}"
