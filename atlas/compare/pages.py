"""The comparison's pages: the CKA heatmap and a page per layer of A pairing matched units.

    <site>/<A>/compare/<B>/index.html      CKA between every pair of layers, and a table of A's layers
    <site>/<A>/compare/<B>/<layer>.html    each unit of the layer beside its counterpart, least matched first
    <site>/<A>/compare/<B>/compare.json    the numbers, for the site index and for scripts
    <site>/<A>/compare/<B>/fv/...          the units' feature visualizations, a few sprite sheets per layer

Written with the site's writer and templates, so the pages look like the rest
of the site, and a file is only rewritten when its content changes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atlas.compare.stores import Side, featurevis
from atlas.site import pictures as img
from atlas.site.data import slug
from atlas.site.render import environment
from atlas.site.writer import SiteWriter

if TYPE_CHECKING:
    from atlas.compare.run import Comparison, LayerMatch

DEPTH = 3  # <site>/<A>/compare/<B>/: folders below the site root
MEASURE = "linear CKA (Kornblith et al. 2019) of each image's spatial mean of every channel"


def page_name(layer: str) -> str:
    """The file of a layer's page; never the comparison's own index.html."""
    s = slug(layer)
    return "index-layer.html" if s.lower() == "index" else f"{s}.html"


def write_comparison(cmp: Comparison, folder: Path) -> int:
    """Writes every page of a comparison into `folder` (removing what an earlier one left); returns pages."""
    w = SiteWriter(folder, environment(), depth=DEPTH, search=[])
    site = folder.parents[DEPTH - 1]
    sheets = _Sheets(w)
    crumbs = _crumbs(cmp, site)
    for i, m in enumerate(cmp.layers):
        rows = [_row(cmp, m, c, sheets, site) for c in _least_matched_first(m)]
        w.page(page_name(m.layer), "compare_layer.html", title=f"{m.layer}: {cmp.a.name} vs {cmp.b.name}",
               crumbs=crumbs + [{"label": m.layer, "href": None}], a=cmp.a, b=cmp.b, match=m, rows=rows,
               threshold=cmp.threshold, measure=MEASURE,
               prev=_neighbour(cmp, i - 1), next=_neighbour(cmp, i + 1))
    w.page("index.html", "compare.html", title=f"{cmp.a.name} vs {cmp.b.name}",
           crumbs=crumbs[:-1] + [{"label": crumbs[-1]["label"], "href": None}], a=cmp.a, b=cmp.b,
           heatmap=_heatmap(cmp), layers=[_layer_row(m) for m in cmp.layers], threshold=cmp.threshold,
           colorbar=img.colorbar_css(signed=False), measure=MEASURE, images=len(cmp.a.images))
    w.write("compare.json", json.dumps(summary(cmp), indent=1, allow_nan=False).encode(), "html")
    w.remove_others()
    return w.pages


def summary(cmp: Comparison) -> dict:
    """What compare.json holds: both models, the CKA matrix, and each layer's matching in brief."""
    def side(s: Side) -> dict:
        return {"name": s.name, "spec": s.spec, "weights_id": s.weights_id, "store": s.path.name,
                "layers": s.layers}
    return {"a": side(cmp.a), "b": side(cmp.b), "images": len(cmp.a.images), "measure": MEASURE,
            "threshold": cmp.threshold, "cka": [[_number(v) for v in row] for row in cmp.cka],
            "layers": [{"layer": m.layer, "other": m.other, "cka": _number(m.cka), "mean_r": _number(m.mean_r),
                        "units": len(m.r), "unmatched": m.unmatched, "chance": _number(m.chance),
                        "page": page_name(m.layer)}
                       for m in cmp.layers]}


def _number(value: float) -> float | None:
    return None if not math.isfinite(value) else round(float(value), 6)


def _least_matched_first(m: LayerMatch) -> np.ndarray:
    """Units by their best correlation, lowest first; constant units (NaN) before all."""
    return np.lexsort((np.arange(len(m.r)), np.nan_to_num(m.r, nan=-np.inf)))


