"""Batch normalization folded into the convolution before it, for the gradient passes.

In eval mode a BatchNorm is a fixed affine map per channel, so a convolution
whose output goes only into a BatchNorm can absorb it: its weight scaled by
gamma / sqrt(var + eps) per output channel, its bias (b - mean) * that scale +
beta. The folded model computes the same function (to float rounding) with one
pass over every feature map fewer forward and backward; on a CPU a BatchNorm
step costs about as much as the depthwise convolution before it, so a
feature-visualization step of EfficientNet-Lite0 runs about a third faster.

Folding is found on a torch.fx trace with convolutions and BatchNorms kept
whole, and applied to a copy of the model, so every module keeps its name:
the BatchNorm becomes an identity, or (timm's BatchNormAct2d) a module that
keeps only its dropout and activation. Hooks by name therefore see the same
tensors as before: the BatchNorm's output, its activation's input. A pair is
left alone where the convolution's output is used elsewhere too, where either
module is called more than once, where the convolution itself is a layer
being read (its output changes), or where the BatchNorm normalizes by batch
statistics. A model that cannot be traced is used as it is.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

log = logging.getLogger(__name__)

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_ConvNd, _BatchNorm)) or super().is_leaf_module(m, qualname)


class AfterFold(nn.Module):
    """What is left of a normalization-plus-activation module once its normalization is folded away."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def fold_batchnorm(model: nn.Module, keep: frozenset[str] = frozenset()) -> tuple[nn.Module, list[str]]:
    """A copy of `model` (eval mode) with every foldable BatchNorm folded into its convolution.

    Args:
        model: the model, in eval mode.
        keep: module names whose own outputs must stay as they are (layers being read).

    Returns:
        (the folded copy, the names of the folded BatchNorms); (`model` itself, []) where
        nothing folds or the model cannot be traced.
    """
    pairs = _pairs(model, keep)
    if not pairs:
        return model, []
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        _absorb(conv, bn)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(modules[parent] if parent else folded, leaf, _remainder(bn))
    return folded, [bn for _, bn in pairs]


def _pairs(model: nn.Module, keep: frozenset[str]) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names that can be folded."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # any failure to trace means: no folding, never a failed run
        log.debug("batch-norm folding: %s cannot be traced (%s); its passes keep their BatchNorms",
                  type(model).__name__, e)
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not _foldable_norm(bn) or calls[node.target] != 1 or len(node.args) != 1:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or src.target in keep:
            continue
        conv = modules[src.target]
        if (isinstance(conv, _ConvNd) and calls[src.target] == 1 and len(src.users) == 1
                and conv.out_channels == bn.num_features and not conv.transposed):
            pairs.append((src.target, node.target))
    return pairs


def _foldable_norm(m: nn.Module | None) -> bool:
    if not isinstance(m, _BatchNorm) or m.training or m.running_mean is None:
        return False
    return type(m) in _PLAIN or _is_norm_act(m)


def _is_norm_act(m: nn.Module) -> bool:
    """timm's BatchNormAct2d: normalization, then its `drop` and `act` submodules, nothing else."""
    return type(m).__name__ == "BatchNormAct2d" and isinstance(getattr(m, "drop", None), nn.Module) \
        and isinstance(getattr(m, "act", None), nn.Module)


def _remainder(bn: _BatchNorm) -> nn.Module:
    return AfterFold(bn.drop, bn.act) if _is_norm_act(bn) else nn.Identity()


@torch.no_grad()
def _absorb(conv: _ConvNd, bn: _BatchNorm) -> None:
    """Scales `conv`'s weight and sets its bias so that it computes bn(conv(x)).

    The arithmetic is float64 on the CPU (not every device has float64), the result in the weight's
    dtype, device and layout."""
    w = conv.weight

    def exact(t: torch.Tensor | None, default: float) -> torch.Tensor:
        return t.detach().cpu().double() if t is not None else torch.full((bn.num_features,), default).double()
    var, mean = exact(bn.running_var, 1.0), exact(bn.running_mean, 0.0)
    gamma, beta, bias = exact(bn.weight, 1.0), exact(bn.bias, 0.0), exact(conv.bias, 0.0)
    scale = gamma / torch.sqrt(var + bn.eps)
    layout = torch.channels_last if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) \
        and not w.is_contiguous() else torch.contiguous_format
    weight = (exact(w, 0.0) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.device, w.dtype)
    conv.weight = nn.Parameter(weight.contiguous(memory_format=layout), requires_grad=False)
    conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(w.device, w.dtype), requires_grad=False)
