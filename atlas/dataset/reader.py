"""How the dataset stage's parts are named and read: the one face it shows the other stages.

The stage's parts, by key:

    images/<first>-<end>   bookkeeping of a range of source images: source index, name,
                           label, top-5 predictions, skipped files (a few bytes per image)
    summary/<rank>         one rank's running top-k, bottom-k and statistics of every layer,
                           over the ranges it lists in its `spans` attribute
    explained              the explained set: source indices of the images that get
                           attributions, checks and a page, and how they were chosen
    pixels/<first>         the model's view of explained images [first, first + n)
    crops/<layer>          each unit's top and bottom example crops, one JPEG strip per unit
    means/<first>          every unit's spatial mean on explained images [first, first + n)
    labels/<layer>         each unit's label with its evidence, and its facets (labelling.py)

The attribution stage reads images and top examples here, straight from the
parts (before any consolidation), and never opens those parts itself.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from atlas.dataset.images import ImageRecord, decode, list_images
from atlas.dataset.topk import LayerSummary
from atlas.errors import AtlasError
from atlas.store import Store, read_attrs
from atlas.store.schema import DATASET

STAGE = DATASET
BOOK, SUMMARY, EXPLAINED, PIXELS, CROPS = "images/", "summary/", "explained", "pixels/", "crops/"
MEANS = "means/"  # activation summaries of the explained images, chunked like the pixel parts
LABELS = "labels/"  # each layer's unit labels and facets
REFERENCES = 64  # explained images Expected Gradients draws its baselines from
CACHE = 256  # decoded images kept for unit attributions, which revisit a layer's top images


def source_records(cfg, class_names: list[str]) -> list[ImageRecord]:
    """The images of the configured source, in the order every stage numbers them."""
    return list_images(cfg.data, class_names, cfg.labels)[:cfg.max_images]


IMAGES_PER_WORKER = 64  # images over which a decoding process repays its start (the first loader's: about 3 s)


def decoding_workers(cfg, images: int) -> int:
    """Decoding processes for reading `images` images: the configured number, else one per core this
    process may use but none for fewer than IMAGES_PER_WORKER images each (this process decodes them)."""
    if cfg.workers is not None:
        return cfg.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, images // IMAGES_PER_WORKER)


def span_key(first: int, end: int) -> str:
    return f"{BOOK}{first:08d}-{end:08d}"


def pixel_key(first: int) -> str:
    return f"{PIXELS}{first:06d}"


def means_key(first: int) -> str:
    return f"{MEANS}{first:06d}"


def done_spans(store: Store, done: set[str]) -> set[str]:
    """The bookkeeping keys of the ranges some summary covers: the finished part of the pass."""
    covered = set()
    for key in sorted(k for k in done if k.startswith(SUMMARY)):
        with store.read_unit(STAGE, key) as part:
            covered.update(read_attrs(part).get("spans", []))
    return {k for k in covered if k in done}


@dataclass
class SearchSet:
    """The search set's images in source order, as the labels need them."""

    index: np.ndarray  # int64 [N]: source index, ascending
    image_class: np.ndarray  # int64 [N]: the true label where known, the model's top-1 prediction otherwise
    labelled: int  # images with a true label
    embedding: np.ndarray | None  # float16 [N, d]: the projected penultimate embedding (None: the model has none)


def search_set(store: Store) -> SearchSet:
    """Reads every range's bookkeeping, in source order."""
    parts: dict[str, list[np.ndarray]] = {"index": [], "labels": [], "top1": [], "embedding": []}
    for key in sorted(done_spans(store, store.done(STAGE))):
        with store.read_unit(STAGE, key) as part:
            parts["index"].append(part["index"][...])
            parts["labels"].append(part["labels"][...])
            parts["top1"].append(part["top5"][:, 0])
            if "embedding" in part:
                parts["embedding"].append(part["embedding"][...])
    index, labels, top1 = (np.concatenate(parts[k]) if parts[k] else np.zeros(0, np.int64)
                           for k in ("index", "labels", "top1"))
    order = np.argsort(index, kind="stable")
    whole = len(parts["embedding"]) == len(parts["index"]) and parts["embedding"]
    embedding = np.concatenate(parts["embedding"])[order] if whole else None
    labels = labels[order]
    return SearchSet(index[order], np.where(labels >= 0, labels, top1[order]), int((labels >= 0).sum()), embedding)


@dataclass
class FacetDirections:
    """The facets of a layer's polysemantic units, as directions of the model's penultimate embedding."""

    layer: str
    channel: np.ndarray  # int64 [F]
    facet: np.ndarray  # int64 [F]: the facet's number within its unit
    direction: np.ndarray  # float32 [F, D]: unit vectors in the classifier's input space
    scale: np.ndarray  # float32 [F]: the unit's highest activation over the search set


