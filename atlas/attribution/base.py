"""The one interface every attribution method implements, and what they share.

`attribute(inputs, target)` returns a tensor shaped like `inputs`: how much
each input value drove the model's output for `target`. `explain` returns the
same map with per-image diagnostics (a path method's completeness error, the
steps it needed). Inputs are normalized batches [B, 3, H, W] in the model's
input space; `InputSpace` knows which values are black and white there, so
baselines and noise are defined in pixels, the way their papers define them.

Methods never change the model's parameters or mode, and they evaluate the
model in chunks that halve on out-of-memory (`Attribution.chunked`), so a
method's many samples of one image go through in as few passes as memory
allows.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
from torch import nn

from atlas.devices import chunked
from atlas.store.schema import METHODS

T = TypeVar("T")


@dataclass(frozen=True)
class InputSpace:
    """The model's input normalization: pixel p in [0, 1] is fed as (p - mean) / std."""

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def of(cls, preprocess) -> InputSpace:
        """The space of a `models.Preprocess` (or anything with mean and std)."""
        return cls(tuple(preprocess.mean), tuple(preprocess.std))

    def lo(self, like: torch.Tensor) -> torch.Tensor:
        """Black: the lowest input value of each channel, shaped [1, 3, 1, 1]."""
        return self.from_pixels(torch.zeros(1, 3, 1, 1, dtype=like.dtype, device=like.device))

    def hi(self, like: torch.Tensor) -> torch.Tensor:
        """White: the highest input value of each channel, shaped [1, 3, 1, 1]."""
        return self.from_pixels(torch.ones(1, 3, 1, 1, dtype=like.dtype, device=like.device))

    def from_pixels(self, p: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> model inputs."""
        mean = p.new_tensor(self.mean).view(1, 3, 1, 1)
        std = p.new_tensor(self.std).view(1, 3, 1, 1)
        return (p - mean) / std

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs -> pixels (in [0, 1] for inputs that came from an image)."""
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return x * std + mean

    def range(self, like: torch.Tensor) -> torch.Tensor:
        """hi - lo per channel, [1, 3, 1, 1]: the 'input range' noise levels are fractions of."""
        return self.hi(like) - self.lo(like)


def layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last if `x` is laid out that way (and not also plainly contiguous), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@dataclass
class Explanation:
    """An attribution map and per-image diagnostics.

    Attributes:
        maps: shaped like the inputs.
        info: per-image tensors [B], e.g. `completeness` (relative error of a
            path method), `steps` (path steps used), `delta` (f(x) - f(x')).
    """

    maps: torch.Tensor
    info: dict[str, torch.Tensor] = field(default_factory=dict)


class Attribution(abc.ABC):
    """Base class: checks arguments, then calls `_explain` (or `_attribute`).

    Args:
        model: the classifier, in eval mode; it is not modified.
        space: the model's input normalization (default: inputs are pixels).
        batch: the most model evaluations per forward pass (samples of one or
            several images together); halved automatically on out-of-memory.
    """

    name = "base"  # the method's key: its properties (family, signed, path method) are schema.METHODS[name]
    needs_layer = False  # Grad-CAM and unit attributions work on a layer
    precision = "float32"  # of the model's passes: config.PRECISIONS ("bfloat16" autocasts; noise-averaging methods)

    def __init__(self, model: nn.Module, space: InputSpace | None = None, batch: int = 64):
        if batch < 1:
            raise ValueError(f"batch: expected a positive number of samples per pass, got {batch}")
        if type(self)._explain is Attribution._explain and not hasattr(self, "_attribute"):
            raise TypeError(f"{type(self).__name__}: an attribution method defines _explain (map and "
                            "diagnostics) or _attribute (the map alone)")
        self.model = model
        self.space = space or InputSpace()
        self.batch = batch

    @property
    def signed(self) -> bool:
        """Whether the maps carry a sign (evidence for and against); False: non-negative maps."""
        return METHODS[self.name].signed if self.name in METHODS else True

    @property
    def magnitude(self) -> bool:
        """Whether only the map's magnitude is evidence (deletion and insertion rank by |map|)."""
        return METHODS[self.name].magnitude if self.name in METHODS else False

    @property
    def params(self) -> dict:
        """The settings that decide the maps, recorded with them in the store."""
        return {"method": self.name, "signed": self.signed}

    # --- the interface ---
    def attribute(self, inputs: torch.Tensor, target: torch.Tensor | int) -> torch.Tensor:
        """Attributes the target logit of each image to its input values.

        Args:
            inputs: float tensor [B, 3, H, W] in the model's input space.
            target: class index per image, [B], or one int for all.

        Returns:
            A tensor shaped like `inputs`.
        """
        return self.explain(inputs, target).maps

    def explain(self, inputs: torch.Tensor, target: torch.Tensor | int) -> Explanation:
        """`attribute` with per-image diagnostics (see `Explanation`)."""
        inputs, target = self.prepare(inputs, target)
        with torch.no_grad():
            explained = self._explain(inputs, target)
        explained.maps = explained.maps.detach()
        return explained

    def prepare(self, inputs: torch.Tensor, target: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Checks the arguments; returns detached channels-last inputs and one target per image."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
            raise ValueError(f"inputs: expected a float tensor [B, 3, H, W], got "
                             f"{getattr(inputs, 'shape', type(inputs).__name__)}")
        target = torch.as_tensor(target, device=inputs.device).long().reshape(-1)
        if target.numel() not in (1, inputs.shape[0]):
            raise ValueError(f"target: expected one class or one per image ({inputs.shape[0]}), "
                             f"got {target.numel()}")
        # channels-last: convolutions' backward passes run several times faster in it on CPUs,
        # and every row built from the inputs (path points, noisy copies) inherits it
        return inputs.detach().contiguous(memory_format=torch.channels_last), target.expand(inputs.shape[0])

    def _explain(self, inputs: torch.Tensor, target: torch.Tensor) -> Explanation:
        """The method on checked inputs: by default `_attribute`'s map without diagnostics."""
        return Explanation(self._attribute(inputs, target))

    # --- what methods share ---
    def output(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The target logit of each row of `x` (chunked, no gradient): [B]."""
        def run(a: int, b: int) -> torch.Tensor:
            return self.logits(x[a:b]).gather(1, target[a:b, None])[:, 0].float()
        return torch.cat(self.chunked(run, x.shape[0]))

    def grad(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d logit[target] / d input for every row of `x`, chunked."""
        return torch.cat(self.chunked(lambda a, b: self._grad(x[a:b], target[a:b])[0], x.shape[0]))

    def grad_and_output(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient, target logit) for every row of `x`, from the same passes."""
        parts = self.chunked(lambda a, b: self._grad(x[a:b], target[a:b]), x.shape[0])
        return torch.cat([g for g, _ in parts]), torch.cat([o for _, o in parts])

    def _grad(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            picked = self.logits(x).gather(1, target[:, None])[:, 0]
            (g,) = torch.autograd.grad(picked.sum(), x)
        return g, picked.detach().float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for `x`, computed in the method's `precision`, in x's dtype."""
        if self.precision == "float32":
            return self.model(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).to(x.dtype)

    def chunked(self, fn: Callable[[int, int], T], total: int, batch: int | None = None) -> list[T]:
        """Calls `fn(a, b)` over [0, total) in chunks of at most `batch` rows (see `chunked`).

        The size that fits is kept for later calls.
        """
        start = min(batch or self.batch, self.batch)
        out, size = chunked(fn, total, start)
        if size < start:
            self.batch = size
        return out

