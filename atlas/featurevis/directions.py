"""Feature visualizations of the neuron groups' directions (the full preset's building blocks).

The attribution stage factorizes each explained image's deepest activation
into a few neuron groups; each group is a direction in channel space. This
renders, for every group, the image that maximizes the activation's dot
product with that direction, averaged over positions (`objectives.direction`),
with the stage's settings: Olah et al.'s building blocks show each group so.
It runs after the attribution stage, on the groups its parts hold; a work unit
(`directions/<chunk>/<layer>`) is every group of one factorized layer on one
chunk of explained images. A group that was not found (a silent image) stays
unrendered.
"""

from __future__ import annotations

import h5py
import numpy as np
import torch

from atlas import distributed
from atlas.attribution.reader import GroupDirections, group_directions
from atlas.featurevis import objectives as O
from atlas.featurevis.param import unit_seed
from atlas.featurevis.render import render
from atlas.store import Store
from atlas.store.schema import DIRECTIONS, FEATUREVIS

STAGE = FEATUREVIS
ARRAYS = ("index", "images", "objective", "done")  # what a part holds, one row per explained image
PREFIX = f"{DIRECTIONS}/"  # the work units' keys: directions/<chunk>/<layer>


def is_direction_key(key: str) -> bool:
    return key.startswith(PREFIX)


def run_directions(ctx, settings) -> None:
    """Renders the directions of every neuron group the attribution parts hold and no part has yet."""
    if not ctx.config.fv_directions:
        return
    # rank 0 lists what is left, so every rank splits the same list however far the others have got
    left = distributed.on_main(lambda: [f"{PREFIX}{g.chunk}/{g.layer}" for g in group_directions(ctx.store)
                                        if f"{PREFIX}{g.chunk}/{g.layer}" not in ctx.store.done(STAGE)])
    todo = ctx.ranks.shard([g for g in group_directions(ctx.store) if f"{PREFIX}{g.chunk}/{g.layer}" in left])
    if not todo:
        return
    with ctx.bar(sum(g.directions.shape[0] * g.directions.shape[1] for g in todo), "group directions",
                 "img") as bar:
        for groups in todo:
            arrays = _render_groups(ctx, settings, groups, bar)
            ctx.store.write_unit(STAGE, f"{PREFIX}{groups.chunk}/{groups.layer}", arrays, {
                **settings.provenance(), "layer": groups.layer,
                "objective": f"direction {groups.layer}: the neuron group's channel weights"})


def _render_groups(ctx, settings, groups: GroupDirections, bar) -> dict[str, np.ndarray]:
    n, g, _ = groups.directions.shape
    side = settings.size
    out = {"index": groups.index, "images": np.zeros((n, g, side, side, 3), np.uint8),
           "objective": np.full((n, g), np.nan, np.float32), "done": np.zeros((n, g), bool)}
    found = [(i, j) for i in range(n) for j in range(g) if groups.directions[i, j].any()]
    batch = max(1, ctx.config.fv_batch)
    for a in range(0, len(found), batch):
        pairs = found[a:a + batch]
        vectors = torch.as_tensor(np.stack([groups.directions[i, j] for i, j in pairs]))
        seeds = [unit_seed(ctx.loaded.spec, groups.layer, int(groups.index[i]) * g + j, ctx.config.seed, "direction")
                 for i, j in pairs]
        result = render(ctx.gradient_model, ctx.loaded.preprocess, O.direction(groups.layer, vectors), seeds,
                        settings, ctx.device)
        for k, (i, j) in enumerate(pairs):
            out["images"][i, j], out["objective"][i, j] = result.images[k], result.objective[k]
            out["done"][i, j] = bool(result.finite[k])
        bar.update(len(pairs))
    bar.update(n * g - len(found))
    return out


def consolidate_directions(store: Store, f: h5py.File) -> None:
    """Writes /directions/<layer>/: the source index of each image and its groups' renders, part by part."""
    rows: dict[str, list[tuple[str, int]]] = {}  # layer -> (part key, images) in key order
    for key, part in store.units(STAGE, PREFIX):
        rows.setdefault(str(part.attrs["layer"]), []).append((key, len(part["index"])))
    for layer, parts in rows.items():
        total, g, at = sum(n for _, n in parts), f.require_group(DIRECTIONS).create_group(layer), 0
        for key, n in parts:
            with store.read_unit(STAGE, key) as part:
                if at == 0:
                    for k in ARRAYS:
                        g.create_dataset(k, (total, *part[k].shape[1:]), part[k].dtype)
                    g.attrs.update({k: v for k, v in part.attrs.items() if k != "written"})
                for k in ARRAYS:
                    g[k][at:at + n] = part[k][...]
            at += n
