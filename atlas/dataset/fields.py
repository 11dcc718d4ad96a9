"""Receptive fields, measured: how much of the input drives a layer's position, and where its centre lies.

Both come from the gradient of one position with respect to a random input,
so they hold for any module graph, padding included (TensorFlow-style "same"
padding puts more of it after the image than before, which moves every
centre). The crop of a dataset example is the receptive field's side around
the centre of the position that ranked it.
"""

from __future__ import annotations

import torch
from torch import nn

from atlas.layers import Capture, LayerInfo

THRESHOLD = 1e-3  # of the gradient's peak: where the receptive field ends
PROBE_SCALES = (1, 2, 4)  # input sides, in multiples of the model's, tried until the field fits inside


def _gradient(model: nn.Module, layer: LayerInfo, side: int, device) -> tuple[torch.Tensor, tuple[int, int]]:
    """|d position / d input| summed over colour, [side, side], of the layer's middle position at this input side."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, side, side, generator=gen).to(device).requires_grad_(True)
    with torch.enable_grad(), Capture(model, [layer.name], stop=True) as cap:
        act = cap.run(x)[layer.name]
        middle = (act.shape[2] // 2, act.shape[3] // 2)
        act[0, :, middle[0], middle[1]].sum().backward()
    return x.grad.abs().sum(dim=(0, 1)), middle


def receptive_field(model: nn.Module, layer: LayerInfo, input_size: int,
                    device: torch.device | str = "cpu", threshold: float = THRESHOLD) -> int:
    """Side in input pixels of the region that drives a layer's centre position (at most the input side)."""
    if layer.height == 1 and layer.width == 1:
        return input_size
    g, _ = _gradient(model, layer, input_size, device)
    rows, cols = torch.nonzero(g > g.max() * threshold, as_tuple=True)
    if rows.numel() == 0:
        return input_size
    side = max(rows.max() - rows.min(), cols.max() - cols.min()).item() + 1
    return int(min(input_size, side))


def field_centres(model: nn.Module, layer: LayerInfo, input_size: int,
                  device: torch.device | str = "cpu", threshold: float = THRESHOLD) -> list[float]:
    """[offset_y, stride_y, offset_x, stride_x]: position (i, j)'s field is centred on
    (offset_y + stride_y * i, offset_x + stride_x * j), in input pixels (0 = the first pixel's left edge).

    The stride is the input side over the map's; the offset is measured on a
    larger input where the middle position's field lies wholly inside it (a
    field cut by the image's edge has a shifted middle); where none does, or
    the model takes only its own size, the map's cells are assumed centred
    ((i + 1/2) * stride).
    """
    sy, sx = input_size / layer.height, input_size / layer.width
    fallback = [sy / 2, sy, sx / 2, sx]
    if layer.height == 1 and layer.width == 1:
        return fallback
    for scale in PROBE_SCALES:
        side = input_size * scale
        try:
            g, (mi, mj) = _gradient(model, layer, side, device)
        except (RuntimeError, ValueError, AssertionError):  # a model that takes one input size only (ViT asserts)
            return fallback
        rows, cols = torch.nonzero(g > g.max() * threshold, as_tuple=True)
        if rows.numel() == 0:
            return fallback
        inside = rows.min() > 0 and cols.min() > 0 and rows.max() < side - 1 and cols.max() < side - 1
        if inside:
            cy = (rows.min() + rows.max()).item() / 2 + 0.5
            cx = (cols.min() + cols.max()).item() / 2 + 0.5
            return [cy - sy * mi, sy, cx - sx * mj, sx]
    return fallback
