"""MACO (Fel et al., NeurIPS 2023): feature visualization that optimizes only the Fourier phase.

The image's Fourier magnitude is fixed to the mean spectrum of natural photos
in Lucid's decorrelated colour space; only the phase is optimized (NAdam, lr
1.0). Each step the phase is standardized, the image made from it is
standardized, its colours are recorrelated and a sigmoid squashes it to
MACO's value range. Instead of Lucid's pad, jitter, scale and rotation the model sees
several random crops of the image each step (a quarter to 30 % of its side,
centred near its middle, resized to the model's view) with Gaussian and
uniform noise. The gradient's magnitude on the image, summed over the steps,
is the transparency map: where the optimization spent its effort, which the
site uses to fade the rest.

The constants are those of horama 0.3.0, the PyTorch MACO of the paper's
authors: six crops per step, crop sides drawn from 0.25-0.30 of the image
(horama's code draws rand * (b1 - b0) + b1 from its box_size (0.20, 0.25)),
centres N(0.5, 0.15), each crop cut by roi_align at twice the view's side and
resized by antialiased bicubic interpolation, noise 0.05 in the model's input
space, and the sigmoid spanning -2.5 to 2.5 in the normalized input
space, the model's own: with ImageNet's normalization pixels from about
-0.16 to 1.06, which the model sees as they are and the stored image clips
to [0, 1]. Horama downloads its magnitude
(ImageNet's); Atlas computes the same statistic from its embedded photos,
offline.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from atlas.featurevis.objectives import Objective
from atlas.featurevis.param import COLOR_SQRT, recorrelate
from atlas.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

LR = 1.0  # NAdam's learning rate on the phases
VALUE_RANGE = 2.5  # the sigmoid spans -/+ this in ImageNet's normalized input space (horama's values_range)
CANVAS_PER_VIEW = 1280 / 224  # horama's image side over the model's view side


@dataclass(frozen=True)
class Crops:
    count: int = 6  # crops the model sees per image and step
    box: tuple[float, float] = (0.25, 0.30)  # crop side, fraction of the image side
    spread: float = 0.15  # standard deviation of a crop's centre, fraction of the image side
    noise: float = 0.05  # Gaussian (std) and uniform (width) noise, in the model's input space

    def describe(self) -> str:
        return (f"{self.count} random crops of {self.box[0]:.2f}-{self.box[1]:.2f} of the side per step, centres "
                f"N(0.5, {self.spread}), noise {self.noise} (MACO's, as horama)")


def recorrelation() -> torch.Tensor:
    """Lucid's colour matrix (the square root of ImageNet's colour covariance), columns of norm <= 1."""
    return COLOR_SQRT / COLOR_SQRT.norm(dim=0).max()


@functools.lru_cache(maxsize=8)
def magnitude(size: int) -> torch.Tensor:
    """Mean |rfft2| of the embedded sample photos at size x size in the decorrelated colour space:
    [3, size, size//2+1]. Each photo's mean colour is removed first, so a render's mean is grey."""
    from atlas.dataset.images import decode, sample_images
    from atlas.models import Preprocess
    pre = Preprocess(size=size, crop_pct=1.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    photos = [p for p, _ in (decode(r.path, pre) for r in sample_images()) if p is not None]
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).double() / 255.0
    x = x - x.mean(dim=(2, 3), keepdim=True)
    decorrelated = torch.einsum("dc,bchw->bdhw", torch.linalg.inv(recorrelation().double()), x)
    return torch.fft.rfft2(decorrelated).abs().mean(0).float()


def init_phase(seeds: list[int], size: int) -> torch.Tensor:
    """Standard normal phases [B, 3, size, size//2+1], each image from its own seed (as horama)."""
    shape = (3, size, size // 2 + 1)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation per image (over colour and positions).

    Image by image: a whole tensor's mean and std are twice as fast on a CPU as the same over dimensions.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    mean = torch.stack([t.mean() for t in x]).view(shape)
    std = torch.stack([t.std() for t in x]).view(shape)
    return (x - mean) / (std + 1e-4)


def to_rgb(phase: torch.Tensor, mag: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Images [B, 3, S, S] from phases [B, 3, S, S//2+1] and the fixed magnitude, in MACO's value range
    for a model normalized by `mean` and `std`: pixels beyond [0, 1] (`pixel_range`), clipped where
    they are stored."""
    phase = _standardize(phase)
    spectrum = torch.complex(torch.cos(phase) * mag, torch.sin(phase) * mag)
    image = _standardize(torch.fft.irfft2(spectrum, s=(mag.shape[-2], mag.shape[-2])))
    image = recorrelate(image, recorrelation().to(image))
    low, high = (v.view(1, 3, 1, 1).to(image) for v in pixel_range(mean, std))
    return low + (high - low) * torch.sigmoid(image)


def pixel_range(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """MACO's value range, -2.5 to 2.5 in the model's normalized input space (horama's `values_range`,
    which horama feeds to the model as it is), as pixels: mean -/+ 2.5 std per colour. With ImageNet's
    normalization from about -0.16 to 1.06; a model normalized by 0.5 and 0.5 (EfficientNet-Lite, most
    ViTs) from -0.75 to 1.75, so the same contrast in what the model sees."""
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    return mean - VALUE_RANGE * std, mean + VALUE_RANGE * std


def crop_boxes(gens: list[torch.Generator], side: int, crops: Crops) -> torch.Tensor:
    """roi_align's boxes [B * count, 5] (image index, x0, y0, x1, y1 in pixels), crop-major:
    row j * B + i is crop j of image i. Each image draws from its own generator."""
    rows = []
    for i, gen in enumerate(gens):
        u = torch.randn(2, crops.count, generator=gen) * crops.spread + 0.5
        d = torch.rand(crops.count, generator=gen) * (crops.box[1] - crops.box[0]) + crops.box[0]
        rows.append(torch.stack([torch.full_like(d, i), u[0] - d / 2, u[1] - d / 2, u[0] + d / 2, u[1] + d / 2], 1))
    boxes = torch.stack(rows, 1).reshape(-1, 5)  # [count, B, 5] -> crop-major rows
    boxes[:, 1:] *= side
    return boxes


def band(side: int, crops: Crops) -> int:
    """The canvas band `cut` reads for any of these crops: the largest box's side plus its two edge pixels."""
    return min(side, math.ceil(crops.box[1] * side) + 2)


def centre_box(n: int, side: int, crops: Crops) -> torch.Tensor:
    """One box per image [n, 5]: the centre, at the crops' mean size."""
    d = side * sum(crops.box) / 2
    return torch.tensor([[i, (side - d) / 2, (side - d) / 2, (side + d) / 2, (side + d) / 2] for i in range(n)])


def cut(images: torch.Tensor, boxes: torch.Tensor, view: int, band: int | None = None) -> torch.Tensor:
    """The boxes of `images` [B, 3, S, S] resized to view x view: [len(boxes), 3, view, view].

    horama's crop: roi_align to twice the view's side, then antialiased bicubic resizing (corners aligned)
    to the view. Both are linear and separable, so each box is two small matrices, rows and columns, applied
    to the band of the canvas the box touches: the same numbers (to float rounding), without roi_align's
    single-threaded backward pass, which took a third of a MACO step on a CPU. `band` fixes the band's side
    (at least the widest box's plus 2 pixels), so that a crop is computed alike in any batch; by default
    it fits these boxes.
    """
    side, n = images.shape[-1], boxes.shape[0]
    b = boxes.float()
    rows, cols = _samples(b[:, 2], b[:, 4], side, 2 * view), _samples(b[:, 1], b[:, 3], side, 2 * view)
    lows, highs = zip(*(_extent(s, side) for s in (rows, cols)))
    needed = int((torch.stack(highs) - torch.stack(lows)).max().clamp_min(0)) + 1
    if band is not None and band < min(needed, side):
        raise ValueError(f"band: {band} px is narrower than the boxes' {needed}")
    width = min(side, band or needed)
    shrink = _shrink(2 * view, view).to(images)

    def matrix(samples: tuple[torch.Tensor, torch.Tensor, torch.Tensor], low: torch.Tensor):
        index, weight, _ = samples
        first = low.clamp(0, side - width)
        m = torch.zeros(n, 2 * view, width, dtype=weight.dtype)
        m.scatter_add_(2, (index - first.view(n, 1, 1, 1)).clamp(0, width - 1).flatten(2), weight.flatten(2))
        return shrink @ m.to(images), first[:, None] + torch.arange(width)
    ay, ys = matrix(rows, lows[0])
    ax, xs = matrix(cols, lows[1])
    # each image's crops are gathered from that image alone, so that the gradients its crops sum into it
    # add up in the same order in any batch; then plain batched products, which autograd computes alike
    owner = boxes[:, 0].long()
    order = torch.argsort(owner, stable=True)
    parts = [images[b][:, ys[rows, :, None], xs[rows, None, :]] for b, rows in
             zip(*_groups(owner[order], order))]
    patches = torch.cat(parts, 1).permute(1, 2, 0, 3)[torch.argsort(order)]
    rows_done = torch.bmm(ay, patches.reshape(n, width, 3 * width)).reshape(n, view * 3, width)
    return torch.bmm(rows_done, ax.transpose(1, 2)).reshape(n, view, 3, view).transpose(1, 2)


def _groups(sorted_owner: torch.Tensor, order: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """The images that own crops, and the rows of each one's crops, from the rows sorted by owner."""
    owners, counts = torch.unique_consecutive(sorted_owner, return_counts=True)
    return owners.tolist(), list(torch.split(order, counts.tolist()))


def _samples(start: torch.Tensor, end: torch.Tensor, side: int, out: int):
    """roi_align's bilinear samples along one axis (aligned=False, adaptive sampling ratio), in float32 as
    torchvision computes them: each output's neighbour indices [n, out, grid, 2], their weights (the bin's
    average folded in) and which samples fall on the image [n, out, grid]."""
    n = start.shape[0]
    length = (end - start).clamp_min(1.0)
    step = (length / out).view(n, 1, 1)
    grid = torch.ceil(length / out).clamp_min(1.0).view(n, 1, 1)
    i = torch.arange(int(grid.max()), dtype=start.dtype).view(1, 1, -1)
    pos = start.view(n, 1, 1) + torch.arange(out, dtype=start.dtype).view(1, out, 1) * step + (i + 0.5) * step / grid
    used = (i < grid) & (pos >= -1.0) & (pos <= side)
    pos = pos.clamp_min(0.0)
    low = pos.floor()
    edge = low >= side - 1
    low = torch.where(edge, torch.full_like(low, side - 1), low)
    frac = torch.where(edge, torch.zeros_like(pos), pos - low)
    high = torch.where(edge, low, low + 1)
    return torch.stack([low, high], -1).long(), torch.stack([1 - frac, frac], -1) * (used / grid)[..., None], used


def _extent(samples: tuple[torch.Tensor, torch.Tensor, torch.Tensor], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last canvas index each box's samples touch: [n], [n]."""
    index, _, used = samples
    used = used[..., None].expand_as(index)
    return torch.where(used, index, side).amin((1, 2, 3)), torch.where(used, index, -1).amax((1, 2, 3))


@functools.lru_cache(maxsize=8)
def _shrink(big: int, view: int) -> torch.Tensor:
    """Antialiased bicubic resizing (corners aligned) from `big` samples to `view` as a matrix [view, big]."""
    eye = torch.eye(big, dtype=torch.float64)[:, None, :, None].expand(-1, -1, -1, 2)  # width 1 is not resized alike
    return F.interpolate(eye, size=(view, 2), mode="bicubic", align_corners=True,
                         antialias=True)[:, 0, :, 0].T.float()


def noise(shape: torch.Size, gens: list[torch.Generator], crops: Crops) -> torch.Tensor:
    """Gaussian plus uniform noise for crop-major views [count * B, ...], image i from gens[i]."""
    b = len(gens)
    per_image = [torch.randn((crops.count, *shape[1:]), generator=g) * crops.noise
                 + (torch.rand((crops.count, *shape[1:]), generator=g) - 0.5) * crops.noise for g in gens]
    return torch.stack(per_image, 1).reshape(crops.count * b, *shape[1:])


def over_crops(objective: Objective, count: int) -> Objective:
    """`objective` of a batch of B images, evaluated on crop-major views [count * B] and averaged over crops."""
    def fn(acts: dict[str, torch.Tensor]) -> torch.Tensor:
        b = next(iter(acts.values())).shape[0] // count
        return torch.stack([objective({k: v[j * b:(j + 1) * b] for k, v in acts.items()})
                            for j in range(count)]).mean(0)
    return Objective(fn, f"{objective.name}, mean over {count} crops", objective.layers, objective.separable)
