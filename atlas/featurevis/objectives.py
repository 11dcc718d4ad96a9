"""Objectives for feature visualization, as a small arithmetic.

An objective maps the captured activations of a batch to one value per image
(higher is better) and names the layers it needs, so the renderer hooks only
those and stops the forward pass after the deepest one. Objectives add,
subtract and scale:

    obj = channel("layer3.1", 7) - 0.5 * channel("layer3.1", 9)

Channel arguments may be one index for every image or a sequence with one
index per image of the batch, so one batch can render many units at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Acts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    fn: Callable[[Acts], torch.Tensor]  # activations -> value per image [B]
    name: str
    layers: frozenset[str]
    # each image's value depends on that image alone; then an image may leave the batch early
    # (the renderer's per-image stopping), which an objective comparing images with each other forbids
    separable: bool = True

    def __call__(self, acts: Acts) -> torch.Tensor:
        return self.fn(acts)

    def __add__(self, other: Objective) -> Objective:
        return Objective(lambda a: self(a) + other(a), f"{self.name} + {other.name}",
                         self.layers | other.layers, self.separable and other.separable)

    def __sub__(self, other: Objective) -> Objective:
        return Objective(lambda a: self(a) - other(a), f"{self.name} - {other.name}",
                         self.layers | other.layers, self.separable and other.separable)

    def __mul__(self, k: float) -> Objective:
        return Objective(lambda a: k * self(a), f"{k:g} * ({self.name})", self.layers, self.separable)

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), f"-({self.name})", self.layers, self.separable)


def _per_image(channels: int | Sequence[int], acts: torch.Tensor) -> torch.Tensor:
    """The selected channel of each image: [B, H, W]."""
    b = acts.shape[0]
    index = torch.as_tensor(channels, device=acts.device).expand(b) if isinstance(channels, int) \
        else torch.as_tensor(list(channels), device=acts.device)
    if index.numel() != b:
        raise ValueError(f"channels: got {index.numel()} indices for a batch of {b}")
    return acts[torch.arange(b, device=acts.device), index]


def _label(channels: int | Sequence[int]) -> str:
    return str(channels) if isinstance(channels, int) else f"[{len(channels)} channels]"


def channel(layer: str, channels: int | Sequence[int]) -> Objective:
    """Mean activation of a channel over all positions."""
    return Objective(lambda a: _per_image(channels, a[layer]).mean(dim=(1, 2)),
                     f"channel {layer}:{_label(channels)}", frozenset({layer}))


def negative_channel(layer: str, channels: int | Sequence[int], pre: str | None = None) -> Objective:
    """The channel's mean activation, minimized; on its pre-activation `pre` where the layer has one.

    A ReLU's output that is zero everywhere has no gradient, so a unit silent
    on the start image would never move; Lucid minimizes the pre-ReLU tensor.
    The layer itself is captured too (its activation on the result is kept).
    """
    if pre is None:
        return -channel(layer, channels)
    low = -channel(pre, channels)
    return Objective(low.fn, f"negative {pre}:{_label(channels)} (pre-activation)", frozenset({pre, layer}))


def neuron(layer: str, channels: int | Sequence[int]) -> Objective:
    """Activation of a channel at the centre position."""
    def fn(a: Acts) -> torch.Tensor:
        maps = _per_image(channels, a[layer])
        return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]
    return Objective(fn, f"neuron {layer}:{_label(channels)}", frozenset({layer}))


def direction(layer: str, vectors: torch.Tensor) -> Objective:
    """Dot product of the activation with a direction in channel space, averaged over positions.

    Args:
        vectors: [C] for every image or [B, C] for one direction per image.
    """
    def fn(a: Acts) -> torch.Tensor:
        v = vectors.to(a[layer])
        v = v.expand(a[layer].shape[0], -1) if v.dim() == 1 else v
        return torch.einsum("bchw,bc->b", a[layer], v) / (a[layer].shape[2] * a[layer].shape[3])
    return Objective(fn, f"direction {layer}", frozenset({layer}))


def alignment(layer: str, vectors: torch.Tensor) -> Objective:
    """Cosine similarity of the activation's spatial mean with one direction per image [B, C].

    Faceted feature visualization (Goh et al. 2021) steers a unit's image toward one facet by adding
    this, on the model's penultimate embedding, to the unit's own objective.
    """
    def fn(a: Acts) -> torch.Tensor:
        mean = a[layer].mean(dim=(2, 3))
        return F.cosine_similarity(mean, vectors.to(mean), dim=1)
    return Objective(fn, f"alignment of {layer}", frozenset({layer}))


START = "#start"  # suffix of `on_start` names (no module name holds a "#")


def on_start(layer: str) -> str:
    """The name under which an objective finds `layer`'s activation on the image its render started from,
    seen through the same transforms as the image (the renderer's `start`)."""
    return layer + START


def dot(layer: str) -> Objective:
    """Dot product of each image's activation with its start image's, averaged over positions.

    Lucid's caricature objective (`dot_compare` at its default cosine power 0). Lucid renders the
    original in the same batch as the caricature, so both pass through the same transforms; the
    renderer does the same with the start images, so the two activations line up position by
    position. Started from a photo, raising it exaggerates what the layer sees in the photo.
    """
    def fn(a: Acts) -> torch.Tensor:
        act = a[layer]
        return (act * a[on_start(layer)]).sum(dim=(1, 2, 3)) / (act.shape[2] * act.shape[3])
    return Objective(fn, f"dot {layer} with the start image's", frozenset({layer, on_start(layer)}))


def diversity(layer: str, groups: Sequence[int] | None = None) -> Objective:
    """Minus the summed cosine similarity of each image's Gram matrix with the others' in its group.

    Rewards images that differ in style. Summed over a batch this is Lucid's
    diversity term times the batch size, so `channel + 100 * diversity` is
    Lucid's recipe (`channel - 1e2 * diversity`, whose channel term is the mean
    over the batch). `groups` gives each image of the batch a group id
    (default: one group), so several units' diversity sets can share a batch
    without pulling on each other. An image alone in its group scores 0.
    """
    def fn(a: Acts) -> torch.Tensor:
        x = a[layer].flatten(2)
        gram = F.normalize(torch.bmm(x, x.transpose(1, 2)).flatten(1), dim=1)
        sim = gram @ gram.T
        b = sim.shape[0]
        ids = torch.zeros(b, device=x.device) if groups is None else torch.as_tensor(list(groups), device=x.device)
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(b, dtype=torch.bool, device=x.device)
        return -(sim * same).sum(1)
    return Objective(fn, f"diversity {layer}", frozenset({layer}), separable=False)