def facet_directions(store: Store, layers: list[str], embedding_dims: int) -> list[FacetDirections]:
    """Each labelled layer's polysemantic units' facets: the mean of a facet's projected, normalized
    embeddings, mapped back through the fixed projection (concepts.py) into the classifier's input
    space of `embedding_dims` dimensions, where (P e) . m = e . (P m)."""
    from atlas.dataset.concepts import FACET_K, MIN_COUNT, projection
    out = []
    done = store.done(STAGE)
    search = None
    for layer in layers:
        if f"{LABELS}{layer}" not in done:
            continue
        with store.read_unit(STAGE, f"{LABELS}{layer}") as part:
            if "polysemantic" not in part or not part["polysemantic"][...].any():
                continue
            poly = np.nonzero(part["polysemantic"][...])[0]
            member, examples = part["facet_member"][...][poly], part["examples"][...][poly]
            size, top = part["facet_size"][...][poly], part["top_value"][...][poly]
        search = search if search is not None else search_set(store)
        if search.embedding is None:
            return []
        p = projection(embedding_dims)
        rows = []
        for i, c in enumerate(poly):
            for f in range(max(FACET_K)):
                if size[i, f] < MIN_COUNT:
                    continue
                e = search.embedding[examples[i][member[i] == f]].astype(np.float32)
                m = (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).mean(0)
                d = p @ m
                rows.append((int(c), f, d / max(float(np.linalg.norm(d)), 1e-12), float(top[i])))
        if rows:
            out.append(FacetDirections(layer, np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                                       np.stack([r[2] for r in rows]).astype(np.float32),
                                       np.array([r[3] for r in rows], np.float32)))
    return out


def merged_summaries(store: Store, layers: list, device: torch.device | str = "cpu",
                     fuse: bool = True) -> tuple[dict[str, LayerSummary], dict]:
    """Every rank's summary folded into one per layer: the single pass's top-k, bottom-k and statistics.

    Args:
        layers: LayerInfo of the layers wanted; a layer no summary holds is left out.

    Returns:
        (layer name -> summary, the attributes of the last summary part: rf, k, source, total).
    """
    out: dict[str, LayerSummary] = {}
    attrs: dict = {}
    for _, part in store.units(STAGE, SUMMARY):
        attrs = read_attrs(part)
        for layer in layers:
            if f"{layer.name}/top_value" not in part:
                continue
            s = out.setdefault(layer.name, LayerSummary(layer.channels, int(attrs["k"]), device, fuse,
                                                        int(attrs.get("pool", 0))))
            s.merge({key: part[f"{layer.name}/{key}"][...] for key in _SUMMARY_ARRAYS
                     if f"{layer.name}/{key}" in part})
    return out, attrs


_SUMMARY_ARRAYS = ("top_key", "top_value", "top_index", "top_pos", "bottom_key", "bottom_value", "bottom_index",
                   "bottom_pos", "pool_key", "pool_value", "pool_index", "pool_pos",
                   "sum", "sumsq", "count", "max", "zeros", "hist")


