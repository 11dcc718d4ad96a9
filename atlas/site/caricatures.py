"""A layer's caricatures on its page: each explained image beside its caricature.

The store's `/layers/<layer>/caricatures/` holds explained images re-optimized to exaggerate what
the layer sees in them (featurevis/caricatures.py), by source index. The originals are the
explained images' own pictures (`images/<row>.jpg`, written with their pages), found through
/dataset/source_index; each caricature is written once, and its caption gives how much the
optimization raised the objective (the dot product with the original's activation).
"""

from __future__ import annotations

import h5py
import numpy as np

from atlas.site import pictures as img
from atlas.site.data import Model
from atlas.site.pages import fmt
from atlas.site.writer import SiteWriter
from atlas.store import read_attrs
from atlas.store.schema import CARICATURES, DATASET

SHOWN = ("steps", "lr", "optimizer", "parameterization", "transforms", "objective", "start", "images")


def render_caricatures(model: Model, i: int, group: h5py.Group, w: SiteWriter) -> dict | None:
    """Writes layer i's caricatures; returns its page's section, or None where there is nothing to show.

    Only caricatures of images of the explained set (which have a picture and a page) that ended
    finite are shown.
    """
    g = group.get(CARICATURES)
    source = group.file.get(DATASET, {}).get("source_index")
    if not isinstance(g, h5py.Group) or not isinstance(source, h5py.Dataset) or not model.explained:
        return None
    source = source[()]
    row_of = {int(source[r]): r for r in model.explained}
    index, finite = g["index"][()], g["finite"][()].astype(bool)
    start, end = g["objective_start"][()], g["objective_end"][()]
    layer = model.layers[i]
    items = []
    for k in np.flatnonzero(finite):
        row = row_of.get(int(index[k]))
        if row is None:
            continue  # an image no longer explained
        src = f"caricature-{k}.{img.PICTURE_EXT}"
        w.write(f"{layer.slug}/{src}", img.encode(g["images"][k]), "featurevis")
        items.append({"src": src, "row": row, "original": f"../images/{row}.jpg", "href": f"../images/{row}.html",
                      "gain": _gain(float(start[k]), float(end[k])), "start": fmt(start[k]), "end": fmt(end[k])})
    if not items:
        return None
    attrs = read_attrs(g)
    return {"items": items, "side": int(g["images"].shape[1]),
            "params": {k: attrs[k] for k in SHOWN if k in attrs}}


def _gain(start: float, end: float) -> str:
    """How many times the caricature's objective is the original's (an en dash where that means nothing)."""
    if not (np.isfinite(start) and np.isfinite(end)) or start <= 0:
        return "–"
    return f"×{end / start:.2f}"
