"""Deletion, insertion and mass-centre ablation: does removing what a map points at hurt the model?

Deletion (Petsiuk et al. 2018, RISE) replaces the most attributed pixels
first, by the normalization mean or by a blurred copy, and tracks the softmax
probability of the explained class, as RISE does (not a fraction of the
intact image's: areas stay within [0, 1] and images compare on one scale);
insertion starts from the replacement and restores the most attributed pixels
first. A pixel is removed with all its colour channels; the caller chooses
the order's map (the signed map, or its magnitude where the sign is no
evidence). A random pixel order is the control. Mass-centre ablation replaces one box, centred at the
map's centre of mass, by the mean.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from atlas.attribution.baselines import gaussian_blur
from atlas.devices import chunked

REPLACEMENTS = ("mean", "blur")
KINDS = ("deletion", "insertion")
ORDERS = ("map", "random")
BLUR_SIGMA = 1 / 20  # sigma of the "blur" replacement, as a fraction of the shorter image side
BOX_FRACTION = 0.25  # side of the mass-centre box as a fraction of the image side (1/16 of the area)


def fractions(points: int) -> np.ndarray:
    """The fractions of pixels removed (or restored) at each curve point: float32 [P] from 0 to 1."""
    if points < 2:
        raise ValueError(f"points: expected at least 2 curve points, got {points}")
    return np.linspace(0, 1, points, dtype=np.float32)


def auc(curve: np.ndarray, fracs: np.ndarray) -> np.ndarray:
    """Area under each curve by the trapezoid rule.

    Args:
        curve: [..., P] scores at `fracs`.
        fracs: [P] increasing fractions.

    Returns:
        [...] areas (deletion: lower is better; insertion: higher is better).
    """
    curve, fracs = np.asarray(curve, np.float64), np.asarray(fracs, np.float64)
    return (0.5 * (curve[..., 1:] + curve[..., :-1]) * np.diff(fracs)).sum(-1)


def replacement_image(inputs: torch.Tensor, replacement: str) -> torch.Tensor:
    """What removed pixels become.

    Args:
        inputs: [B, 3, H, W] in the model's input space.
        replacement: "mean": zeros in the model's input space, i.e. the
            normalization mean colour (the dataset mean for ImageNet models;
            black for a model fed raw pixels); "blur": a Gaussian-blurred copy
            with sigma = BLUR_SIGMA x the shorter side (11 pixels at 224).

    Returns:
        A tensor shaped like `inputs`.
    """
    if replacement == "mean":
        return torch.zeros_like(inputs)
    if replacement == "blur":
        return gaussian_blur(inputs, BLUR_SIGMA * min(inputs.shape[-2:]))
    raise ValueError(f"replacement: expected one of {', '.join(REPLACEMENTS)}, got {replacement!r}")


def pixel_ranks(maps: torch.Tensor, order: str = "map", seed: int = 0) -> torch.Tensor:
    """The position of each pixel in the removal order, [n, H * W] (0 = first).

    Args:
        maps: [n, H, W] (or [n, 3, H, W], summed over colour).
        order: "map": descending map value (signed: pass |map| to order by
            magnitude), ties by position; "random": a permutation drawn from
            (seed, image index), so an image's order does not depend on its batch.
        seed: seed of the random order.
    """
    maps = maps.sum(1) if maps.dim() == 4 else maps
    n, size = maps.shape[0], maps[0].numel()
    if order == "map":
        removal = torch.argsort(-maps.reshape(n, -1).double(), dim=1, stable=True)
    elif order == "random":
        removal = torch.stack([torch.from_numpy(np.random.default_rng([seed, i]).permutation(size))
                               for i in range(n)]) if n else torch.zeros(0, size, dtype=torch.long)
    else:
        raise ValueError(f"order: expected one of {', '.join(ORDERS)}, got {order!r}")
    ranks = torch.empty_like(removal)
    ranks.scatter_(1, removal, torch.arange(size).expand(n, size).contiguous())
    return ranks.to(maps.device)


def chunks(fn: Callable[[int, int], torch.Tensor], total: int, batch: int) -> torch.Tensor:
    """Concatenates `fn(a, b)` over [0, total) in chunks of `batch` rows, halving them on out-of-memory."""
    out, _ = chunked(fn, total, batch)
    return torch.cat(out) if out else torch.zeros(0)


def probabilities(model: nn.Module, make: Callable[[int, int], torch.Tensor], target: torch.Tensor,
                  total: int, batch: int) -> torch.Tensor:
    """Softmax probability of `target[j]` for images j = 0..total-1 that `make(a, b)` builds, [total]."""
    def run(a: int, b: int) -> torch.Tensor:
        with torch.no_grad():
            logits = model(make(a, b)).float()
        return logits.softmax(1).gather(1, target[a:b, None])[:, 0].cpu()
    return chunks(run, total, batch)


def _targets(target: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(target, device=device).long().reshape(-1).expand(n)


def ablation_curves(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor | int,
                    maps: torch.Tensor | np.ndarray, points: int = 21, replacement: str = "mean",
                    order: str = "map", seed: int = 0, batch: int = 64, kind: str = "deletion") -> np.ndarray:
    """Deletion or insertion curves: the class probability as pixels go, or come back, in map order.

    Args:
        model: the classifier, in eval mode.
        inputs: [n, 3, H, W] in the model's input space.
        target: the class of each image, [n] or one int.
        maps: [n, H, W] (or [n, 3, H, W]); ignored when `order` is "random".
        points: curve points P, at fractions `fractions(points)` of the pixels.
        replacement: "mean" or "blur" (see `replacement_image`).
        order: "map" (most attributed first) or "random" (the control).
        seed: seed of the random order.
        batch: images per forward pass (halved on out-of-memory).
        kind: "deletion" (replace the first pixels) or "insertion" (restore
            the first pixels into the replacement image).

    Returns:
        float32 [n, P]: p(target | ablated image); the first point of a deletion curve (and the
        last of an insertion curve) is p(target | image).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    n, (h, w), dev = inputs.shape[0], inputs.shape[-2:], inputs.device
    target = _targets(target, n, dev)
    maps = torch.as_tensor(maps if order == "map" else np.zeros((n, h, w))).to(dev)
    ranks = pixel_ranks(maps, order, seed).view(n, 1, h, w)
    counts = torch.from_numpy(np.rint(fractions(points) * h * w).astype(np.int64)).to(dev)
    base = replacement_image(inputs, replacement)

    def make(a: int, b: int) -> torch.Tensor:
        rows, cols = torch.arange(a, b, device=dev) // points, torch.arange(a, b, device=dev) % points
        first = ranks[rows] < counts[cols].view(-1, 1, 1, 1)
        if kind == "deletion":
            return torch.where(first, base[rows], inputs[rows])
        return torch.where(first, inputs[rows], base[rows])

    p = probabilities(model, make, target.repeat_interleave(points), n * points, batch).view(n, points)
    return p.numpy().astype(np.float32)


