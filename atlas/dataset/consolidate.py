"""The dataset stage's section of the consolidated store: /dataset and each layer's examples.

/dataset holds one row per search image (name, label, predictions: a few
bytes each) and the explained set's rows and pixels; each layer gets its
merged top-k and bottom-k (rows into /dataset, values, boxes, crop strips)
and its statistics. Every rank's summary is merged, so the lists equal a
single pass's, ties broken by image index.
"""

from __future__ import annotations

import h5py
import numpy as np

from atlas.dataset import labelling
from atlas.dataset.reader import CROPS, EXPLAINED, MEANS, PIXELS, STAGE, done_spans, examples, merged_summaries
from atlas.dataset.topk import HIST_EDGES, LayerSummary
from atlas.store import Store, read_attrs
from atlas.store.files import write_bytes
from atlas.store.schema import BOTTOMK, DATASET, LAYERS, TOPK
from atlas.store.schema import MEANS as MEANS_DATASET
from atlas.store.schema import STATS as STATS_GROUP

GROUP_OF = {"top": TOPK, "bottom": BOTTOMK}  # the merged lists' groups in /layers/<layer>/


def consolidate(store: Store, f: h5py.File) -> dict:
    """Writes /dataset and, per layer, the merged top-k, bottom-k, crops and statistics.

    Returns:
        Where the pixel and crop parts' arrays went (`Moves`): those parts hand them over.
    """
    spans = sorted(done_spans(store, store.done(STAGE)))
    if not spans:
        return {}
    source, attrs = _write_search(store, f, spans)
    moves = _write_explained(store, f, source)
    _write_means(store, f)
    layers = [_Layer(name, g) for name, g in f[LAYERS].items()]
    summaries, summary_attrs = merged_summaries(store, layers)
    attrs = {**summary_attrs, **attrs}
    k = int(attrs.get("k", 10))
    done = store.done(STAGE)
    for layer in layers:
        if layer.name not in summaries:
            continue  # a layer added after this pass: no dataset examples for it yet
        crops = f"{CROPS}{layer.name}"
        moves.update(_write_layer(f, layer, summaries[layer.name], source, attrs["rf"][layer.name],
                                  attrs.get("centres", {}).get(layer.name), k,
                                  store if crops in done else None))
    labelling.consolidate(store, f)
    return moves


class _Layer:
    """What the readers need of a store layer: its name, channels and map size."""

    def __init__(self, name: str, g: h5py.Group):
        self.name, self.channels = name, int(g.attrs["channels"])
        self.height, self.width = int(g.attrs["height"]), int(g.attrs["width"])
        self.pre = str(g.attrs.get("pre", "")) or None


def _write_search(store: Store, f: h5py.File, spans: list[str]) -> tuple[np.ndarray, dict]:
    """One row per search image, in source order: names, labels, predictions, and the skipped files."""
    text = {k: [] for k in ("paths", "skipped_paths", "skipped_reasons")}
    other = {k: [] for k in ("source_index", "labels", "top5", "top5_prob")}
    attrs: dict = {}
    for key in spans:
        with store.read_unit(STAGE, key) as part:
            attrs = read_attrs(part)
            for k in text:
                text[k] += [s.decode() if isinstance(s, bytes) else s for s in part[k][...]]
            other["source_index"].append(part["index"][...])
            for k in ("labels", "top5", "top5_prob"):
                other[k].append(part[k][...])
    g = f.create_group(DATASET)
    for k, v in text.items():
        g.create_dataset(k, data=np.array(v, dtype=object), dtype=h5py.string_dtype())
    for k, v in other.items():
        g.create_dataset(k, data=np.concatenate(v))
    source = g["source_index"][...]
    g.attrs.update({"search": int(source.size), "skipped": len(text["skipped_paths"]),
                    "total": int(attrs.get("total", source.size))})
    return source, attrs


def _write_explained(store: Store, f: h5py.File, source: np.ndarray) -> dict:
    """/dataset/explained (rows, ascending) and /dataset/images (their pixels, in that order)."""
    g = f[DATASET]
    done = store.done(STAGE)
    if EXPLAINED not in done:
        return {}
    with store.read_unit(STAGE, EXPLAINED) as part:
        chosen = part["index"][...]
        g["explained"] = np.searchsorted(source, chosen)
        g["explained"].attrs.update(read_attrs(part))
        g["explained_top_counts"] = part["top_counts"][...]
    moves = {}
    images = None
    for key, part in store.units(STAGE, PIXELS):
        pixels = part["images"]
        if images is None:
            size = pixels.shape[1]
            images = g.create_dataset("images", (len(chosen), size, size, 3), np.uint8, chunks=(1, size, size, 3))
            images.attrs.update({"source": read_attrs(part).get("source", ""), "rows": "/dataset/explained"})
        first = int(part.attrs["first"])
        images[first:first + len(pixels)] = pixels[...]
        moves[key] = {"images": (images.name, first, len(pixels))}
    return moves


