"""Extremal Perturbations (Fong, Patrick and Vedaldi, ICCV 2019), with the paper's recipe.

The preservation game: among smooth masks of a given area, find the one that
keeps the target logit highest when the image is blurred wherever the mask is
off. The numbers are the paper's and those of torchray, its authors' library,
for a 224 px input:

* Smooth masks: one parameter every `step` = 7 px; a pixel's mask value is the
  smooth maximum (softmax-weighted, coldness 20) of the parameters of the 9 x 9
  grid points nearest its cell, each weighted by a bump of the distance d to
  the point, exp(-2 max(0, d / sigma - 1/2)^2) with sigma = 21 px; clamped to [0, 1].
* The perturbation is a blur pyramid: 8 levels from a Gaussian blur of 20 px
  (level 0) down to the image itself, the blur cut at 4 sigma with zero
  padding in input space. A mask value m reads level m * 7, interpolating
  linearly between the two nearest levels.
* The area is held by the ranking regularizer mean((sort(m) - r_a)^2), r_a
  being (1 - area) zeros then ones, with a weight that starts at 300 and
  grows by x1.0035 each step (4,900 by step 800): the logit shapes the mask
  first, the area is enforced more and more.
* SGD, learning rate 0.01, momentum 0.9 with dampening 0.9; parameters start
  at 1 and are clamped to [0, 1] after each step; 800 steps; on every other
  step the perturbed image is flipped left to right (the paper's jitter).

Where Atlas differs, on purpose: the area is counted over the image, where
torchray also counts the mask's margin outside it (mostly off, so torchray's
masks keep more of the image than their nominal area: about 0.15 of it for
0.1); `area_over="frame"` counts as torchray does, and then each step is
torchray's (the mask to the last bit at 224 px; torchray returns the mask made
before its last update). Step, sigma and blur scale with the input side / 224,
so other input sizes get the same mask geometry. Each image has its own mask
and SGD works element by element, so images optimized together do not
interact; nothing is random. The optimization is chaotic all the same: a
change of 1e-6 in the input changes which region wins on some photos
(docs/references.md), for torchray as for Atlas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from atlas.attribution.base import Attribution, Explanation, InputSpace

REFERENCE_SIDE = 224  # the input side the paper's pixel numbers are for


class SmoothMask:
    """The paper's smooth-max-of-bumps mask over an H x W image, from a coarse parameter grid.

    Args:
        height, width: the image's size.
        step: pixels between parameters.
        sigma: the bumps' size in pixels.
        coldness: the smooth maximum's inverse temperature (infinite: the plain max).
        margin: also compute the mask on torchray's frame around the image: round(sigma) px before
            it, and after it as far as torchray's padded grid reaches (15 px at 224 px).
    """

    def __init__(self, height: int, width: int, step: int = 7, sigma: float = 21.0, coldness: float = 20.0,
                 margin: bool = False, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.height, self.width, self.step, self.coldness = height, width, step, coldness
        self.grid = (math.ceil(height / step), math.ceil(width / step))
        self.radius = 1 + math.ceil(sigma / step)  # grid points each way that reach a pixel
        self.margin = round(sigma) if margin else 0
        reach = 1 + math.ceil(2 * sigma / step) - self.radius  # torchray's padding beyond the bumps' radius
        rows, cols = (self._axis(side, cells, reach) for side, cells in zip((height, width), self.grid))
        # cells beyond the grid (parameters fixed at zero) that the frame's pixels sit in
        self.before = [max(0, -int(a[0] // step)) for a in (rows, cols)]
        self.after = [max(0, int(a[-1] // step) - (g - 1)) for a, g in zip((rows, cols), self.grid)]
        # where the frame starts in the parameters' upsampled grid, and each pixel's cell as upsampling places it
        self.start = [b * step + int(a[0]) for a, b in zip((rows, cols), self.before)]
        cells = [b + g + a for b, g, a in zip(self.before, self.grid, self.after)]
        cell_rows, cell_cols = (self._cells(n)[o:o + len(a)] - b
                                for n, o, a, b in zip(cells, self.start, (rows, cols), self.before))
        near = torch.arange(-self.radius, self.radius + 1)
        # each pixel's offset from the grid points near it, rows [H', n] and columns [W', n]
        dy = (rows[:, None] - step * (cell_rows[:, None] + near)).float()
        dx = (cols[:, None] - step * (cell_cols[:, None] + near)).float()
        # in float32, operation for operation as torchray, so that the masks agree to the last bit
        d = torch.sqrt(dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2)  # [H', W', n, n]
        bump = torch.exp(-2 * ((d / sigma - 0.5).clamp(min=0) ** 2))
        self.weight = bump.flatten(2).permute(2, 0, 1).to(device, dtype).contiguous()  # [n * n, H', W']
        self.shape = (len(rows), len(cols))

    def _cells(self, count: int) -> torch.Tensor:
        """The cell of each of count * step upsampled positions, as nearest upsampling assigns them."""
        index = torch.arange(count, dtype=torch.float32).view(1, 1, count, 1)
        return F.interpolate(index, scale_factor=(self.step, 1), mode="nearest").view(-1).long()

    def _axis(self, side: int, cells: int, reach: int) -> torch.Tensor:
        """The pixel coordinates (the image's first pixel at 0) along one side of the frame."""
        if not self.margin:
            return torch.arange(side)
        return torch.arange(self.step * (cells + 2 * reach - 1) + 1) - self.margin

    def __call__(self, param: torch.Tensor) -> torch.Tensor:
        """Masks [B, 1, H', W'] in [0, 1] from parameters [B, 1, *self.grid]: the image, or its frame (`margin`)."""
        side = 2 * self.radius + 1
        param = F.pad(param, (self.before[1], self.after[1], self.before[0], self.after[0]))
        # every cell's side x side neighbouring parameters (zero beyond the grid), one value per pixel
        near = F.unfold(param, side, padding=self.radius).view(param.shape[0], side * side, *param.shape[-2:])
        near = F.interpolate(near, scale_factor=self.step, mode="nearest")
        (top, left), (h, w) = self.start, self.shape
        values = near[..., top:top + h, left:left + w] * self.weight
        if math.isinf(self.coldness):
            mask = values.amax(1, keepdim=True)
        else:
            mask = (values * torch.softmax(self.coldness * values, dim=1)).sum(1, keepdim=True)
        return mask.clamp(0, 1)

    def crop(self, frame: torch.Tensor) -> torch.Tensor:
        """The image's part of a mask from __call__."""
        m = self.margin
        return frame[..., m:m + self.height, m:m + self.width]


def blur_pyramid(x: torch.Tensor, levels: int, max_blur: float) -> torch.Tensor:
    """[B, L, C, H, W]: level l blurred by a Gaussian of max_blur * (1 - l / (L - 1)) px; the last is x."""
    out = []
    for level in range(levels):
        sigma = max_blur * (1 - level / (levels - 1))
        out.append(_zero_padded_blur(x, sigma) if sigma > 0 else x)
    return torch.stack(out, 1)


def _zero_padded_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur cut at 4 sigma, with zeros beyond the image."""
    reach = math.ceil(4 * sigma)
    t = torch.arange(-reach, reach + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.device, x.dtype)
    c = x.shape[1]
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, reach), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(reach, 0), groups=c)


def perturbed(pyramid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image where the mask is 1, its most blurred level where it is 0, levels between in between."""
    levels = pyramid.shape[1]
    w = mask * (levels - 1)  # [B, 1, H, W]
    low = w.detach().floor().long()
    frac = w - low
    index = low[:, None].expand(-1, 1, pyramid.shape[2], -1, -1)  # [B, 1, C, H, W]
    y0 = pyramid.gather(1, index)[:, 0]
    # at a mask of exactly 1 both ends are the image (no gradient toward blurring it), as in torchray
    y1 = pyramid.gather(1, (index + 1).clamp(max=levels - 1))[:, 0]
    return (1 - frac) * y0 + frac * y1


class ExtremalPerturbation(Attribution):
    """The smooth mask of fixed area that best preserves the target logit (Fong et al. 2019).

    The map is the mask (in [0, 1], on each colour channel a third of it, so a
    map summed over colour is the mask). Diagnostics per image: `area`, the
    mask's mean over the image, and `preserved`, the target logit of the image
    perturbed by the final mask over the logit of the image.

    Args:
        model: the classifier.
        space: its input normalization.
        batch: images optimized together (one forward pass per step for all);
            at most MEMORY_BATCH, the mask's intermediate tensors being large.
        area: fraction of the image the mask keeps (paper: 0.1; also 0.025-0.2).
        steps: optimization steps (paper: 800).
        area_over: what the area is a fraction of: "image" (Atlas's default, the area the caption
            states) or "frame", torchray's count over the mask's frame, its margin around the image
            included (the margin being mostly off, the mask keeps more of the image than `area`).
    """

    name = "extremal_perturbation"
    LR, MOMENTUM = 0.01, 0.9  # SGD, with dampening equal to the momentum
    LAMBDA, LAMBDA_GROWTH = 300.0, 1.0035  # the area regularizer's weight at the first step, and its growth per step
    STEP, SIGMA, MAX_BLUR, LEVELS, COLDNESS = 7, 21.0, 20.0, 8, 20.0  # at a 224 px input
    MEMORY_BATCH = 8
    AREA_OVER = ("image", "frame")

    def __init__(self, model: nn.Module, space: InputSpace | None = None, batch: int = 64,
                 area: float = 0.1, steps: int = 800, area_over: str = "image"):
        super().__init__(model, space, min(batch, self.MEMORY_BATCH))
        if not 0 < area < 1:
            raise ValueError(f"area: expected a fraction of the image in (0, 1), got {area}")
        if steps < 1:
            raise ValueError(f"steps: expected a positive number of optimizer steps, got {steps}")
        if area_over not in self.AREA_OVER:
            raise ValueError(f"area_over: expected one of {', '.join(self.AREA_OVER)}, got {area_over!r}")
        self.area, self.steps, self.area_over = area, steps, area_over

    @property
    def params(self):
        return {**super().params, "area": self.area, "steps": self.steps, "optimizer": "SGD", "lr": self.LR,
                "momentum": self.MOMENTUM, "lambda": self.LAMBDA, "lambda_growth": self.LAMBDA_GROWTH,
                "mask_step_px_at_224": self.STEP, "mask_sigma_px_at_224": self.SIGMA,
                "max_blur_px_at_224": self.MAX_BLUR, "levels": self.LEVELS, "coldness": self.COLDNESS,
                "jitter": "flip every other step", "area_over": self.area_over}

    def geometry(self, height: int, width: int) -> tuple[int, float, float]:
        """(step, sigma, max_blur) in pixels for an input of this size."""
        scale = min(height, width) / REFERENCE_SIDE
        return max(1, round(self.STEP * scale)), self.SIGMA * scale, self.MAX_BLUR * scale

    def _explain(self, inputs, target):
        parts = self.chunked(lambda a, b: self._masks(inputs[a:b], target[a:b]), inputs.shape[0])
        masks, preserved = torch.cat([m for m, _ in parts]), torch.cat([p for _, p in parts])
        info = {"area": masks.mean(dim=(1, 2, 3)), "preserved": preserved}
        return Explanation(masks.expand_as(inputs) / 3, info)

    def _masks(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimized masks [b, 1, H, W] and the logit they preserve / the original [b]."""
        h, w = x.shape[-2:]
        step, sigma, max_blur = self.geometry(h, w)
        smooth = SmoothMask(h, w, step, sigma, self.COLDNESS, self.area_over == "frame", x.device, x.dtype)
        pyramid = blur_pyramid(x, self.LEVELS, max_blur)
        param = torch.ones((x.shape[0], 1, *smooth.grid), device=x.device, dtype=x.dtype, requires_grad=True)
        optimizer = torch.optim.SGD([param], lr=self.LR, momentum=self.MOMENTUM, dampening=self.MOMENTUM)
        ref = self._reference(smooth.weight[0].numel(), x)
        weight = self.LAMBDA
        for step_index in range(self.steps):
            with torch.enable_grad():
                frame = smooth(param)  # the image, or with "frame" the margin around it too
                mask = smooth.crop(frame)
                image = perturbed(pyramid, mask)
                if step_index % 2 == 0:
                    image = image.flip(-1)
                logit = self._logit(image, target)
                regul = (frame.flatten(1).sort(dim=1).values - ref).pow(2).mean(dim=1)
                # Gradient of the mask only: the model's parameters keep no .grad.
                param.grad = torch.autograd.grad(-(logit - weight * regul).sum(), param)[0]
            optimizer.step()
            param.data.clamp_(0, 1)
            weight *= self.LAMBDA_GROWTH
        mask = smooth.crop(smooth(param.detach()))
        kept = self._logit(perturbed(pyramid, mask), target) / self._logit(x, target)
        return mask, kept

    def _reference(self, pixels: int, like: torch.Tensor) -> torch.Tensor:
        """r_a: the sorted mask of `area` ones (the paper's count: all but int((1 - area) * pixels))."""
        ref = torch.ones(pixels, device=like.device, dtype=like.dtype)
        ref[:int(pixels * (1 - self.area))] = 0
        return ref

    def _logit(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(x).gather(1, target[:, None])[:, 0]
