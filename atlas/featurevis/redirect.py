"""Redirected ReLU: a gradient override that lets units which start dead get a signal.

At the start of an optimization many units are below zero everywhere, and a
ReLU passes no gradient back to them, so their image never changes (a grey
render). For the first steps, Lucid's recipe swaps the ReLU's gradient: where
the ordinary gradient is zero for the whole image, it passes the gradient
through wherever it would raise a negative input (and never where it would push
it lower). Once the unit is alive the ordinary gradient takes over.

It is applied to `nn.ReLU` and `nn.ReLU6` modules (ReLU6 gets the mirror rule
at its upper bound); a model that calls `F.relu` directly keeps its plain
gradient.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Iterator

import torch
from torch import nn

from atlas.fused import Fused


def _redirected_gradient(x: torch.Tensor, grad: torch.Tensor, upper: float) -> torch.Tensor:
    """The clamp's ordinary gradient for images it reaches; the redirected one for the others."""
    inside = (x > 0) & (x < upper)
    # per image: does any gradient get through? (reduced over the dimensions as they lie: flattening a
    # channels-last tensor would copy it)
    alive = (inside & (grad != 0)).any(dim=tuple(range(1, grad.dim())))
    # grad is d(loss)/d(output); the optimizer steps against it, so grad > 0 lowers x
    lowering_below = (x <= 0) & (grad > 0)
    raising_above = (x >= upper) & (grad < 0)
    dead = ~alive.view(-1, *([1] * (grad.dim() - 1)))
    # alive: the ordinary gradient (inside only); dead: the redirected one (which keeps inside too)
    return torch.where(inside | (dead & ~(lowering_below | raising_above)), grad, grad.new_zeros(()))


# one fused pass per clamp instead of about ten, and no wait for a device-to-host flag: on a CPU about
# twice the time of the plain clamp's backward, where eager mode takes thirty times
_GRADIENT = Fused(_redirected_gradient, "redirected gradient")


class _RedirectedClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.upper = upper
        return x.clamp(0, upper) if math.isfinite(upper) else x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _GRADIENT(x, grad, ctx.upper), None


def _redirected_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _RedirectedClamp.apply(x, 6.0 if isinstance(self, nn.ReLU6) else math.inf)


@contextlib.contextmanager
def redirected_relus(model: nn.Module, active: bool = True) -> Iterator[int]:
    """Within the block, every ReLU / ReLU6 module of `model` uses the redirected gradient.

    Yields the number of modules changed. Forward values are unchanged (and
    computed out of place, so in-place ReLUs are safe).
    """
    changed = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))] if active else []
    for m in changed:
        m.forward = types.MethodType(_redirected_forward, m)
    try:
        yield len(changed)
    finally:
        for m in changed:
            del m.forward  # back to the class's own forward
