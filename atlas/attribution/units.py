"""Unit attributions: which pixels of a top dataset image made one channel fire.

The target is the channel's spatial maximum (the score its top-k is ranked
by), not a logit. The map is gradient x input of that maximum, cut to the
crop box the site shows around the arg-max and resized to a fixed side, so a
unit page can lay it over its example crops. The forward pass stops at the
layer, so a unit in an early layer costs a fraction of a full pass, and the
units of a layer whose top images include the same photo share that photo's
forward pass: one forward pass per photo, then one backward pass per unit
(on a small dataset each photo is among the top images of hundreds of units
of a layer). The same backward pass gives the unit's circuit inputs from the
previous selected layer (circuits.py).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlas.attribution.base import Attribution
from atlas.attribution.taps import Taps
from atlas.layers import Capture, LayerInfo

METHOD = "gradient_x_input"


class UnitAttribution(Attribution):
    """Gradient x input of one channel's spatial maximum, for (image, channel) pairs.

    Args:
        model: the network.
        layer: the layer whose channels are explained.
        batch: pairs per forward pass (halved on out-of-memory).
        source: the previous selected layer, whose channels' inputs to the unit (activation x gradient,
            summed over positions) come out of the same backward pass; None for none.
    """

    name = METHOD

    def __init__(self, model: nn.Module, layer: LayerInfo, batch: int = 64, source: LayerInfo | None = None):
        super().__init__(model, None, batch)
        self.layer, self.source = layer, source

    @property
    def params(self) -> dict:
        return {"method": self.name, "target": "channel spatial max", "layer": self.layer.name}

    def _attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`target` holds a channel of the layer per image (not a class)."""
        return torch.cat(self.chunked(lambda a, b: self.pairs(inputs[a:b], target[a:b])[0], inputs.shape[0]))

    def pairs(self, x: torch.Tensor, channel: torch.Tensor,
              image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The maps [n, 3, H, W] of n (image, channel) pairs and the source layer's inputs to each unit
        [n, C_source] (None without a source, or where the unit does not depend on it).

        Args:
            x: the images [U, 3, H, W].
            channel: each pair's channel [n].
            image: each pair's row of `x` [n]; None: one row per pair (n = U). Each image used goes
                through the model once; each round of backward passes takes one pair of every image,
                so an image shared by k pairs costs one forward and k backward rows.
        """
        image = torch.arange(x.shape[0], device=x.device) if image is None else image.to(x.device)
        used, row = torch.unique(image, return_inverse=True)
        x = x[used].detach().requires_grad_(True)
        # the k-th pair of each image goes into the k-th round
        order = torch.argsort(row, stable=True)
        first = torch.searchsorted(row[order], row[order], right=False)
        rank = torch.empty_like(row)
        rank[order] = torch.arange(row.numel(), device=row.device) - first
        maps = x.new_zeros((row.numel(), *x.shape[1:]))
        inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        taps = Taps(self.model, [self.source.name] if self.source is not None else [])
        with torch.enable_grad(), taps, Capture(self.model, [self.layer.name], fn=lambda a: a, stop=True) as cap:
            act = cap.run(x)[self.layer.name]
            rounds = int(rank.max()) + 1
            for k in range(rounds):
                pick = (rank == k).nonzero()[:, 0]
                peak = act[row[pick], channel[pick]].flatten(1).amax(1)
                grads = torch.autograd.grad(peak.sum(), [x, *taps.zeros.values()], allow_unused=True,
                                            retain_graph=k < rounds - 1)
                maps[pick] = (grads[0] * x.detach())[row[pick]]
                if len(grads) > 1 and grads[1] is not None:
                    inputs.append((pick, taps.contribution(self.source.name, grads[1])[row[pick]]))
        if len(inputs) < rounds:  # no source, or the unit does not depend on it
            return maps, None
        contribution = inputs[0][1].new_zeros((row.numel(), inputs[0][1].shape[1]))
        for pick, got in inputs:
            contribution[pick] = got
        return maps, contribution


def crop_maps(maps: torch.Tensor, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cuts each map [n, H, W] to its box (x0, y0, x1, y1) and resizes it to size x size.

    Returns:
        float32 [n, size, size].
    """
    out = []
    for m, (x0, y0, x1, y1) in zip(maps, boxes):
        crop = m[None, None, y0:y1, x0:x1].float()
        out.append(F.interpolate(crop, size=(size, size), mode="area" if crop.shape[-1] >= size else "bilinear"))
    return torch.cat(out)[:, 0].cpu().numpy() if out else np.zeros((0, size, size), np.float32)


def unit_maps(method: UnitAttribution, pixels: Callable[[np.ndarray], torch.Tensor], index: np.ndarray,
              boxes: np.ndarray, channels: range, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit attributions of the top images of a range of channels, and the units' circuit inputs.

    Args:
        method: the unit attribution bound to the model and layer.
        pixels: source indices [n] -> the model's inputs [n, 3, S, S] of those images.
        index: source index of each channel's top images [C_range, K] (-1: none).
        boxes: their crop boxes [C_range, K, 4].
        channels: the channels `index` rows belong to.
        size: side of each stored map.

    Returns:
        float32 [C_range, K, size, size], NaN where there is no image; and float32 [C_range, C_source],
        each unit's inputs from the source layer averaged over its top images (NaN for a unit without
        images), or None without a source layer or where the layer does not depend on it.
    """
    out = np.full((*index.shape, size, size), np.nan, np.float32)
    total: np.ndarray | None = None
    rows, cols = np.nonzero(index >= 0)
    # pairs that share an image side by side, so that a batch holds few images with several units each
    order = np.argsort(index[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    for a in range(0, rows.size, method.batch):
        r, c = rows[a:a + method.batch], cols[a:a + method.batch]
        used, image = np.unique(index[r, c], return_inverse=True)
        x = method.prepare(pixels(used), 0)[0]
        channel = torch.as_tensor(np.asarray(channels)[r], device=x.device)
        image = torch.as_tensor(image.reshape(-1), device=x.device)
        parts = method.chunked(lambda i, j: method.pairs(x, channel[i:j], image[i:j]), r.size)
        out[r, c] = crop_maps(torch.cat([m for m, _ in parts]).sum(1), boxes[r, c], size)
        if all(inputs is not None for _, inputs in parts):
            got = torch.cat([inputs for _, inputs in parts]).cpu().numpy()
            total = np.zeros((index.shape[0], got.shape[1]), np.float64) if total is None else total
            np.add.at(total, r, got)
    if total is None:
        return out, None
    count = (index >= 0).sum(1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return out, np.where(count > 0, total / count, np.nan).astype(np.float32)
