"""The dataset stage's last step: every unit's label, facets and polysemanticity (concepts.py).

One work unit per layer (`labels/<layer>`), from the merged pool of each
unit's top images and the search set's classes and embeddings, so a layer
labelled once is not labelled again, and ranks share the layers. The
consolidated store gets `/layers/<layer>/labels/` and `/dataset/concepts`.
"""

from __future__ import annotations

import h5py
import numpy as np

from atlas import distributed
from atlas.dataset.concepts import (ALPHA, CANDIDATES, EMBED_DIMS, FACET_K, MIN_COUNT, SEPARATED, concepts_of, draws,
                                    facet_sets, label_sets)
from atlas.dataset.reader import LABELS, STAGE, SearchSet, merged_summaries, search_set
from atlas.store import Store, read_attrs
from atlas.store.schema import CONCEPT_GROUPS, CONCEPTS, DATASET, LAYERS
from atlas.store.schema import LABELS as LABELS_GROUP

EVIDENCE = ("concept", "count", "p", "lift")


def run(ctx) -> None:
    """Labels every selected layer no part holds yet."""
    # rank 0 lists what is left, so every rank splits the same list however far the others have got
    left = distributed.on_main(lambda: [l.name for l in ctx.layers if f"{LABELS}{l.name}" not in ctx.store.done(STAGE)])
    todo = ctx.ranks.shard([l for l in ctx.layers if l.name in left])
    if todo:
        with ctx.bar(sum(l.channels for l in todo), "unit labels", "unit") as bar:
            label_layers(ctx.store, todo, ctx.loaded.class_names, bar.update)


def label_layers(store: Store, layers: list, class_names: list[str], done=lambda units: None) -> None:
    """Writes the part `labels/<layer>` of each of `layers` (LayerInfo-like: name, channels) from the
    dataset stage's parts; `done(units)` is told of each layer finished."""
    summaries, attrs = merged_summaries(store, layers)
    search = search_set(store)
    names, group_of = concepts_of(class_names)
    for layer in layers:
        summary = summaries.get(layer.name)
        if summary is not None and summary.pool is not None:  # else not in the pass, or a pass without pools
            arrays = label_layer(summary.pool.index.cpu().numpy(), search, group_of, len(names),
                                 int(attrs.get("k", 10)))
            arrays["top_value"] = summary.pool.value[:, 0].cpu().numpy().astype(np.float32)  # faceted FV's scale
            store.write_unit(STAGE, f"{LABELS}{layer.name}", arrays, {
                "layer": layer.name, "concepts": names, "group_of": group_of.tolist(), "search": len(search.index),
                "labelled": search.labelled})
        done(layer.channels)


def label_layer(pool: np.ndarray, search: SearchSet, group_of: np.ndarray, n_concepts: int, k: int) -> dict:
    """The labels and facets of one layer's units, from their pools (source indices [C, pool], best first)."""
    n = draws(pool.shape[1], len(search.index), k)
    members = np.searchsorted(search.index, np.maximum(pool[:, :n], 0))
    valid = (pool[:, :n] >= 0) & (search.index[np.minimum(members, len(search.index) - 1)] == pool[:, :n])
    members = np.where(valid, members, 0).astype(np.int64)
    labels = label_sets(members, valid, search.image_class, group_of, n_concepts)
    out = {"examples": np.where(valid, members, -1).astype(np.int32), "label": labels.label,
           "drawn": labels.drawn, **{k_: getattr(labels, k_) for k_ in EVIDENCE}}
    if search.embedding is not None and n >= min(FACET_K) * MIN_COUNT:
        facets = facet_sets(search.embedding, members, search.image_class, group_of, n_concepts)
        c, kmax = pool.shape[0], max(FACET_K)
        out.update({"facet_member": facets.member, "silhouette": facets.silhouette,
                    "separated": facets.silhouette >= SEPARATED,
                    "polysemantic": facets.polysemantic,
                    "facet_label": facets.labels.label.reshape(c, kmax),
                    "facet_size": facets.labels.drawn.reshape(c, kmax),
                    **{f"facet_{k_}": getattr(facets.labels, k_).reshape(c, kmax, CANDIDATES) for k_ in EVIDENCE}})
    return out


def consolidate(store: Store, f: h5py.File) -> None:
    """Writes /layers/<layer>/labels/ from the parts, and the concepts they number into /dataset/concepts."""
    names = group_of = None
    for key, part in store.units(STAGE, LABELS):
        attrs = read_attrs(part)
        layer = str(attrs["layer"])
        if layer not in f[LAYERS]:
            continue
        g = f[LAYERS][layer].create_group(LABELS_GROUP)
        for name in part.keys():
            g.create_dataset(name, data=part[name][...])
        g.attrs.update({
            "alpha": ALPHA, "min_count": MIN_COUNT, "separated": SEPARATED, "embedding_dims": EMBED_DIMS,
            "search": int(attrs["search"]), "labelled": int(attrs["labelled"]),
            "of": "each unit's top images (examples: rows of /dataset, best first) counted by class (true label "
                  "where known, top-1 prediction otherwise) and by coarse group; p: hypergeometric tail, "
                  "Bonferroni-adjusted over the concepts tested; label: the strongest concept when p < alpha "
                  "and count >= min_count, else -1 (unlabelled); facets: spherical k-means of the top images' "
                  "penultimate embeddings, kept when the mean silhouette reaches `separated`"})
        names, group_of = attrs["concepts"], attrs["group_of"]
    if names is not None and DATASET in f:
        f[DATASET].create_dataset(CONCEPTS, data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        ds = f[DATASET].create_dataset(CONCEPT_GROUPS, data=np.asarray(group_of, np.int32))
        ds.attrs["of"] = "the group concept (row of /dataset/concepts) of each class, -1 for none"
