"""How the other stages read the dataset stage's results: its stored images and top examples.

This module is the dataset stage's one public face besides its image sources:
the attribution stage looks images up here, by source index, straight from
the dataset parts (before any consolidation), and never opens those parts
itself.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from atlas.dataset.topk import TopK
from atlas.store import Store, read_attrs
from atlas.store.schema import DATASET

STAGE = DATASET
REFERENCES = 64  # dataset images Expected Gradients draws its baselines from


class DatasetImages:
    """The dataset stage's stored images, looked up by source index, as model inputs."""

    def __init__(self, store: Store, preprocess, device: torch.device):
        self.store, self.preprocess, self.device = store, preprocess, device
        self.where: dict[int, tuple[str, int]] = {}
        self.labels: dict[int, int] = {}
        self.top1: dict[int, int] = {}
        self.by_unit: dict[str, np.ndarray] = {}  # dataset unit -> source indices of its images, in order
        for key, part in store.units(STAGE):  # in key order: image order
            self.by_unit[key] = part["index"][...]
            for row, (i, label, top) in enumerate(zip(self.by_unit[key], part["labels"][...], part["top5"][:, 0])):
                self.where[int(i)] = (key, row)
                self.labels[int(i)], self.top1[int(i)] = int(label), int(top)
        self.order = np.array(sorted(self.where), np.int64)
        self._references: torch.Tensor | None = None

    def pixels(self, index: np.ndarray) -> np.ndarray:
        """uint8 [n, S, S, 3] of the images with these source indices.

        Each part holding some of them is opened once and only their rows are read, so
        scattered requests (a layer's top images) cost no more than the images themselves.
        """
        index = np.asarray(index).reshape(-1)
        wanted: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for j, i in enumerate(index):
            key, row = self.where[int(i)]
            wanted[key].append((row, j))
        out: np.ndarray | None = None
        for key, pairs in wanted.items():
            rows = sorted({row for row, _ in pairs})
            with self.store.read_unit(STAGE, key) as part:
                block = part["images"][rows]  # h5py reads increasing rows
            if out is None:
                out = np.empty((len(index), *block.shape[1:]), block.dtype)
            at = {row: k for k, row in enumerate(rows)}
            for row, j in pairs:
                out[j] = block[at[row]]
        return out

    def inputs(self, index: np.ndarray) -> torch.Tensor:
        """The model's inputs [n, 3, S, S] of the images with these source indices."""
        return self.preprocess.from_uint8(self.pixels(index)).to(self.device)

    def references(self) -> torch.Tensor:
        """The images Expected Gradients draws baselines from (computed once)."""
        if self._references is None:
            self._references = self.inputs(self.spread(REFERENCES))
        return self._references

    def spread(self, count: int) -> np.ndarray:
        """`count` source indices spread evenly over the dataset."""
        pick = np.unique(np.linspace(0, len(self.order) - 1, min(count, len(self.order))).round().astype(int))
        return self.order[pick] if len(self.order) else self.order


def box_of(pos: np.ndarray, height: int, width: int, rf: int, size: int) -> np.ndarray:
    """Crop boxes (x0, y0, x1, y1) of side rf around flat positions in an h x w map."""
    cy = (pos // width + 0.5) * size / height
    cx = (pos % width + 0.5) * size / width
    half = rf / 2
    x0 = np.clip(np.round(cx - half), 0, size - rf)
    y0 = np.clip(np.round(cy - half), 0, size - rf)
    return np.stack([x0, y0, x0 + rf, y0 + rf], -1).astype(np.int32)


def top_examples(store: Store, layers: list) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Each layer's merged top-k straight from the dataset parts, before consolidation.

    Args:
        store: the store holding the dataset stage's parts.
        layers: LayerInfo of the layers wanted.

    Returns:
        name -> (source index [C, K] of the k-th image, -1 if none; crop boxes
        [C, K, 4] in input pixels; receptive field in pixels), for every layer
        the parts have examples of.
    """
    merged: dict[str, TopK] = {}
    rf: dict[str, int] = {}
    size = 0
    for _, part in store.units(STAGE):
        size = part["images"].shape[1] if part["images"].ndim == 4 else size
        rf = read_attrs(part).get("rf", rf)
        for layer in layers:
            if f"{layer.name}/top_value" not in part:
                continue
            t = merged.setdefault(layer.name, TopK(layer.channels, int(part.attrs["k"]), True))
            t.update(*(torch.from_numpy(part[f"{layer.name}/top_{x}"][...]) for x in ("value", "index", "pos")))
    out = {}
    for layer in layers:
        if layer.name in merged:
            t = merged[layer.name]
            valid = torch.isfinite(t.value) & (t.index >= 0)
            index = torch.where(valid, t.index, -1).numpy()
            out[layer.name] = (index, box_of(t.pos.numpy(), layer.height, layer.width, rf[layer.name], size),
                               rf[layer.name])
    return out