def _row(cmp: Comparison, m: LayerMatch, c: int, sheets: _Sheets, site: Path) -> dict:
    other = int(m.best[c])
    b_pages = cmp.b.name != cmp.a.name  # with one name, the site's unit pages are A's own
    return {"a": _unit(cmp.a, "a", m.layer, c, sheets, site, True),
            "b": _unit(cmp.b, "b", m.other, other, sheets, site, b_pages) if other >= 0 else None,
            "r": float(m.r[c]), "matched": bool(m.matched[c])}


def _unit(side: Side, key: str, layer: str, c: int, sheets: _Sheets, site: Path, link: bool) -> dict:
    rel = f"{side.slug}/{slug(layer)}/{c}.html"
    return {"label": f"{layer}:{c}", "fv": sheets.style(key, side, layer, c),
            "href": "../" * DEPTH + rel if link and (site / rel).is_file() else None}


def _layer_row(m: LayerMatch) -> dict:
    return {"layer": m.layer, "other": m.other, "cka": m.cka, "mean_r": m.mean_r, "units": len(m.r),
            "unmatched": m.unmatched, "chance": m.chance, "href": page_name(m.layer)}


def _neighbour(cmp: Comparison, i: int) -> dict | None:
    if not 0 <= i < len(cmp.layers):
        return None
    return {"label": cmp.layers[i].layer, "href": page_name(cmp.layers[i].layer)}


def _crumbs(cmp: Comparison, site: Path) -> list[dict]:
    up = "../" * DEPTH
    model = f"{up}{cmp.a.slug}/index.html" if (site / cmp.a.slug / "index.html").is_file() else None
    return [{"label": "Atlas", "href": f"{up}index.html"}, {"label": cmp.a.name, "href": model},
            {"label": f"compared with {cmp.b.name}", "href": "index.html"}]


def _heatmap(cmp: Comparison) -> list[dict]:
    """One row per layer of A: its label and, per layer of B, the cell's colour and value."""
    colours = img.sequential(cmp.cka)
    return [{"label": name, "href": page_name(name),
             "cells": [{"value": float(v), "colour": "rgb({},{},{})".format(*colours[i, j]), "other": other}
                       for j, (v, other) in enumerate(zip(cmp.cka[i], cmp.b.layers))]}
            for i, name in enumerate(cmp.a.layers)]


class _Sheets:
    """Feature visualizations as sprite sheets (one file per SHEET_UNITS units), written when first needed."""

    def __init__(self, w: SiteWriter):
        self.w = w
        self.cache: dict[tuple[str, str], tuple[np.ndarray, list] | None] = {}

    def style(self, key: str, side: Side, layer: str, c: int) -> str | None:
        """Inline CSS that draws unit c's visualization from its sheet; None where the store has none."""
        if (key, layer) not in self.cache:
            self.cache[key, layer] = self._write(key, side, layer)
        found = self.cache[key, layer]
        if found is None or not found[0][c]:
            return None
        href, sheet = found[1][c // img.SHEET_UNITS]
        k = c % img.SHEET_UNITS
        x, y = k % sheet.columns, k // sheet.columns
        return f"background:url({href}) -{x * img.CELL}px -{y * img.CELL}px/{sheet.css_size()}"

    def _write(self, key: str, side: Side, layer: str) -> tuple[np.ndarray, list] | None:
        stored = featurevis(side.path, layer)
        if stored is None:
            return None
        images, done = stored
        sheets = []
        for n, first in enumerate(range(0, len(images), img.SHEET_UNITS)):
            pixels, sheet = img.sprite_sheet(images[first:first + img.SHEET_UNITS],
                                             done[first:first + img.SHEET_UNITS])
            href = f"fv/{key}-{slug(layer)}-{n}.{img.PICTURE_EXT}"
            self.w.write(href, img.encode(pixels, "sprite"), "featurevis")
            sheets.append((href, sheet))
        return done, sheets
