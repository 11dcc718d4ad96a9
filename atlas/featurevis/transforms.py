"""Transformation robustness: random pad, jitter, scale and rotation, per image.

All of Lucid's transforms (pad 12 with grey, jitter 8, scale, rotate, jitter 4)
compose into one affine map, applied to the whole batch with one grid_sample.
Each image draws its parameters from its own generator, so an image's
trajectory does not depend on which other images share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Robustness:
    pad: int = 12  # border of grey that jitter and rotation may reveal (pixels)
    jitter: tuple[int, ...] = (8, 4)  # translations before and after scale/rotation (pixels)
    scales: tuple[float, ...] = tuple(1 + (i - 5) / 50 for i in range(11))
    max_degrees: float = 10.0

    def describe(self) -> str:
        return (f"pad {self.pad} (grey), jitter {self.jitter[0]}, scale {min(self.scales):.2f}-"
                f"{max(self.scales):.2f}, rotate +-{self.max_degrees:g} deg, jitter {self.jitter[-1]}")


def _draw(gen: torch.Generator, r: Robustness) -> tuple[float, float, float, float]:
    """Draws (dx, dy, scale, degrees); the jitters add up to one translation."""
    u = torch.rand(4 + 2 * len(r.jitter), generator=gen).tolist()
    scale = r.scales[min(int(u[0] * len(r.scales)), len(r.scales) - 1)]
    angle = round((u[1] * 2 - 1) * r.max_degrees)
    dx = sum(round((u[2 + 2 * i] * 2 - 1) * j) for i, j in enumerate(r.jitter))
    dy = sum(round((u[3 + 2 * i] * 2 - 1) * j) for i, j in enumerate(r.jitter))
    return dx, dy, scale, angle


def random_affine(images: torch.Tensor, gens: list[torch.Generator], r: Robustness) -> torch.Tensor:
    """Applies one random robustness transform per image; outside pixels are grey (0.5)."""
    b, _, h, w = images.shape
    theta = torch.zeros(b, 2, 3)
    for i, gen in enumerate(gens):
        dx, dy, scale, angle = _draw(gen, r)
        a = math.radians(angle)
        cos, sin = math.cos(a) / scale, math.sin(a) / scale
        theta[i] = torch.tensor([[cos, -sin, 2 * dx / w], [sin, cos, 2 * dy / h]])
    # the pad limits how far the view may move: clamp translations to it
    theta[:, :, 2].clamp_(-2 * r.pad / w, 2 * r.pad / w)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images - 0.5, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + 0.5