def _write_means(store: Store, f: h5py.File) -> None:
    """/layers/<layer>/means: float16 [E, C] in /dataset/explained order, when the means parts cover
    every explained image (a store built before they existed has none; the dataset stage adds them)."""
    if "explained" not in f[DATASET]:
        return
    rows = len(f[DATASET]["explained"])
    covered = 0
    for _, part in store.units(STAGE, MEANS):
        covered += len(part["index"])
    if covered != rows:
        return
    for _, part in store.units(STAGE, MEANS):
        first = int(part.attrs["first"])
        for name, group in f[LAYERS].items():
            if name not in part:
                continue
            means = part[f"{name}/mean"]
            if MEANS_DATASET not in group:
                ds = group.create_dataset(MEANS_DATASET, (rows, means.shape[1]), np.float16)
                ds.attrs.update({"of": "each explained image's spatial mean of every channel, the activation "
                                       "as the model's forward pass produced it", "rows": "/dataset/explained"})
            group[MEANS_DATASET][first:first + len(means)] = means[...]


# how each list ranks its images and what its values are, for a unit without and with a known pre-activation
SCORES = {("top", False): "spatial max (ties: the lower image index)",
          ("bottom", False): "spatial min (ties: the lower image index)",
          ("top", True): "ranked by the pre-activation's spatial max; the value is the activation there "
                         "(for the ReLU family the activation's own max, its ties at 0 or the cap broken by what lies "
                         "beneath)",
          ("bottom", True): "the pre-activation's spatial min: where the unit is most strongly suppressed"}


def _write_layer(f: h5py.File, layer: _Layer, summary: LayerSummary, source: np.ndarray, rf: int,
                 centres: list[float] | None, k: int,
                 crops: Store | None) -> dict:
    group = f[LAYERS][layer.name]
    size = int(f.attrs.get("input_size", 224))
    moves = {}
    for which, name in GROUP_OF.items():
        index, box = examples(summary, layer, rf, size, which, centres)
        value = (summary.top if which == "top" else summary.bottom).value.numpy()
        index, value, box = _pad(index, k, -1), _pad(value, k, np.nan), _pad(box, k, 0)
        g = group.create_group(name)
        valid = index >= 0
        g["index"] = np.where(valid, np.searchsorted(source, np.maximum(index, 0)), -1)
        g["value"] = np.where(valid, value, np.nan).astype(np.float32)
        g["box"] = box
        g.attrs.update({"k": k, "score": SCORES[which, layer.pre is not None], "images": int(source.size),
                        "receptive_field": rf, **({"field_centres": centres} if centres else {})})
    if crops is not None:
        key = f"{CROPS}{layer.name}"
        with crops.read_unit(STAGE, key) as part:
            for which, name in GROUP_OF.items():
                ds = group[name].create_dataset("crops", (layer.channels,), h5py.vlen_dtype(np.uint8))
                write_bytes(ds, part[which][...])
                ds.attrs.update(read_attrs(part))
        moves[key] = {w: (group[n]["crops"].name, 0, layer.channels) for w, n in GROUP_OF.items()}
    _write_stats(group.create_group(STATS_GROUP), summary.arrays())
    return moves


def _pad(a: np.ndarray, k: int, fill) -> np.ndarray:
    """Pads [C, n, ...] to [C, k, ...] when fewer than k images were seen."""
    if a.shape[1] >= k:
        return a
    return np.concatenate([a, np.full((a.shape[0], k - a.shape[1], *a.shape[2:]), fill, a.dtype)], 1)


def _write_stats(g: h5py.Group, totals: dict[str, np.ndarray]) -> None:
    count = np.maximum(totals["count"], 1)
    mean = totals["sum"] / count
    g["mean"] = mean.astype(np.float32)
    g["std"] = np.sqrt(np.maximum(totals["sumsq"] / count - mean**2, 0)).astype(np.float32)
    g["max"] = totals["max"].astype(np.float32)
    g["zero_fraction"] = (totals["zeros"] / count).astype(np.float32)
    g["dead"] = g["max"][...] <= 0
    g["hist"] = totals["hist"].astype(np.int64)
    g["hist"].attrs["of"] = "spatial max per image"
    g["hist_edges"] = HIST_EDGES
