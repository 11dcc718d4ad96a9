"""The activation atlas of the deepest selected layers (Carter et al. 2019, "Activation Atlas").

A unit's feature visualization shows one axis of a layer's activation space;
an activation atlas shows the directions that real images actually use.
Activation vectors of the layer, at sampled positions of the explained
images, are laid out in 2-D by UMAP (cosine metric). A grid is laid over the
layout, and each cell that holds enough vectors is summarized by their mean,
its direction, in three ways: a feature visualization of that direction (the
direction objective, rendered with the stage's settings); the class it most
supports, by the paper's linear approximation (each member's activation
times the gradient of a class's logit with respect to the layer, summed over
the cell's members, for the classes the explained images are predicted as);
and the units that align with it most (the largest components of the
normalized direction).

It runs after the dataset stage, whose parts hold the explained images. Work
units (parts of the featurevis stage):

    activation_atlas/<layer>/layout               the points, their layout, the cells and their summaries
    activation_atlas/<layer>/cells/<first>-<end>  the feature visualizations of cells [first, end)

A layout records the recipe it was made with as `layout_id`, and the rendered
cells carry the id of their layout: a layout made for other explained images
or other settings is made again, and cells rendered for another layout are
rendered again.
"""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import torch

from atlas import distributed
from atlas.dataset.reader import DatasetImages
from atlas.featurevis import objectives as O
from atlas.featurevis.param import unit_seed
from atlas.featurevis.render import RenderSettings, render
from atlas.layers import NHWC, LayerInfo, as_bchw
from atlas.store import Store
from atlas.store.schema import ACTIVATION_ATLAS, FEATUREVIS, LAYERS

STAGE = FEATUREVIS
PREFIX = f"{ACTIVATION_ATLAS}/"  # the work units' keys: activation_atlas/<layer>/...
LAYOUT, CELLS = "layout", "cells/"

N_NEIGHBORS = 20  # UMAP's neighbourhood (Lucid's activation-atlas notebook: 20); fewer for fewer points
MIN_DIST = 0.01  # UMAP's min_dist (the notebook: 0.01): tight clumps, so a cell holds one kind of vector
CLIP = 1.0  # percent of the points left past each end of each axis, so a few outliers do not squeeze the rest
MIN_COUNT = 3  # vectors a cell needs to be kept: one or two stray points are no summary
MIN_POINTS = 8  # fewer vectors than this are no layout
CANDIDATES = 64  # classes a cell may be labelled with: the explained images' predictions, most frequent first
TOP_UNITS = 5  # units listed per cell
BATCH = 32  # explained images per forward and backward pass
POINT_ARRAYS = ("xy", "image", "position", "cell")  # one row per laid-out vector
CELL_ARRAYS = ("row", "col", "count", "direction", "class", "class_score", "units", "unit_weight")
RENDER_ARRAYS = ("images", "objective", "done")  # what a cells part holds, one row per cell


def is_atlas_key(key: str) -> bool:
    return key.startswith(PREFIX)


def layout_key(layer: str) -> str:
    return f"{PREFIX}{layer}/{LAYOUT}"


def cells_key(layer: str, first: int, end: int) -> str:
    return f"{PREFIX}{layer}/{CELLS}{first:05d}-{end:05d}"


def atlas_layers(layers: list[LayerInfo], count: int) -> list[LayerInfo]:
    """The `count` deepest of the layers that have a spatial map (more than one position)."""
    spatial = [layer for layer in layers if layer.height * layer.width > 1]
    return spatial[len(spatial) - count:] if count > 0 else []


def recipe_of(config, explained: np.ndarray) -> dict:
    """Everything a layout depends on besides the model and the layer: recorded with it, and hashed
    into its `layout_id`."""
    digest = hashlib.sha256(np.asarray(explained, np.int64).tobytes()).hexdigest()[:16]
    return {"method": "UMAP", "metric": "cosine", "n_neighbors": N_NEIGHBORS, "min_dist": MIN_DIST,
            "clip_percent": CLIP, "grid": config.atlas_grid, "min_count": MIN_COUNT,
            "max_points": config.atlas_points, "candidates": CANDIDATES, "top_units": TOP_UNITS,
            "seed": config.seed, "images": len(explained), "images_digest": digest,
            "class_score": "activation x gradient of the class's logit with respect to the layer, "
                           "summed over the cell's members",
            "units": "largest components of the cell's normalized mean activation"}


