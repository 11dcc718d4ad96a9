"""Baselines for path attribution methods.

The baselines of "Visualizing the Impact of Feature Attribution Baselines"
(Sturmfels, Lundberg and Lee, Distill 2020). Each is a function
`(x, space, gen) -> baseline` that takes normalized inputs [B, 3, H, W], the
model's `InputSpace` and a CPU `torch.Generator`, and returns a tensor shaped
like `x` in the same input space. Each encodes a different idea of a "missing"
pixel, which is why the article compares them:

- black: pixel 0 everywhere; what the IG paper suggests.
- max_distance: for each value, whichever of black / white is farther away,
  the valid image farthest from `x` in L1 distance.
- blurred: `x` under a strong Gaussian blur, which keeps colours and layout but
  removes the object detail the model keys on (the blur perturbation of Fong
  and Vedaldi 2017).
- uniform: every value uniform in the valid range, independently.
- gaussian: `x` plus Gaussian noise, clipped to the valid range.

The random baselines (uniform, gaussian) are drawn several times per image
and their attributions averaged; `RANDOM_BASELINES` names them. Their draws
come from the generator only, so they are reproducible and do not depend on
which other images share the batch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from atlas.attribution.base import InputSpace

Baseline = Callable[[torch.Tensor, InputSpace, torch.Generator], torch.Tensor]

# Blur of the "blurred" baseline: sigma in pixels for a 224 px image, scaled
# with the shorter side so the blur removes the same share of detail at every
# resolution (2.2 px at 50 px, 1.4 px at 32 px). 10 px at 224 is the strongest
# blur of Fong and Vedaldi's perturbations: object parts and texture are gone,
# the colour layout of the scene stays.
BLUR_SIGMA_PX = 10.0
BLUR_REFERENCE_SIZE = 224

# Standard deviation of the "gaussian" baseline's noise, a fraction of each
# channel's input range. The article leaves sigma as a parameter; 0.15 is
# SmoothGrad's default noise level, so the baseline stays near the image.
GAUSSIAN_SIGMA = 0.15


def black(x: torch.Tensor, space: InputSpace, gen: torch.Generator) -> torch.Tensor:
    """The black image: pixel 0 (`space.lo`) everywhere.

    Args:
        x: normalized inputs [B, 3, H, W].
        space: the model's input normalization.
        gen: unused; every baseline takes one.

    Returns:
        A tensor shaped like `x`.
    """
    return _like(space.lo(x), x)


def max_distance(x: torch.Tensor, space: InputSpace, gen: torch.Generator) -> torch.Tensor:
    """Per value, whichever of black and white is farther from `x`.

    This is the valid image that maximizes the L1 distance to `x`.

    Args:
        x: normalized inputs [B, 3, H, W].
        space: the model's input normalization.
        gen: unused; every baseline takes one.

    Returns:
        A tensor shaped like `x`.
    """
    lo, hi = space.lo(x), space.hi(x)
    return torch.where(x - lo >= hi - x, lo, hi)


def blurred(x: torch.Tensor, space: InputSpace, gen: torch.Generator) -> torch.Tensor:
    """`x` under a Gaussian blur of `blur_sigma(x)` pixels (reflect padding).

    Args:
        x: normalized inputs [B, 3, H, W].
        space: unused: blurring commutes with the per-channel normalization.
        gen: unused; every baseline takes one.

    Returns:
        A tensor shaped like `x`.
    """
    return gaussian_blur(x, blur_sigma(x))


def uniform(x: torch.Tensor, space: InputSpace, gen: torch.Generator) -> torch.Tensor:
    """Every value drawn uniformly from the channel's valid range [lo, hi].

    Args:
        x: normalized inputs [B, 3, H, W] (only shape, dtype, device are used).
        space: the model's input normalization.
        gen: CPU generator the values are drawn from.

    Returns:
        A tensor shaped like `x`.
    """
    u = torch.rand(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
    return _like(space.lo(x) + u * space.range(x), x)


def gaussian(x: torch.Tensor, space: InputSpace, gen: torch.Generator) -> torch.Tensor:
    """`x` plus noise N(0, (GAUSSIAN_SIGMA * range)^2), clipped to [lo, hi].

    Args:
        x: normalized inputs [B, 3, H, W].
        space: the model's input normalization.
        gen: CPU generator the noise is drawn from.

    Returns:
        A tensor shaped like `x`.
    """
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
    noisy = x + eps * (GAUSSIAN_SIGMA * space.range(x))
    return torch.maximum(torch.minimum(noisy, space.hi(x)), space.lo(x))


BASELINES: dict[str, Baseline] = {
    "black": black,
    "max_distance": max_distance,
    "blurred": blurred,
    "uniform": uniform,
    "gaussian": gaussian,
}

# Baselines that differ per draw: path methods average several of them.
RANDOM_BASELINES = {"uniform", "gaussian"}


def _like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`values` broadcast to a tensor laid out like `x` (channels-last inputs stay channels-last)."""
    return torch.empty_like(x).copy_(values.expand_as(x))


def blur_sigma(x: torch.Tensor) -> float:
    """The blurred baseline's sigma in pixels for images shaped like `x`."""
    return BLUR_SIGMA_PX * min(x.shape[-2:]) / BLUR_REFERENCE_SIZE


def gaussian_blur(x: torch.Tensor, sigma: float, padding: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur of each channel of `x` [B, C, H, W].

    The kernel reaches 3 sigma each side (with reflect padding at most to the
    image border, which reflection cannot reach past); it is renormalized to
    sum to 1, so a constant image is unchanged.

    Args:
        x: images [B, C, H, W].
        sigma: standard deviation in pixels; <= 0 returns a copy of `x`.
        padding: "reflect" or "replicate" (edges repeated).

    Returns:
        The blurred images, shaped like `x`.
    """
    if sigma <= 0:
        return x.clone()
    out = _blur_axis(x, sigma, -1, padding)
    return _blur_axis(out, sigma, -2, padding)


def _blur_axis(x: torch.Tensor, sigma: float, dim: int, padding: str) -> torch.Tensor:
    size = x.shape[dim]
    radius = math.ceil(3 * sigma) if padding == "replicate" else min(math.ceil(3 * sigma), size - 1)
    if radius < 1:
        return x.clone()
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.device, x.dtype)
    channels = x.shape[1]
    if dim == -1:
        padded = F.pad(x, (radius, radius, 0, 0), mode=padding)
        weight = kernel.view(1, 1, 1, -1)
    else:
        padded = F.pad(x, (0, 0, radius, radius), mode=padding)
        weight = kernel.view(1, 1, -1, 1)
    return F.conv2d(padded, weight.expand(channels, 1, *weight.shape[2:]), groups=channels)
