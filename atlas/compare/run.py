"""`atlas compare A.h5 B.h5`: two stores built on the same images, compared layer by layer and unit by unit.

Everything comes from the two stores (their activation summaries and feature
visualizations), so no model is loaded. The comparison is written beside A's
pages in the site, at `<site>/<A>/compare/<B>/`, and the site index links it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlas.compare.pages import write_comparison
from atlas.compare.similarity import MATCH_THRESHOLD, best_layer, chance, cka_matrix, correlation, match_units
from atlas.compare.stores import Side, pair_slug, read_side, restrict, shared_images
from atlas.site.data import COMPARISONS
from atlas.site.render import write_site_root


@dataclass
class LayerMatch:
    """A layer of A, its most similar layer of B, and each of its units' counterpart there."""

    layer: str
    other: str  # B's layer of highest CKA
    cka: float
    best: np.ndarray  # int [C]: B's unit correlating best with each unit, -1 for a constant unit
    r: np.ndarray  # float [C]: that correlation (NaN for a constant unit)
    matched: np.ndarray  # bool [C]: r reaches the threshold and the chance level
    chance: float  # the best r a unit reaches with the images shuffled (`similarity.chance`)

    @property
    def mean_r(self) -> float:
        return float(np.nanmean(self.r)) if np.isfinite(self.r).any() else float("nan")

    @property
    def unmatched(self) -> int:
        return int((~self.matched).sum())


@dataclass
class Comparison:
    """Store A against store B: CKA between every pair of layers, and the matching of A's units."""

    a: Side
    b: Side
    cka: np.ndarray  # [layers of A, layers of B]
    layers: list[LayerMatch]  # one per layer of A, in forward order
    threshold: float


def analyse(a: Side, b: Side, threshold: float = MATCH_THRESHOLD) -> Comparison:
    """CKA of every layer of A with every layer of B, then each unit of A matched in its layer's best B layer."""
    cka = cka_matrix([a.means[n] for n in a.layers], [b.means[n] for n in b.layers])
    matches = []
    for i, name in enumerate(a.layers):
        j = best_layer(cka[i], name, b.layers)
        x, y = a.means[name], b.means[b.layers[j]]
        level = chance(x, y)
        best, r, matched = match_units(correlation(x, y), max(threshold, level) if np.isfinite(level) else threshold)
        matches.append(LayerMatch(name, b.layers[j], float(cka[i, j]), best, r, matched, level))
    return Comparison(a, b, cka, matches, threshold)


def compare(a: str | Path, b: str | Path, site_dir: str | Path = "site",
            threshold: float = MATCH_THRESHOLD) -> dict:
    """Compares two stores built on the same images and writes the comparison into the site.

    Args:
        a: the store whose layers and units are matched (.h5).
        b: the store they are matched in.
        site_dir: the site folder; the pages go to `<site_dir>/<A>/compare/<B>/` and the
            site index is rewritten to list them.
        threshold: a unit whose best correlation is below this has no counterpart.

    Returns:
        A report: `a`, `b` (model names), `folder`, `index` (the comparison's page), `pages`,
        `layers` (of A), `units` (of A), `unmatched` (units of A without a counterpart),
        `mean_diagonal_cka` (CKA of the layers of the same name, NaN when none are shared),
        `seconds`.

    Raises:
        AtlasError: a store is missing, has no activation summaries, or the two were built
            on different images.
    """
    start = time.perf_counter()
    side_a, side_b = read_side(a), read_side(b)
    rows_a, rows_b = shared_images(side_a, side_b)
    side_a, side_b = restrict(side_a, rows_a), restrict(side_b, rows_b)
    result = analyse(side_a, side_b, threshold)
    folder = Path(site_dir) / side_a.slug / COMPARISONS / pair_slug(side_a, side_b)
    pages = write_comparison(result, folder)
    write_site_root(site_dir)
    return {"a": side_a.name, "b": side_b.name, "folder": str(folder), "index": str(folder / "index.html"),
            "pages": pages, "images": len(side_a.images), "layers": len(result.layers), "units": sum(len(m.r) for m in result.layers),
            "unmatched": sum(m.unmatched for m in result.layers), "mean_diagonal_cka": _diagonal(result),
            "seconds": round(time.perf_counter() - start, 2)}


def _diagonal(result: Comparison) -> float:
    shared = [(i, result.b.layers.index(n)) for i, n in enumerate(result.a.layers) if n in result.b.layers]
    return float(np.mean([result.cka[i, j] for i, j in shared])) if shared else float("nan")