def layout_id(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def run_atlas(ctx, settings: RenderSettings) -> None:
    """Lays out and renders the atlas of each of the deepest `atlas_layers` layers that it lacks.

    Layouts are shared out by layer, then every rank waits for all of them, then the
    cells are rendered in batches of `fv_batch`, shared out by batch. Rank 0 lists what is
    missing each time, so that a rank that lists after another has written shares out the same work.
    """
    chosen = atlas_layers(ctx.layers, ctx.config.atlas_layers)
    if not chosen:
        return
    images = DatasetImages(ctx.store, ctx.loaded.preprocess, ctx.device)
    if not len(images.explained):
        return  # the dataset stage has not chosen its explained images yet
    recipe = recipe_of(ctx.config, images.explained)
    ident = layout_id(recipe)
    stale = distributed.on_main(lambda: [l.name for l in chosen if _stored_id(ctx.store, layout_key(l.name)) != ident])
    for layer in ctx.ranks.shard([layer for layer in chosen if layer.name in stale]):
        arrays = make_layout(ctx, layer, images, recipe)
        if arrays is not None:
            ctx.store.write_unit(STAGE, layout_key(layer.name), arrays,
                                 {"layer": layer.name, "layout_id": ident, **recipe})
    distributed.barrier()
    todo = ctx.ranks.shard(distributed.on_main(lambda: _pending(ctx.store, chosen, ident, ctx.config.fv_batch)))
    if not todo:
        return
    with ctx.bar(sum(len(cells) for _, cells, _ in todo), "activation atlas", "cell") as bar:
        for layer, cells, directions in todo:
            arrays = render_cells(ctx, settings, layer, cells, directions)
            ctx.store.write_unit(STAGE, cells_key(layer, cells[0], cells[-1] + 1), arrays, {
                **settings.provenance(), "layer": layer, "layout_id": ident,
                "objective": f"direction {layer}: the cell's mean activation, normalized"})
            bar.update(len(cells))


def _stored_id(store: Store, key: str) -> str | None:
    if key not in store.done(STAGE):
        return None
    with store.read_unit(STAGE, key) as part:
        return str(part.attrs.get("layout_id", ""))


def _pending(store: Store, layers: list[LayerInfo], ident: str, batch: int) -> list[tuple[str, list[int], np.ndarray]]:
    """(layer, cells, their directions) of every batch of cells not yet rendered for the current layouts."""
    done = store.done(STAGE)
    units = []
    for layer in layers:
        if _stored_id(store, layout_key(layer.name)) != ident:
            continue  # no layout: too few points
        with store.read_unit(STAGE, layout_key(layer.name)) as part:
            directions = part["direction"][...].astype(np.float32)
        rendered: set[int] = set()
        for key in (k for k in done if k.startswith(f"{PREFIX}{layer.name}/{CELLS}")):
            with store.read_unit(STAGE, key) as part:
                if part.attrs.get("layout_id") == ident:
                    first, end = _span(key)
                    rendered.update(range(first, end))
        missing = [c for c in range(len(directions)) if c not in rendered]
        for run in _runs(missing, max(1, batch)):
            units.append((layer.name, run, directions[run]))
    return units


def _span(key: str) -> tuple[int, int]:
    first, end = key.rpartition("/")[2].split("-")
    return int(first), int(end)


def _runs(items: list[int], most: int) -> list[list[int]]:
    """Consecutive items cut into runs of at most `most`."""
    runs: list[list[int]] = []
    for c in items:
        if runs and c == runs[-1][-1] + 1 and len(runs[-1]) < most:
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


# --- the layout ---

def make_layout(ctx, layer: LayerInfo, images: DatasetImages, recipe: dict) -> dict[str, np.ndarray] | None:
    """One layer's points, their 2-D layout, its cells and their summaries; None for too few points."""
    candidates = candidate_classes(images)
    vectors, index, position, contributions = measure(ctx, layer, images, candidates)
    if len(vectors) < MIN_POINTS:
        return None
    seed = unit_seed(ctx.loaded.spec, layer.name, 0, ctx.config.seed, "atlas layout") % 2**31
    xy = layout_2d(vectors, seed)
    cell, row, col, count = bin_cells(xy, recipe["grid"], MIN_COUNT)
    direction, cls, score, units, weight = summarize(vectors, contributions, cell, len(row), candidates)
    return {"xy": xy, "image": index, "position": position, "cell": cell, "row": row, "col": col,
            "count": count, "direction": direction.astype(np.float16), "class": cls, "class_score": score,
            "units": units, "unit_weight": weight, "candidates": candidates}


def candidate_classes(images: DatasetImages) -> np.ndarray:
    """The explained images' top-1 predictions, the most frequent first (ties by class), CANDIDATES at most."""
    predicted = np.array([images.top1[int(i)] for i in images.explained], np.int64)
    classes, counts = np.unique(predicted, return_counts=True)
    order = np.lexsort((classes, -counts))
    return classes[order][:CANDIDATES]


def positions_of(ctx, layer: LayerInfo, index: int, count: int) -> np.ndarray:
    """The flat positions sampled from one image's map: all of them, or `count` drawn at random by a
    seed of (model, layer, image), sorted."""
    hw = layer.height * layer.width
    if count >= hw:
        return np.arange(hw)
    rng = np.random.default_rng(unit_seed(ctx.loaded.spec, layer.name, index, ctx.config.seed, "atlas positions"))
    return np.sort(rng.choice(hw, count, replace=False))


def measure(ctx, layer: LayerInfo, images: DatasetImages,
            classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The layer's activation vectors at the sampled positions of every explained image.

    Returns:
        vectors float32 [N, C]; the source index [N] and flat position [N] of each; and
        contributions float32 [N, K]: each vector's activation x gradient of each class's logit.
    """
    explained = images.explained
    per = max(1, ctx.config.atlas_points // max(1, len(explained)))
    out: dict[str, list[np.ndarray]] = {"vectors": [], "index": [], "position": [], "contributions": []}
    for a in range(0, len(explained), BATCH):
        index = explained[a:a + BATCH]
        positions = np.stack([positions_of(ctx, layer, int(i), per) for i in index])
        vectors, contributions = acts_and_contributions(ctx.loaded.model, images.inputs(index), layer,
                                                        torch.as_tensor(positions), classes)
        out["vectors"].append(vectors.reshape(-1, vectors.shape[-1]))
        out["contributions"].append(contributions.reshape(-1, len(classes)))
        out["index"].append(np.repeat(index, positions.shape[1]))
        out["position"].append(positions.reshape(-1).astype(np.int32))
    return tuple(np.concatenate(out[k]) for k in ("vectors", "index", "position", "contributions"))


def acts_and_contributions(model: torch.nn.Module, x: torch.Tensor, layer: LayerInfo, positions: torch.Tensor,
                           classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The layer's activation at `positions` [B, P] and, for each class, activation x gradient of its logit.

    The layer's output is replaced by `output + zero`, `zero` a leaf, so the gradient stops there: only
    the layers above it are differentiated, once per class.

    Returns:
        float32 [B, P, C] activations and [B, P, K] contributions.
    """
    kept: dict[str, torch.Tensor] = {}
    calls = [0]

    def hook(_module, _inputs, output):
        calls[0] += 1
        if calls[0] - 1 != layer.call:
            return None
        kept["act"], kept["zero"] = output.detach(), torch.zeros_like(output, requires_grad=True)
        return kept["act"] + kept["zero"]
    handle = dict(model.named_modules())[layer.module].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            act = as_bchw(kept["act"], layer.layout == NHWC).flatten(2)  # [B, C, HW]
            at = positions.to(act.device)[:, None, :].expand(-1, act.shape[1], -1)
            picked = act.gather(2, at).float()  # [B, C, P]
            contributions = []
            for k, c in enumerate(classes):
                (grad,) = torch.autograd.grad(logits[:, int(c)].sum(), kept["zero"], allow_unused=True,
                                              retain_graph=k + 1 < len(classes))
                g = torch.zeros_like(act) if grad is None else as_bchw(grad, layer.layout == NHWC).flatten(2)
                contributions.append((picked * g.gather(2, at).float()).sum(1))  # [B, P]
    finally:
        handle.remove()
    vectors = picked.transpose(1, 2).cpu().numpy()
    if not contributions:
        return vectors, np.zeros((*vectors.shape[:2], 0), np.float32)
    return vectors, torch.stack(contributions, -1).detach().cpu().numpy()


def layout_2d(vectors: np.ndarray, seed: int) -> np.ndarray:
    """UMAP of the vectors to 2-D (cosine metric), scaled into [0, 1] with CLIP % outliers clipped."""
    import umap  # here, not at the top: its first import compiles for seconds, and only this needs it
    neighbours = max(2, min(N_NEIGHBORS, len(vectors) - 1))
    xy = umap.UMAP(n_components=2, n_neighbors=neighbours, min_dist=MIN_DIST, metric="cosine",
                   random_state=seed, n_jobs=1).fit_transform(vectors)
    low, high = np.percentile(xy, CLIP, axis=0), np.percentile(xy, 100 - CLIP, axis=0)
    return np.clip((xy - low) / np.maximum(high - low, 1e-12), 0, 1).astype(np.float32)


def bin_cells(xy: np.ndarray, grid: int, min_count: int) -> tuple[np.ndarray, ...]:
    """Bins points in [0, 1]^2 into a grid x grid grid; keeps the cells with at least `min_count` points.

    Returns:
        cell [N] (the point's kept cell, numbered row-major; -1 in a cell left out) and, per kept
        cell, row (from y, row 0 at the top of the picture), col (from x) and count.
    """
    col = np.minimum((xy[:, 0] * grid).astype(np.int64), grid - 1)
    row = np.minimum((xy[:, 1] * grid).astype(np.int64), grid - 1)
    flat = row * grid + col
    ids, counts = np.unique(flat, return_counts=True)
    kept = ids[counts >= min_count]
    number = {int(f): k for k, f in enumerate(kept)}
    cell = np.array([number.get(int(f), -1) for f in flat], np.int32)
    return (cell, (kept // grid).astype(np.int32), (kept % grid).astype(np.int32),
            counts[counts >= min_count].astype(np.int32))


def summarize(vectors: np.ndarray, contributions: np.ndarray, cell: np.ndarray, cells: int,
              classes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per kept cell: its direction (members' mean), the class it most supports with its score
    (summed contributions; -1 and NaN without candidates), and its TOP_UNITS units with their weight
    in the normalized direction."""
    members = cell >= 0
    direction = np.zeros((cells, vectors.shape[1]), np.float64)
    np.add.at(direction, cell[members], vectors[members])
    count = np.bincount(cell[members], minlength=cells)
    direction /= np.maximum(count, 1)[:, None]
    scores = np.zeros((cells, contributions.shape[1]), np.float64)
    np.add.at(scores, cell[members], contributions[members])
    best = scores.argmax(1) if scores.shape[1] else np.zeros(cells, np.int64)
    cls = classes[best] if len(classes) else np.full(cells, -1, np.int64)
    score = scores[np.arange(cells), best] if scores.shape[1] else np.full(cells, np.nan)
    unit = direction / np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    top = np.argsort(-unit, axis=1, kind="stable")[:, :TOP_UNITS]
    return (direction.astype(np.float32), cls.astype(np.int64), score.astype(np.float32), top.astype(np.int64),
            np.take_along_axis(unit, top, 1).astype(np.float32))


# --- the cells' feature visualizations ---

def render_cells(ctx, settings: RenderSettings, layer: str, cells: list[int],
                 directions: np.ndarray) -> dict[str, np.ndarray]:
    """Renders each cell's normalized direction with the direction objective, in batches of `fv_batch`."""
    side, n = settings.size, len(cells)
    out = {"images": np.zeros((n, side, side, 3), np.uint8), "objective": np.full(n, np.nan, np.float32),
           "done": np.zeros(n, bool)}
    unit = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    batch = max(1, ctx.config.fv_batch)
    for a in range(0, n, batch):
        seeds = [unit_seed(ctx.loaded.spec, layer, c, ctx.config.seed, "atlas") for c in cells[a:a + batch]]
        result = render(ctx.gradient_model, ctx.loaded.preprocess,
                        O.direction(layer, torch.as_tensor(unit[a:a + batch])), seeds, settings, ctx.device)
        out["images"][a:a + batch], out["objective"][a:a + batch] = result.images, result.objective
        out["done"][a:a + batch] = result.finite
    return out


# --- consolidation ---

def consolidate_atlas(store: Store, f: h5py.File) -> None:
    """Writes /layers/<layer>/activation_atlas/: each layout with its cells' renders where there are some."""
    groups: dict[str, tuple[h5py.Group, str]] = {}
    for key, part in store.units(STAGE, PREFIX):
        layer = str(part.attrs["layer"])
        if not key.endswith(f"/{LAYOUT}") or layer not in f[LAYERS]:
            continue
        g = f[LAYERS][layer].create_group(ACTIVATION_ATLAS)
        for name in (*POINT_ARRAYS, *CELL_ARRAYS, "candidates"):
            g.create_dataset(name, data=part[name][...])
        g.attrs.update({k: v for k, v in part.attrs.items() if k not in ("written", "layer")})
        g.create_dataset("objective", data=np.full(len(part["row"]), np.nan, np.float32))
        g.create_dataset("done", data=np.zeros(len(part["row"]), bool))
        groups[layer] = (g, str(part.attrs["layout_id"]))
    for key, part in store.units(STAGE, PREFIX):
        layer = str(part.attrs["layer"])
        if f"/{CELLS}" not in key or layer not in groups or part.attrs.get("layout_id") != groups[layer][1]:
            continue  # cells of a layer no longer selected, or of an older layout
        g, (first, end) = groups[layer][0], _span(key)
        if "images" not in g:
            side = part["images"].shape[1]
            images = g.create_dataset("images", (len(g["row"]), side, side, 3), np.uint8,
                                      chunks=(1, side, side, 3), compression="gzip", compression_opts=1)
            images.attrs.update({k: v for k, v in part.attrs.items() if k not in ("written", "layer", "layout_id")})
        for name in RENDER_ARRAYS:
            g[name][first:end] = part[name][...]
