"""Unit attributions: which pixels of a top dataset image made one channel fire.

The target is the channel's spatial maximum (the score its top-k is ranked
by), not a logit. The map is gradient x input of that maximum, cut to the
crop box the site shows around the arg-max and resized to a fixed side, so a
unit page can lay it over its example crops. The forward pass stops at the
layer, so a unit in an early layer costs a fraction of a full pass.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlas.attribution.base import Attribution
from atlas.layers import Capture, LayerInfo

METHOD = "gradient_x_input"


class UnitAttribution(Attribution):
    """Gradient x input of one channel's spatial maximum, for (image, channel) pairs.

    Args:
        model: the network.
        layer: the layer whose channels are explained.
        batch: pairs per forward pass (halved on out-of-memory).
    """

    name = METHOD

    def __init__(self, model: nn.Module, layer: LayerInfo, batch: int = 64):
        super().__init__(model, None, batch)
        self.layer = layer

    @property
    def params(self) -> dict:
        return {"method": self.name, "target": "channel spatial max", "layer": self.layer.name}

    def _attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`target` holds a channel of the layer per image (not a class)."""
        return torch.cat(self.chunked(lambda a, b: self._pairs(inputs[a:b], target[a:b]), inputs.shape[0]))

    def _pairs(self, x: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), Capture(self.model, [self.layer.name], fn=lambda a: a, stop=True) as cap:
            act = cap.run(x)[self.layer.name]
            peak = act[torch.arange(x.shape[0]), channel].flatten(1).amax(1)
            (g,) = torch.autograd.grad(peak.sum(), x)
        return g * x.detach()


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
              boxes: np.ndarray, channels: range, size: int) -> np.ndarray:
    """Unit attributions of the top images of a range of channels.

    Args:
        method: the unit attribution bound to the model and layer.
        pixels: source indices [n] -> the model's inputs [n, 3, S, S] of those images.
        index: source index of each channel's top images [C_range, K] (-1: none).
        boxes: their crop boxes [C_range, K, 4].
        channels: the channels `index` rows belong to.
        size: side of each stored map.

    Returns:
        float32 [C_range, K, size, size], NaN where there is no image.
    """
    out = np.full((*index.shape, size, size), np.nan, np.float32)
    rows, cols = np.nonzero(index >= 0)
    for a in range(0, rows.size, method.batch):
        r, c = rows[a:a + method.batch], cols[a:a + method.batch]
        x = pixels(index[r, c])
        channel = torch.as_tensor(np.asarray(channels)[r], device=x.device)
        maps = method.attribute(x, channel).sum(1)
        out[r, c] = crop_maps(maps, boxes[r, c], size)
    return out
