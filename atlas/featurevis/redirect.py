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
    ordinary = grad * ((x > 0) & (x < upper))
    alive = ordinary.flatten(1).abs().amax(1) > 0  # per image: does any gradient get through?
    # grad is d(loss)/d(output); the optimizer steps against it, so grad > 0 lowers x
    lowering_below = (x <= 0) & (grad > 0)
    raising_above = (x >= upper) & (grad < 0)
    redirected = grad.masked_fill(lowering_below | raising_above, 0)
    return torch.where(alive.view(-1, *([1] * (grad.dim() - 1))), ordinary, redirected)


# one fused pass per clamp instead of about ten: 3-5x faster, and no wait for a device-to-host flag
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
