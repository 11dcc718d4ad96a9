"""Transformation robustness: Lucid's pad, jitter, scale, rotate, jitter, per image.

Lucid's chain, for an image of side S: pad 12 px of grey (S + 24), a random
crop 8 px smaller (a shift of 0..8 px), a random scale from a list, a random
rotation from a list of whole degrees, and a random crop 4 px smaller. Every
step is an affine map of the image plane, so the chain composes into one map
and one `grid_sample` per batch, and the grey pad reaches the model as it does
in Lucid.

One difference is deliberate. Lucid draws one scale for the whole batch, so
its frame (the tensor the model sees) changes size with the scale. Here each
image draws its own transform from its own generator, so that an image's
trajectory does not depend on which other images share its batch; the frame
therefore keeps the side it has at scale 1, S + 2 * pad - sum(jitter) (140 px
for 128 px images), and the scale zooms the content inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Lucid's rotation list: every whole degree in -10..10, with 0 five more times
LUCID_ANGLES = tuple(range(-10, 11)) + (0,) * 5


@dataclass(frozen=True)
class Robustness:
    pad: int = 12  # border of grey around the image (pixels)
    jitter: tuple[int, ...] = (8, 4)  # random crops this much smaller, before and after scale/rotate (pixels)
    scales: tuple[float, ...] = tuple(1 + (i - 5) / 50 for i in range(11))
    angles: tuple[int, ...] = LUCID_ANGLES  # degrees, drawn uniformly from the list

    def describe(self) -> str:
        return (f"pad {self.pad} (grey), jitter {self.jitter[0]}, scale {min(self.scales):.2f}-"
                f"{max(self.scales):.2f}, rotate {min(self.angles)}..{max(self.angles)} deg "
                f"(0 {self.angles.count(0)}x in {len(self.angles)}), jitter {self.jitter[-1]} (Lucid's)")

    def scaled(self, factor: float) -> Robustness:
        """The same transforms for an image `factor` times the side Lucid's pixel numbers are for (128 px)."""
        return Robustness(pad=round(self.pad * factor), jitter=tuple(max(1, round(j * factor)) for j in self.jitter),
                          scales=self.scales, angles=self.angles)

    def frame(self, size: int) -> int:
        """The side of the transformed view of a size x size image."""
        return size + 2 * self.pad - sum(self.jitter)


def draw(gen: torch.Generator, r: Robustness) -> tuple[list[tuple[int, int]], float, int]:
    """One image's draw: each crop's (x, y) offset in 0..jitter, the scale and the angle."""
    u = torch.rand(2 + 2 * len(r.jitter), generator=gen).tolist()

    def pick(x: float, n: int) -> int:
        return min(int(x * n), n - 1)
    offsets = [(pick(u[2 + 2 * i], j + 1), pick(u[3 + 2 * i], j + 1)) for i, j in enumerate(r.jitter)]
    return offsets, r.scales[pick(u[0], len(r.scales))], r.angles[pick(u[1], len(r.angles))]


def view_to_image(offsets: list[tuple[int, int]], scale: float, angle: int, r: Robustness) -> torch.Tensor:
    """The affine map [2, 3] from a view pixel to an image pixel, both centred on their frame's middle.

    Read from the view back to the image: undo the last crop's shift, the
    rotation (positive angles turn the picture counter-clockwise, as torchvision's
    and kornia's `rotate` do) and the scale, then the first crops' shifts (a crop at offset o of
    a frame j px larger moves the centre by o - j / 2).
    """
    (x1, y1), *rest = offsets
    j1, *later = r.jitter
    a = math.radians(angle)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64) / scale
    late = torch.tensor([sum(x - j / 2 for (x, _), j in zip(rest, later)),
                         sum(y - j / 2 for (_, y), j in zip(rest, later))], dtype=torch.float64)
    early = torch.tensor([x1 - j1 / 2, y1 - j1 / 2], dtype=torch.float64)
    return torch.cat([rot, (rot @ late + early)[:, None]], 1)


def random_affine(images: torch.Tensor, gens: list[torch.Generator], r: Robustness) -> torch.Tensor:
    """One random robustness transform per image: [B, 3, S, S] -> [B, 3, F, F], F = r.frame(S); grey outside."""
    b, c, h, w = images.shape
    side = r.frame(w)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    # grid_sample's coordinates run over [-1, 1] of each frame (align_corners=False): pixels to halves of a side
    to_image = torch.diag(torch.tensor([2 / w, 2 / h], dtype=torch.float64))
    for i, gen in enumerate(gens):
        m = view_to_image(*draw(gen, r), r)
        theta[i, :, :2] = to_image @ m[:, :2] * (side / 2)
        theta[i, :, 2] = to_image @ m[:, 2]
    grid = F.affine_grid(theta.to(images), [b, c, side, side], align_corners=False)
    return F.grid_sample(images - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
