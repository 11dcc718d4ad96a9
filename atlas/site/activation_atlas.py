"""A layer's activation atlas page (`<layer>/atlas.html`): the cells of its layout as one zoomable picture.

The picture is one file: each kept cell's feature visualization at its place
on the grid, blank where the layout left too few activations. Over it lies one
focusable box per cell, which names the class the cell most supports and links
to the units that align with it most; atlas.js zooms the picture (without
scripts it scrolls at its first size), and a table below lists every cell.
"""

from __future__ import annotations

import h5py
import numpy as np

from atlas.site import pictures as img
from atlas.site.data import Model
from atlas.site.pages import class_name, crumbs
from atlas.store import read_attrs
from atlas.store.schema import ACTIVATION_ATLAS

PAGE = "atlas.html"
BLANK = 255  # the picture where no cell is: white, as in the paper's atlases
SHOWN_SIDE = 960  # CSS pixels of the picture at zoom 1, at most (64 per cell where fewer cells fit)
LABEL_AT = 64  # CSS pixels a cell needs on screen before every cell shows its class


def page_of(group: h5py.Group) -> str | None:
    """The layer folder's activation atlas page, if the store has an atlas of the layer."""
    atlas = group.get(ACTIVATION_ATLAS)
    return PAGE if isinstance(atlas, h5py.Group) and isinstance(atlas.get("row"), h5py.Dataset) else None


def render_atlas(model: Model, i: int, group: h5py.Group, w) -> str | None:
    """Writes layer i's activation atlas page and picture; returns the page's href from the model folder.

    Args:
        group: the layer's group in the store.
        w: the model folder's SiteWriter.

    Returns:
        `<layer>/atlas.html`, or None where the store has no atlas of the layer.
    """
    if page_of(group) is None:
        return None
    layer = model.layers[i]
    atlas = group[ACTIVATION_ATLAS]
    a = {k: atlas[k][()] for k in ("row", "col", "count", "class", "class_score", "units", "unit_weight",
                                   "image", "done")}
    attrs = read_attrs(atlas)
    grid = int(attrs.get("grid", int(max(a["row"].max(initial=0), a["col"].max(initial=0)) + 1)))
    src = f"atlas.{img.PICTURE_EXT}"
    drawn = isinstance(atlas.get("images"), h5py.Dataset) and bool(a["done"].any())
    if drawn:
        w.write(f"{layer.slug}/{src}", img.encode(atlas_picture(atlas["images"], a["row"], a["col"], a["done"],
                                                                grid), "sprite"), "featurevis")
    w.page(f"{layer.slug}/{PAGE}", "atlas.html",
           **atlas_context(model, i, a, attrs, grid, src if drawn else None,
                           read_attrs(atlas["images"]) if drawn else {}))
    return f"{layer.slug}/{PAGE}"


def atlas_picture(images: h5py.Dataset, row: np.ndarray, col: np.ndarray, done: np.ndarray,
                  grid: int) -> np.ndarray:
    """The cells' visualizations [K, S, S, 3] placed on a grid x grid picture, uint8 [grid*S, grid*S, 3]."""
    side = images.shape[1]
    picture = np.full((grid * side, grid * side, 3), BLANK, np.uint8)
    for k in np.flatnonzero(done):
        r, c = int(row[k]), int(col[k])
        picture[r * side:(r + 1) * side, c * side:(c + 1) * side] = images[k]
    return picture


def atlas_context(model: Model, i: int, a: dict, attrs: dict, grid: int, src: str | None,
                  render_params: dict) -> dict:
    """What atlas.html shows: the picture, one box per cell, the table of cells and the recipe."""
    layer = model.layers[i]
    cells = []
    for k in range(len(a["row"])):
        units = [{"channel": int(u), "weight": float(wt), "href": f"{int(u)}.html"}
                 for u, wt in zip(a["units"][k], a["unit_weight"][k]) if 0 <= int(u) < layer.channels]
        cells.append({"number": k, "row": int(a["row"][k]), "col": int(a["col"][k]), "count": int(a["count"][k]),
                      "label": class_name(model, int(a["class"][k])), "score": float(a["class_score"][k]),
                      "units": units, "drawn": bool(a["done"][k]) and src is not None})
    shown = min(SHOWN_SIDE, 64 * grid)
    images = len(np.unique(a["image"]))
    recipe = {k: v for k, v in attrs.items() if k not in ("layout_id", "images_digest")}
    return {"title": f"{layer.name}: activation atlas", "layer": layer, "cells": cells, "grid": grid,
            "src": src, "side": shown, "label_zoom": max(1.0, LABEL_AT * grid / shown),
            "points": len(a["image"]), "images": images, "recipe": recipe, "render_params": render_params,
            "crumbs": crumbs(model, 1, (layer.name, "index.html"), ("activation atlas", None))}
