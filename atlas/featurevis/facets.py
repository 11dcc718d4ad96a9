"""Faceted feature visualization of polysemantic units (the full preset; Goh et al. 2021).

A unit flagged polysemantic by the dataset stage's labelling has two or three
facets: clusters of its top images in the model's penultimate embedding, each
with its own label. One image per facet is rendered with the unit's channel
objective plus the cosine alignment of the image's penultimate embedding (the
classifier's input) with the facet's mean direction there, scaled by the unit's
highest activation over the search set so that neither term drowns the other:
the picture shows the unit as it fires on that facet's images. A work unit
(`facets/<layer>`) is every facet of one layer; it runs once the dataset stage
has labelled the layer.
"""

from __future__ import annotations

import h5py
import numpy as np
import torch

from atlas import distributed
from atlas.dataset.reader import FacetDirections, facet_directions
from atlas.featurevis import objectives as O
from atlas.featurevis.param import unit_seed
from atlas.featurevis.render import fixed_side, render
from atlas.layers import embedding_layer
from atlas.store import Store
from atlas.store.schema import FACETS, FEATUREVIS, LAYERS

STAGE = FEATUREVIS
PREFIX = "facets/"  # the work units' keys: facets/<layer>
ARRAYS = ("channel", "facet", "images", "objective", "alignment", "done")


def is_facet_key(key: str) -> bool:
    return key.startswith(PREFIX)


def run_facets(ctx, settings) -> None:
    """Renders the facets of every labelled layer no part holds yet."""
    if not ctx.config.fv_facets:
        return
    classifier = embedding_layer(ctx.loaded.model, len(ctx.loaded.class_names))
    if classifier is None:
        return  # no classifier input to steer by; the labels recorded no facets either
    # rank 0 lists what is left, so every rank splits the same list however far the others have got
    names = distributed.on_main(lambda: [l.name for l in ctx.layers
                                         if f"{PREFIX}{l.name}" not in ctx.store.done(STAGE)])
    todo = ctx.ranks.shard(facet_directions(ctx.store, names, _embedding_dims(ctx, classifier)))
    if not todo:
        return
    with ctx.bar(sum(len(f.channel) for f in todo), "facets", "img") as bar:
        for facets in todo:
            arrays = _render(ctx, settings, facets, classifier, bar)
            ctx.store.write_unit(STAGE, f"{PREFIX}{facets.layer}", arrays, {
                **settings.provenance(), "layer": facets.layer,
                "objective": f"channel + top activation x cosine of {classifier} with the facet's mean embedding"})


def _embedding_dims(ctx, classifier: str) -> int:
    module = dict(ctx.loaded.model.named_modules())[classifier.split(":")[0]]
    return int(module.in_features)


def _render(ctx, settings, facets: FacetDirections, classifier: str, bar) -> dict[str, np.ndarray]:
    n, side = len(facets.channel), settings.size
    out = {"channel": facets.channel, "facet": facets.facet, "images": np.zeros((n, side, side, 3), np.uint8),
           "objective": np.full(n, np.nan, np.float32), "alignment": np.full(n, np.nan, np.float32),
           "done": np.zeros(n, bool)}
    batch = max(1, ctx.config.fv_batch)
    for a in range(0, n, batch):
        rows = slice(a, min(n, a + batch))
        channels = [int(c) for c in facets.channel[rows]]
        steer = torch.as_tensor(facets.direction[rows])
        scale = torch.as_tensor(facets.scale[rows]).clamp_min(1e-6)
        objective = O.channel(facets.layer, channels) + O.Objective(
            lambda acts, s=scale, o=O.alignment(classifier, steer): s.to(o(acts)) * o(acts),
            f"scaled {classifier} alignment", frozenset({classifier}))
        seeds = [unit_seed(ctx.loaded.spec, facets.layer, c * 4 + int(f), ctx.config.seed, "facet")
                 for c, f in zip(channels, facets.facet[rows])]
        result = render(ctx.gradient_model, ctx.loaded.preprocess, objective, seeds, settings, ctx.device)
        out["images"][rows], out["objective"][rows] = result.images, result.objective
        out["done"][rows] = result.finite
        out["alignment"][rows] = _alignment(ctx, classifier, steer, result.images)
        bar.update(len(channels))
    return out


def _alignment(ctx, classifier: str, steer: torch.Tensor, images: np.ndarray) -> np.ndarray:
    """Each render's cosine with its facet direction, read on the stored pixels."""
    from atlas.layers import Capture
    x = fixed_side(ctx.loaded.preprocess.from_uint8(images).to(ctx.device), ctx.loaded.preprocess)
    with torch.no_grad(), Capture(ctx.loaded.model, [classifier], stop=True) as cap:
        return O.alignment(classifier, steer)(cap.run(x)).cpu().numpy()


def consolidate_facets(store: Store, f: h5py.File) -> None:
    """Writes /layers/<layer>/facets/: one row per rendered facet (its unit's channel and facet number)."""
    for key, part in store.units(STAGE, PREFIX):
        layer = str(part.attrs["layer"])
        if layer not in f[LAYERS]:
            continue
        g = f[LAYERS][layer].create_group(FACETS)
        for name in ARRAYS:
            g.create_dataset(name, data=part[name][...])
        g.attrs.update({k: v for k, v in part.attrs.items() if k != "written"})
