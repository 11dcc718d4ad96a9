"""Taps: several layers' outputs made differentiable on their own within one forward pass.

Used by the building blocks (every selected layer's contribution to a logit)
and by the circuits (the previous layer's inputs to a unit).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from atlas.layers import as_bchw, is_channels_last, parse_layer_name


class Taps:
    """Makes the outputs of several layers differentiable in one forward pass.

    Inside the pass each layer's output becomes `output + zero`, `zero` a leaf, so
    the gradient reaching `zero` is that of the output as the layer produced it,
    even where a later in-place activation overwrites the tensor.

    Usage:
        with Taps(model, ["features.3", "features.6"]) as taps:
            logit = model(x)[...]
            contributions = taps.contributions(logit.sum())  # {layer: [B, C]}
    """

    def __init__(self, model: nn.Module, layers: list[str]):
        self.model, self.modules = model, dict(model.named_modules())
        self.layers = layers
        self.acts: dict[str, torch.Tensor] = {}
        self.zeros: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._stack = ExitStack()

    def __enter__(self) -> Taps:
        wanted: dict[str, dict[int, str]] = {}
        for name in self.layers:
            module, call = parse_layer_name(name)
            wanted.setdefault(module, {})[call] = name
        for module, calls in wanted.items():
            handle = self.modules[module].register_forward_hook(self._hook(module, calls))
            self._stack.callback(handle.remove)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _hook(self, module: str, calls: dict[int, str]):
        def hook(_module, _inputs, output):
            call = self._calls.get(module, 0)
            self._calls[module] = call + 1
            if call not in calls or not isinstance(output, torch.Tensor) or self.view(calls[call], output) is None:
                return None
            self.acts[calls[call]] = output.detach()
            self.zeros[calls[call]] = zero = torch.zeros_like(output, requires_grad=True)
            return output + zero
        return hook

    def contributions(self, score: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activation x gradient of `score` summed over positions, float32 [B, C] per layer (zeros where
        the score does not depend on the layer)."""
        names = [n for n in self.layers if n in self.zeros]
        grads = torch.autograd.grad(score, [self.zeros[n] for n in names], allow_unused=True)
        return {n: self.contribution(n, g) for n, g in zip(names, grads)}

    def contribution(self, name: str, grad: torch.Tensor | None) -> torch.Tensor:
        """Activation x gradient summed over positions, [B, C], from the gradient that reached the layer's
        `zero` (None, where the score does not depend on the layer: zeros)."""
        act = self.view(name, self.acts[name])
        if grad is None:
            return torch.zeros(act.shape[:2], device=act.device)
        return (act * self.view(name, grad)).sum((2, 3)).float()

    def view(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        """Layer `name`'s tensor as [B, C, H, W] (`layers.as_bchw`)."""
        return as_bchw(t, is_channels_last(self.model, name, self.modules[parse_layer_name(name)[0]]))
