"""Occlusion: what the target logit loses when a patch of the image is taken away.

Like Extremal Perturbations (`atlas.attribution.extremal`), it reads the
model's outputs on altered images instead of gradients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atlas.attribution.base import Attribution, Explanation, InputSpace


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
