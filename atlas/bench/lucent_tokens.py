"""Lucent on token layers: its hooks see each layer as Atlas does, [B, C, H, W].

Lucent's objectives index dimension 1 of a hooked module's output
(`channel(layer, n)` is `T(layer)[:, n].mean()`). For a vision transformer's
token sequence [B, N, C] that is token n, not channel n, and for a Swin
block's channels-last [B, H, W, C] it is a row. Within `grid_views(model)`,
Lucent's module hooks keep the view `layers.as_bchw` gives instead (the
patch grid, class tokens set aside; channels-last maps permuted), so
`"encoder_layers_encoder_layer_11:7"` means channel 7 over the patch grid in
both tools and the benchmark compares the same objective. The network itself
runs unchanged: only what Lucent stores is a view.

Usage, around the documented call:

    with grid_views(model):
        images = render.render_vis(model, "encoder_layers_encoder_layer_11:7", ...)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from atlas.layers import as_bchw, is_channels_last


@contextmanager
def grid_views(model: nn.Module) -> Iterator[None]:
    """Within it, Lucent's `ModuleHook`s created for `model` store Atlas's [B, C, H, W] view of every
    token sequence and channels-last map (other outputs as they are).

    `model` is the module Lucent renders (the same object, not a copy of it).
    """
    from lucent.optvis import render

    names = {id(m): n for n, m in model.named_modules()}
    original = render.ModuleHook.hook_fn

    def hook_fn(hook, module, inputs, output):
        original(hook, module, inputs, _view(model, names.get(id(module)), module, output))

    render.ModuleHook.hook_fn = hook_fn
    try:
        yield
    finally:
        render.ModuleHook.hook_fn = original


def _view(model: nn.Module, name: str | None, module: nn.Module, output):
    if name is None or not isinstance(output, torch.Tensor) or output.dim() not in (3, 4):
        return output
    view = as_bchw(output, is_channels_last(model, name, module))
    return output if view is None else view
