"""Attribution methods behind one interface: `attribute(inputs, target) -> Tensor`.

`inputs` is a normalized batch [B, 3, H, W]; `target` holds one class index per
image. The result has the shape of `inputs`. Methods never change the model's
parameters or mode.
"""

from __future__ import annotations

import abc
import difflib

import torch
from torch import nn

from atlas.errors import AtlasError


class Attribution(abc.ABC):
    """Base class: checks arguments, then calls `_attribute`."""

    name = "base"
    params: dict = {}

    def __init__(self, model: nn.Module):
        self.model = model

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | int) -> torch.Tensor:
        """Attributes the target logit of each image to its input pixels.

        Args:
            inputs: float tensor [B, 3, H, W] in the model's input space.
            target: class index per image, [B], or one int for all.

        Returns:
            A tensor shaped like `inputs`.
        """
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
            raise ValueError(f"inputs: expected a float tensor [B, 3, H, W], got "
                             f"{getattr(inputs, 'shape', type(inputs).__name__)}")
        target = torch.as_tensor(target, device=inputs.device).long().reshape(-1).expand(inputs.shape[0])
        return self._attribute(inputs, target)

    @abc.abstractmethod
    def _attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The method itself, on checked arguments."""

    def _target_grad(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d logit[target] / d input for every image of the batch."""
        x = inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            picked = logits.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, x)
        return grad


class Gradient(Attribution):
    """The plain gradient of the target logit (Simonyan et al. 2014)."""

    name = "gradient"

    def _attribute(self, inputs, target):
        return self._target_grad(inputs, target)


class GradientXInput(Attribution):
    """Gradient times input (Shrikumar et al. 2016)."""

    name = "gradient_x_input"

    def _attribute(self, inputs, target):
        return self._target_grad(inputs, target) * inputs


METHODS: dict[str, type[Attribution]] = {m.name: m for m in (Gradient, GradientXInput)}


def get(name: str, model: nn.Module) -> Attribution:
    """The method called `name`, bound to `model`."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=2)
        raise AtlasError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    return METHODS[name](model)
