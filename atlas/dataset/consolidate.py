"""The dataset stage's section of the consolidated store: /dataset and each layer's examples.

Parts are folded in key order (image order), so the merged top-k equals a
single pass's, ties broken by image index.
"""

from __future__ import annotations

import h5py
import numpy as np
import torch

from atlas.dataset.reader import box_of
from atlas.dataset.topk import HIST_EDGES, STATS, TopK
from atlas.store import Store, read_attrs
from atlas.store.schema import BOTTOMK, DATASET, LAYERS, TOPK
from atlas.store.schema import STATS as STATS_GROUP

STAGE = DATASET
GROUP_OF = {"top": TOPK, "bottom": BOTTOMK}  # the merged lists' groups in /layers/<layer>/


def consolidate(store: Store, f: h5py.File) -> None:
    """Writes /dataset and, per layer, the merged top-k, bottom-k and statistics.

    One pass over the parts folds every layer at once, so each part is opened
    once and memory holds one summary per layer, whatever the number of parts.
    """
    compact, attrs = _write_images(store, f)
    k = int(attrs.get("k", 10))
    merged = {name: _Merged(int(g.attrs["channels"]), k) for name, g in f[LAYERS].items()}
    for _, part in store.units(STAGE):
        for name in list(merged):
            if f"{name}/top_value" not in part:
                del merged[name]  # the layer was added after this pass: no dataset examples for it yet
            else:
                merged[name].add(part, name)
    for name, m in merged.items():
        _write_layer(f, name, m, compact, attrs["rf"][name], k)


class _Merged:
    """The running merge of one layer's top-k, bottom-k and statistics over the parts."""

    def __init__(self, channels: int, k: int):
        self.lists = {"top": TopK(channels, k, True), "bottom": TopK(channels, k, False)}
        self.stats: dict[str, np.ndarray] = {}

    def add(self, part: h5py.File, name: str) -> None:
        for prefix, t in self.lists.items():
            t.update(*(torch.from_numpy(part[f"{name}/{prefix}_{x}"][...]) for x in ("value", "index", "pos")))
        for key in STATS:
            value = part[f"{name}/{key}"][...]
            old = self.stats.get(key)
            self.stats[key] = value if old is None else np.maximum(old, value) if key == "max" else old + value


def _write_images(store: Store, f: h5py.File) -> tuple[np.ndarray, dict]:
    index, sizes, attrs = [], [], {}
    for _, part in store.units(STAGE):
        index.append(part["index"][...])
        sizes.append(part["images"].shape[1])
        attrs = read_attrs(part)
    index = np.concatenate(index)
    compact = np.full(int(index.max()) + 1 if index.size else 0, -1, np.int64)
    compact[index] = np.arange(index.size)
    size = sizes[0] if sizes else 0
    g = f.create_group(DATASET)
    images = g.create_dataset("images", (index.size, size, size, 3), np.uint8, chunks=(1, size, size, 3))
    text = {k: [] for k in ("paths", "skipped_paths", "skipped_reasons")}
    other = {k: [] for k in ("labels", "top5", "top5_prob")}
    row = 0
    for _, part in store.units(STAGE):
        n = part["images"].shape[0]
        images[row:row + n] = part["images"][...]
        row += n
        for k in text:
            text[k] += [s.decode() if isinstance(s, bytes) else s for s in part[k][...]]
        for k in other:
            other[k].append(part[k][...])
    for k, v in text.items():
        g.create_dataset(k, data=np.array(v, dtype=object), dtype=h5py.string_dtype())
    for k, v in other.items():
        g.create_dataset(k, data=np.concatenate(v))
    g.create_dataset("source_index", data=index)
    images.attrs.update({"source": attrs.get("source", ""), "count": index.size,
                         "skipped": len(text["skipped_paths"])})
    return compact, attrs


def _write_layer(f: h5py.File, name: str, m: _Merged, compact: np.ndarray, rf: int, k: int) -> None:
    layer = f[LAYERS][name]
    height, width = int(layer.attrs["height"]), int(layer.attrs["width"])
    size = f[DATASET]["images"].shape[1]
    for prefix, t in m.lists.items():
        g = layer.create_group(GROUP_OF[prefix])
        value, index, pos = (_pad(a, k, fill) for a, fill in
                             ((t.value.numpy(), np.nan), (t.index.numpy(), -1), (t.pos.numpy(), 0)))
        valid = np.isfinite(value) & (index >= 0)
        g["index"] = np.where(valid, compact[np.maximum(index, 0)], -1)
        g["value"] = np.where(valid, value, np.nan).astype(np.float32)
        g["box"] = box_of(pos, height, width, rf, size)
        g.attrs.update({"k": k, "score": "spatial max", "images": int(f[DATASET]["images"].shape[0]),
                        "receptive_field": rf})
    _write_stats(layer.create_group(STATS_GROUP), m.stats)


def _pad(a: np.ndarray, k: int, fill) -> np.ndarray:
    """Pads [C, n] to [C, k] when fewer than k images were seen."""
    if a.shape[1] >= k:
        return a
    return np.concatenate([a, np.full((a.shape[0], k - a.shape[1]), fill, a.dtype)], 1)


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