def mass_centres(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    """Centre of mass (row, column) of |map| for each map, [n, 2]; the image centre for an all-zero map."""
    m = maps.detach().cpu().double().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float64)
    m = np.abs(m.sum(1) if m.ndim == 4 else m)
    rows, cols = np.arange(m.shape[1], dtype=np.float64), np.arange(m.shape[2], dtype=np.float64)
    total = m.sum((1, 2))
    safe = np.where(total > 0, total, 1.0)
    centre = np.stack([(m.sum(2) * rows).sum(1) / safe, (m.sum(1) * cols).sum(1) / safe], 1)
    centre[total <= 0] = [(m.shape[1] - 1) / 2, (m.shape[2] - 1) / 2]
    return centre


def random_centres(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Box centres drawn uniformly over the image (the mass-centre control), [n, 2]."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, height - 1, n), rng.uniform(0, width - 1, n)], 1)


def box_masks(centres: np.ndarray, height: int, width: int, box: float = BOX_FRACTION) -> torch.Tensor:
    """Boolean [n, 1, H, W]: a box of side `box` x the image side around each centre.

    A box reaching past the border is moved inside, so every box covers the same area.
    """
    bh, bw = max(1, round(box * height)), max(1, round(box * width))
    masks = torch.zeros(len(centres), 1, height, width, dtype=torch.bool)
    for i, (cy, cx) in enumerate(np.asarray(centres, np.float64)):
        top = int(np.clip(round(cy - (bh - 1) / 2), 0, height - bh))
        left = int(np.clip(round(cx - (bw - 1) / 2), 0, width - bw))
        masks[i, :, top:top + bh, left:left + bw] = True
    return masks


def box_drop(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor | int, centres: np.ndarray,
             box: float = BOX_FRACTION, replacement: str = "mean", batch: int = 64) -> np.ndarray:
    """The probability fraction lost when a box around each centre is replaced.

    Args:
        model: the classifier, in eval mode.
        inputs: [n, 3, H, W] in the model's input space.
        target: the class of each image, [n] or one int.
        centres: [n, 2] box centres (row, column) in pixels.
        box: box side as a fraction of the image side.
        replacement: "mean" or "blur" (see `replacement_image`).
        batch: images per forward pass.

    Returns:
        float32 [n]: 1 - p(target | ablated) / p(target | image); negative
        where the ablation raised the probability.
    """
    n, dev = inputs.shape[0], inputs.device
    target = _targets(target, n, dev)
    masks = box_masks(centres, *inputs.shape[-2:], box=box).to(dev)
    ablated = torch.where(masks, replacement_image(inputs, replacement), inputs)
    p0 = probabilities(model, lambda a, b: inputs[a:b], target, n, batch)
    p = probabilities(model, lambda a, b: ablated[a:b], target, n, batch)
    return (1 - p / p0).numpy().astype(np.float32)


def mass_centre_drop(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor | int,
                     maps: torch.Tensor | np.ndarray, box: float = BOX_FRACTION,
                     replacement: str = "mean", batch: int = 64) -> np.ndarray:
    """`box_drop` with the box centred at the centre of mass of each |map|, float32 [n]."""
    return box_drop(model, inputs, target, mass_centres(maps), box, replacement, batch)
