"""How a layer's output lays out its units, and the one view every stage takes of it: [B, C, H, W].

Convolutional maps are channels-first already; Swin's blocks (and the MLP in a
ConvNeXt block) hand on channels-last maps; vision transformers hand on token
sequences. `discover` (atlas/layers.py) follows every tensor through one forward
pass and `follow_layouts` records which layers are channels-last on the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INPUT_SUFFIX = ":in"  # a layer name that means a call's input (atlas.layers.INPUT)
NCHW, NHWC, TOKENS, VECTOR = "nchw", "nhwc", "tokens", "vector"  # the layouts of LayerInfo.layout


def as_bchw(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor | None:
    """Views an activation as [batch, channels, height, width]: what a layer's units are.

    This is the one place that decides it; every capture (feature visualization,
    dataset examples, statistics, attributions, circuits) goes through it.

    * [B, C, H, W]: C units over an H x W map, as it is.
    * [B, H, W, C] with `channels_last` (torchvision and timm Swin blocks, the
      MLP inside a ConvNeXt block): C units over the H x W map, permuted. Which
      4-D tensors are channels-last is decided by following the model's
      modules (`discover`, `is_channels_last`), never by guessing from shapes.
    * [B, N, C], a vision transformer's token sequence: C units over the patch
      grid. The leading extra = N - isqrt(N)^2 tokens (class, distillation and
      register tokens) are set aside and the h x w = isqrt(N)^2 patch tokens
      become [B, C, h, w] (row-major, as the patch embedding flattened them).
      A sequence with more extra tokens than a grid side is no grid: [B, C, N, 1].
    * [B, C], a feature vector: [B, C, 1, 1].

    Anything else is not a layer (None). The result is a view: gradients flow
    through it to the tensor the module returned.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    if t.dim() == 4:
        return t.permute(0, 3, 1, 2) if channels_last else t
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        side, extra = patch_grid(t.shape[1])
        if side == 0:
            return t.transpose(1, 2)[..., None]
        return t[:, extra:].transpose(1, 2).unflatten(2, (side, side))
    return None


def patch_grid(tokens: int) -> tuple[int, int]:
    """(grid side, extra leading tokens) of a token sequence; (0, 0) where it holds no square grid."""
    side = math.isqrt(tokens)
    extra = tokens - side * side
    return (side, extra) if side > 1 and extra <= side else (0, 0)


# A 4-D output of these is channels-last: they act on the last dimension (LayerNorm2d, which
# permutes internally, is channels-first: its name ends in 2d).
def _acts_on_last_dim(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.LayerNorm)
                                             and not type(module).__name__.endswith("2d"))


CHANNELS_LAST_CLASSES = ("SwinTransformerBlock", "SwinTransformerBlockV2", "PatchMerging", "PatchMergingV2",
                         "ShiftedWindowAttention", "ShiftedWindowAttentionV2", "SwinTransformerStage")
LAYOUTS = "atlas_channels_last"  # attribute `discover` leaves on a model: its channels-last layer names


def is_channels_last(model: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether layer `name` (a `module@call` name, or its `:in`) of `model` is a 4-D channels-last tensor.

    `discover` follows every tensor through one forward pass and records the
    answer on the model; a model never discovered is judged by the module's
    type alone: Linear and LayerNorm act on the last dimension, and the Swin
    classes of torchvision and timm hand on [B, H, W, C].
    """
    known = getattr(model, LAYOUTS, None)
    if known is not None:
        return name in known
    return not name.endswith(INPUT_SUFFIX) and (_acts_on_last_dim(module) or type(module).__name__ in CHANNELS_LAST_CLASSES)


def follow_layouts(model: nn.Module, ended: list[dict], input_suffix: str) -> None:
    """Gives each finished call its output's layout and bchw shape, and records the model's channels-last
    layer names (`LAYOUTS`, read by `is_channels_last`).

    A 4-D tensor is channels-first unless one of these makes it channels-last:
    a module acting on the last dimension (Linear, LayerNorm) produced it; a
    `Permute` moved the channels last; a container returns its child's output
    as it is (the child's layout); a module returned a tensor shaped like its
    input (the input's layout: activations, dropout, residual blocks).
    """
    layout_of: dict[tuple[int, int], str] = {}  # tensor key -> layout of the call that produced it
    last: set[str] = set()
    for r in ended:
        into = layout_of.get(r["in"], NCHW) if r["in"] is not None else NCHW
        raw = r["raw"]
        if raw is None or len(raw) != 4:
            r["layout"] = {3: TOKENS, 2: VECTOR}.get(len(raw) if raw else 0, NCHW)
        elif r["out"] in layout_of:
            r["layout"] = layout_of[r["out"]]
        elif type(r["obj"]).__name__ == "Permute" and len(getattr(r["obj"], "dims", ())) == 4:
            channel_axis = 3 if into == NHWC else 1
            r["layout"] = NHWC if list(r["obj"].dims).index(channel_axis) == 3 else NCHW
        elif _acts_on_last_dim(r["obj"]) or type(r["obj"]).__name__ in CHANNELS_LAST_CLASSES:
            r["layout"] = NHWC
        else:
            r["layout"] = into if r["in_shape"] == raw else NCHW
        if r["out"] is not None:
            layout_of[r["out"]] = r["layout"]
        if r["layout"] == NHWC:
            last.add(r["name"])
        if r["in"] is not None and r["in_shape"] is not None and len(r["in_shape"]) == 4 and into == NHWC:
            last.add(f"{r['name']}{input_suffix}")
        act = None if raw is None else as_bchw(torch.empty(raw, device="meta"), r["layout"] == NHWC)
        r["shape"] = None if act is None else act.shape
    setattr(model, LAYOUTS, frozenset(last))
