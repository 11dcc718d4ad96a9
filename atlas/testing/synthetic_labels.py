"""Unit labels for a synthetic store: planted classes, then the labelling the dataset stage runs.

Each unit of every layer is given a pool of top images: most units prefer one
class (`share` of their pool), a `two` share prefer two unrelated classes, a
`none` share prefer nothing. The images get embeddings drawn around a centre
per class, and the stage's own `label_layer` labels the pools; the result is
written where consolidation writes it, and the pools' first k replace the
store's top-k lists, so the examples a page shows are the pool's best. For
screenshots and site benchmarks of labelled layers: every number is synthetic.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from atlas.dataset.concepts import EMBED_DIMS, concepts_of
from atlas.dataset.labelling import label_layer
from atlas.dataset.reader import SearchSet
from atlas.store.schema import CONCEPT_GROUPS, CONCEPTS, DATASET, LABELS, LAYERS, TOPK


def add_labels(path: Path, pool: int = 50, share: float = 0.6, two: float = 0.1, none: float = 0.1,
               seed: int = 0) -> None:
    """Plants classes in every layer's units of the store at `path` and labels them (see the module)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r+") as f:
        classes = [s.decode() if isinstance(s, bytes) else str(s) for s in f["classes"][...]]
        d = f[DATASET]
        labels, top1 = d["labels"][...], d["top5"][:, 0]
        image_class = np.where(labels >= 0, labels, top1)
        n = len(image_class)
        centres = rng.normal(size=(len(classes), EMBED_DIMS))
        search = SearchSet(np.arange(n), image_class, int((labels >= 0).sum()),
                           (centres[image_class] + 0.6 * rng.normal(size=(n, EMBED_DIMS))).astype(np.float16))
        names, group_of = concepts_of(classes)
        present = np.unique(image_class)
        by_class = {int(c): np.nonzero(image_class == c)[0] for c in present}
        for g in f[LAYERS].values():
            channels = int(g.attrs["channels"])
            pools = np.stack([_pool(rng, by_class, present, n, pool, share, two, none) for _ in range(channels)])
            arrays = label_layer(pools, search, group_of, len(names), int(g[TOPK]["index"].shape[1]))
            k = g[TOPK]["index"].shape[1]
            g[TOPK]["index"][...] = pools[:, :k]
            out = g.create_group(LABELS)
            for key, value in arrays.items():
                out.create_dataset(key, data=value)
            out.attrs.update({"search": n, "labelled": search.labelled, "of": "synthetic: planted classes"})
        d.create_dataset(CONCEPTS, data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        d.create_dataset(CONCEPT_GROUPS, data=group_of.astype(np.int32))


def _pool(rng, by_class: dict, present: np.ndarray, n: int, pool: int, share: float, two: float,
          none: float) -> np.ndarray:
    kind = rng.random()
    first, second = (int(c) for c in rng.choice(present, 2, replace=False))
    if kind < none:
        chosen = rng.choice(n, pool, replace=False)
    elif kind < none + two:
        half = int(pool * share / 2)
        chosen = np.concatenate([_some(rng, by_class[first], half), _some(rng, by_class[second], half)])
    else:
        chosen = _some(rng, by_class[first], int(pool * share))
    rest = np.setdiff1d(rng.choice(n, pool * 2, replace=False), chosen)[:pool - len(chosen)]
    return rng.permutation(np.concatenate([chosen, rest]))[:pool]


def _some(rng, rows: np.ndarray, count: int) -> np.ndarray:
    return rng.choice(rows, min(count, len(rows)), replace=False)
