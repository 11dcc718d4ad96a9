"""Perturbation methods: occlusion, and extremal perturbations (Fong, Patrick, Vedaldi 2019).

Both measure what the target logit loses when parts of the image are taken
away, instead of reading gradients: occlusion slides a patch over the image,
extremal perturbation optimizes a smooth mask of fixed area that keeps the
logit as high as possible while the rest of the image is blurred.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from atlas.attribution.base import Attribution, Explanation, InputSpace
from atlas.attribution.baselines import gaussian_blur


class Occlusion(Attribution):
    """The drop of the target logit when a patch of the image is filled (Zeiler and Fergus 2014).

    Every input value gets the mean drop over the patches that cover it, on
    each colour channel alike, as Captum's `Occlusion` with a window spanning
    the three channels computes it. Patches start every `stride` pixels; the
    last patch of a row or column may stick out of the image and is cut there.

    Args:
        model: the classifier.
        space: its input normalization.
        batch: occluded images per forward pass.
        patch: side of the square patch; default the input side // 8.
        stride: step between patches; default patch // 2.
        fill: "zero" fills with 0 in input space (the normalization mean,
            Captum's default baseline), "black" with black pixels.
    """

    name = "occlusion"
    FILLS = ("zero", "black")

    def __init__(self, model: nn.Module, space: InputSpace | None = None, batch: int = 64,
                 patch: int | None = None, stride: int | None = None, fill: str = "zero"):
        super().__init__(model, space, batch)
        if fill not in self.FILLS:
            raise ValueError(f"fill: expected one of {', '.join(self.FILLS)}, got {fill!r}")
        if (patch is not None and patch < 1) or (stride is not None and stride < 1):
            raise ValueError(f"patch and stride must be positive, got {patch} and {stride}")
        self.patch, self.stride, self.fill = patch, stride, fill

    @property
    def params(self):
        return {**super().params, "patch": self.patch, "stride": self.stride, "fill": self.fill}

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The patches (top, bottom, left, right) for an input of this size, row by row."""
        patch = min(self.patch or max(1, min(height, width) // 8), height, width)
        stride = self.stride or max(1, patch // 2)
        rows, cols = _starts(height, patch, stride), _starts(width, patch, stride)
        return [(r, min(r + patch, height), c, min(c + patch, width)) for r in rows for c in cols]

    def _explain(self, inputs, target):
        windows = self.windows(*inputs.shape[-2:])
        drops = self.output(inputs, target)[:, None] - self._occluded_outputs(inputs, target, windows)
        total = torch.zeros_like(inputs[:, :1])
        count = torch.zeros_like(inputs[:1, :1])
        for k, (top, bottom, left, right) in enumerate(windows):
            total[..., top:bottom, left:right] += drops[:, k, None, None, None].to(total.dtype)
            count[..., top:bottom, left:right] += 1
        return Explanation((total / count).expand_as(inputs).contiguous())

    def _occluded_outputs(self, inputs: torch.Tensor, target: torch.Tensor,
                          windows: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """The target logit of every image with every patch filled: [B, len(windows)]."""
        fill = torch.zeros_like(inputs[:1]) if self.fill == "zero" else self.space.lo(inputs)
        fill = fill.expand(1, 3, *inputs.shape[-2:])[0]
        n = len(windows)

        def run(a: int, b: int) -> torch.Tensor:
            images = torch.arange(a, b, device=inputs.device) // n
            batch = inputs[images].clone()
            for row, k in enumerate(range(a, b)):
                top, bottom, left, right = windows[k % n]
                batch[row, :, top:bottom, left:right] = fill[:, top:bottom, left:right]
            return self.model(batch).gather(1, target[images, None])[:, 0].float()

        return torch.cat(self.chunked(run, inputs.shape[0] * n)).view(-1, n)


def _starts(length: int, patch: int, stride: int) -> list[int]:
    # Captum's count of shifts: enough that the last patch reaches the end.
    return [k * stride for k in range(math.ceil((length - patch) / stride) + 1)]


class ExtremalPerturbation(Attribution):
    """The smooth mask of fixed area that best preserves the target logit (Fong et al. 2019).

    The preservation game: the mask m keeps the image where it is 1 and blurs
    it where it is 0, x * m + blur(x) * (1 - m), and is optimized to keep the
    target logit high. Its area is held at `area` by the paper's ranking
    regularizer ||sort(vec(m)) - r_a||^2 (mean over pixels), r_a being
    (1 - area) zeros then ones, with a weight that grows geometrically from
    LAMBDA_FIRST to LAMBDA_LAST over the steps, so the logit shapes the mask
    first and the area is enforced at the end. The mask is a grid x grid
    parameter in [0, 1] (clamped after each step, starting at 0.5),
    upsampled bilinearly to the input, so it is smooth. Adam, not the paper's
    SGD with momentum: it converges in fewer steps and needs no tuning to the
    scale of a model's logits. Each image has its own mask, and Adam works
    element by element, so images optimized together do not interact; nothing
    is random, so maps are deterministic.

    Args:
        model: the classifier.
        space: its input normalization.
        batch: images optimized together (one forward pass per step for all).
        area: fraction of the image the mask keeps (paper: 0.1; also 0.025-0.2).
        steps: optimization steps (paper: 800).
        lr: Adam's learning rate on the mask parameters.
        sigma: standard deviation in pixels of the blur at a 224-pixel input
            (paper: 10), scaled to the input size.
        grid: mask parameters per side; default the input side // 8.
    """

    name = "extremal_perturbation"
    LAMBDA_FIRST = 1.0  # weight of the area regularizer at the first step
    LAMBDA_LAST = 300.0  # ... and at the last

    def __init__(self, model: nn.Module, space: InputSpace | None = None, batch: int = 64,
                 area: float = 0.1, steps: int = 800, lr: float = 0.1, sigma: float = 10.0,
                 grid: int | None = None):
        super().__init__(model, space, batch)
        if not 0 < area < 1:
            raise ValueError(f"area: expected a fraction of the image in (0, 1), got {area}")
        if steps < 1 or lr <= 0 or sigma < 0 or (grid is not None and grid < 1):
            raise ValueError(f"steps, lr and grid must be positive and sigma >= 0, "
                             f"got {steps}, {lr}, {grid} and {sigma}")
        self.area, self.steps, self.lr, self.sigma, self.grid = area, steps, lr, sigma, grid

    @property
    def params(self):
        return {**super().params, "area": self.area, "steps": self.steps, "lr": self.lr,
                "sigma_px_at_224": self.sigma, "grid": self.grid,
                "lambda": [self.LAMBDA_FIRST, self.LAMBDA_LAST]}

    def _explain(self, inputs, target):
        parts = self.chunked(lambda a, b: self._masks(inputs[a:b], target[a:b]), inputs.shape[0])
        masks, preserved = torch.cat([m for m, _ in parts]), torch.cat([p for _, p in parts])
        info = {"area": masks.mean(dim=(1, 2, 3)), "preserved": preserved}
        return Explanation(masks.expand_as(inputs) / 3, info)

    def _masks(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimized masks [b, 1, H, W] and the logit they preserve / the original [b]."""
        side = min(x.shape[-2:])
        blurred = gaussian_blur(x, self.sigma * side / 224, padding="replicate")
        grid = self.grid or max(2, side // 8)
        param = torch.full((x.shape[0], 1, grid, grid), 0.5, device=x.device, dtype=x.dtype)
        param.requires_grad_(True)
        optimizer = torch.optim.Adam([param], lr=self.lr)
        ref = self._reference(x.shape[-2] * x.shape[-1], x)
        for step in range(self.steps):
            weight = self._area_weight(step)
            with torch.enable_grad():
                mask = self._upsample(param, x)
                logit = self._logit(x * mask + blurred * (1 - mask), target)
                regul = (mask.flatten(1).sort(dim=1).values - ref).pow(2).mean(dim=1)
                # Gradient of the mask only: the model's parameters keep no .grad.
                param.grad = torch.autograd.grad(-(logit - weight * regul).sum(), param)[0]
            optimizer.step()
            param.data.clamp_(0, 1)
        mask = self._upsample(param.detach(), x)
        kept = self._logit(x * mask + blurred * (1 - mask), target) / self._logit(x, target)
        return mask, kept

    def _area_weight(self, step: int) -> float:
        """lambda at `step`: geometric from LAMBDA_FIRST at the first step to LAMBDA_LAST at the last."""
        return self.LAMBDA_FIRST * (self.LAMBDA_LAST / self.LAMBDA_FIRST) ** (step / max(1, self.steps - 1))

    def _reference(self, pixels: int, like: torch.Tensor) -> torch.Tensor:
        """r_a: the sorted mask of exactly `area` ones."""
        ref = torch.zeros(pixels, device=like.device, dtype=like.dtype)
        ref[pixels - round(self.area * pixels):] = 1
        return ref

    @staticmethod
    def _upsample(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(param, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def _logit(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(x).gather(1, target[:, None])[:, 0]
