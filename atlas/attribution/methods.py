"""The registry of attribution methods: a name -> a configured `Attribution`.

Every method the atlas computes is listed here with how its settings come from
the build config, so the stage, the benchmarks and the checks build methods
the same way.
"""

from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from atlas.attribution.base import Attribution, InputSpace
from atlas.attribution.gradients import Gradient, GradientXInput, GuidedBackprop, SmoothGrad
from atlas.errors import AtlasError

Factory = Callable[..., Attribution]


def _smooth(variant: str) -> Factory:
    return lambda model, space, batch, s: SmoothGrad(model, space, batch, samples=s["samples"],
                                                     noise=s["noise"], variant=variant, seed=s["seed"])


METHODS: dict[str, Factory] = {
    "gradient": lambda model, space, batch, s: Gradient(model, space, batch),
    "gradient_x_input": lambda model, space, batch, s: GradientXInput(model, space, batch),
    "smoothgrad": _smooth("mean"),
    "smoothgrad_sq": _smooth("squared"),
    "vargrad": _smooth("vargrad"),
    "guided_backprop": lambda model, space, batch, s: GuidedBackprop(model, space, batch),
}

# What a method's settings default to when a caller names none (the reference recipes).
DEFAULTS = {"samples": 50, "noise": 0.15, "seed": 0}


def get(name: str, model: nn.Module, space: InputSpace | None = None, batch: int = 64,
        **settings) -> Attribution:
    """The method called `name`, bound to `model`.

    Args:
        name: a key of METHODS.
        model: the classifier.
        space: its input normalization.
        batch: model evaluations per forward pass (halved on out-of-memory).
        settings: overrides of DEFAULTS (samples, noise, steps, ...).
    """
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=2)
        raise AtlasError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    return METHODS[name](model, space, batch, {**DEFAULTS, **settings})