def box_of(pos: np.ndarray, height: int, width: int, rf: int, size: int,
           centres: list[float] | None = None) -> np.ndarray:
    """Crop boxes (x0, y0, x1, y1) of side rf around flat positions in an h x w map.

    Args:
        centres: [offset_y, stride_y, offset_x, stride_x] of the layer's fields
            (`fields.field_centres`); default each map cell's middle.
    """
    oy, sy, ox, sx = centres or (size / height / 2, size / height, size / width / 2, size / width)
    cy = oy + sy * (pos // width)
    cx = ox + sx * (pos % width)
    half = rf / 2
    x0 = np.clip(np.round(cx - half), 0, size - rf)
    y0 = np.clip(np.round(cy - half), 0, size - rf)
    return np.stack([x0, y0, x0 + rf, y0 + rf], -1).astype(np.int32)


def examples(summary: LayerSummary, layer, rf: int, size: int, which: str = "top",
             centres: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A layer's top (or bottom) examples: source index [C, K] (-1: none) and crop boxes [C, K, 4]."""
    t = summary.top if which == "top" else summary.bottom
    valid = torch.isfinite(t.value) & (t.index >= 0)
    index = torch.where(valid, t.index, -1).cpu().numpy()
    return index, box_of(t.pos.cpu().numpy(), layer.height, layer.width, rf, size, centres)


def top_examples(store: Store, layers: list, size: int) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Each layer's merged top-k straight from the dataset parts, before consolidation.

    Args:
        store: the store holding the dataset stage's parts.
        layers: LayerInfo of the layers wanted.
        size: the model's input side (the boxes are in its pixels).

    Returns:
        name -> (source index [C, K] of the k-th image, -1 if none; crop boxes
        [C, K, 4] in input pixels; receptive field in pixels), for every layer
        the parts have examples of.
    """
    summaries, attrs = merged_summaries(store, layers)
    out = {}
    for layer in layers:
        if layer.name in summaries:
            rf = int(attrs["rf"][layer.name])
            centres = attrs.get("centres", {}).get(layer.name)
            out[layer.name] = (*examples(summaries[layer.name], layer, rf, size, centres=centres), rf)
    return out


class DatasetImages:
    """The search set's bookkeeping and the explained set's pixels, looked up by source index.

    Explained images come from the stage's pixel parts (the model's exact view);
    any other image (a unit's top example, for its unit attribution) is decoded
    from the source again, if `records` is given.
    """

    def __init__(self, store: Store, preprocess, device: torch.device, records: list[ImageRecord] | None = None):
        self.store, self.preprocess, self.device, self.records = store, preprocess, device, records
        self.labels: dict[int, int] = {}
        self.top1: dict[int, int] = {}
        done = store.done(STAGE)
        for key in sorted(done_spans(store, done)):
            with store.read_unit(STAGE, key) as part:
                for i, label, top in zip(part["index"][...], part["labels"][...], part["top5"][:, 0]):
                    self.labels[int(i)], self.top1[int(i)] = int(label), int(top)
        self.order = np.array(sorted(self.labels), np.int64)  # the search set, ascending
        self.where: dict[int, tuple[str, int]] = {}  # explained image -> (pixel part, row)
        self.chunks: dict[str, np.ndarray] = {}  # pixel part (without its prefix) -> its source indices
        for key, part in store.units(STAGE, PIXELS):
            self.chunks[key[len(PIXELS):]] = part["index"][...]
            for row, i in enumerate(self.chunks[key[len(PIXELS):]]):
                self.where[int(i)] = (key, row)
        self.explained = np.array(sorted(self.where), np.int64)
        self._references: torch.Tensor | None = None
        self._decoded: OrderedDict[int, np.ndarray] = OrderedDict()

    def pixels(self, index: np.ndarray) -> np.ndarray:
        """uint8 [n, S, S, 3] of the images with these source indices.

        Each pixel part holding some of them is opened once and only their rows are read;
        images outside the explained set are decoded from the source (the last CACHE kept).
        """
        index = np.asarray(index).reshape(-1)
        size = self.preprocess.size
        out = np.empty((len(index), size, size, 3), np.uint8)
        wanted: dict[str, list[tuple[int, int]]] = {}
        for j, i in enumerate(index):
            if int(i) in self.where:
                key, row = self.where[int(i)]
                wanted.setdefault(key, []).append((row, j))
            else:
                out[j] = self._decode(int(i))
        for key, pairs in wanted.items():
            rows = sorted({row for row, _ in pairs})
            with self.store.read_unit(STAGE, key) as part:
                block = part["images"][rows]  # h5py reads increasing rows
            at = {row: k for k, row in enumerate(rows)}
            for row, j in pairs:
                out[j] = block[at[row]]
        return out

    def _decode(self, i: int) -> np.ndarray:
        if i in self._decoded:
            self._decoded.move_to_end(i)
            return self._decoded[i]
        if self.records is None or not 0 <= i < len(self.records):
            raise AtlasError(f"image {i} of the dataset is not among the stored ones and its source is unknown")
        pixels, reason = decode(self.records[i].path, self.preprocess)
        if pixels is None:
            raise AtlasError(f"{self.records[i].name} can no longer be read ({reason}); it was read by the "
                             f"dataset pass: restore the source, or delete the store's parts to start over")
        self._decoded[i] = pixels
        if len(self._decoded) > CACHE:
            self._decoded.popitem(last=False)
        return pixels

    def inputs(self, index: np.ndarray) -> torch.Tensor:
        """The model's inputs [n, 3, S, S] of the images with these source indices."""
        return self.preprocess.from_uint8(self.pixels(index)).to(self.device)

    def references(self) -> torch.Tensor:
        """The images Expected Gradients draws baselines from (computed once)."""
        if self._references is None:
            self._references = self.inputs(self.spread(REFERENCES))
        return self._references

    def spread(self, count: int) -> np.ndarray:
        """`count` source indices spread evenly over the explained set."""
        pool = self.explained
        pick = np.unique(np.linspace(0, len(pool) - 1, min(count, len(pool))).round().astype(int))
        return pool[pick] if len(pool) else pool
