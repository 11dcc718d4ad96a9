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
from atlas.attribution.cam import GradCAM, GuidedGradCAM
from atlas.attribution.gradients import Gradient, GradientXInput, GuidedBackprop, SmoothGrad
from atlas.attribution.paths import ExpectedGradients, IntegratedGradients
from atlas.attribution.extremal import ExtremalPerturbation
from atlas.attribution.lrp import LRP
from atlas.attribution.perturbation import Occlusion
from atlas.attribution.rollout import AttentionRollout
from atlas.config import Config
from atlas.errors import AtlasError
from atlas.store.schema import ALL_METHODS

Factory = Callable[[nn.Module, InputSpace, int, dict], Attribution]


def _smooth(variant: str) -> Factory:
    return lambda model, space, batch, s: SmoothGrad(model, space, batch, samples=s["samples"],
                                                     noise=s["noise"], variant=variant, seed=s["seed"],
                                                     adaptive=s["smoothgrad_adaptive"],
                                                     precision=s["smoothgrad_precision"])


def _ig(baseline: str) -> Factory:
    return lambda model, space, batch, s: IntegratedGradients(
        model, space, batch, steps=s["steps"], baseline=baseline, draws=s["draws"],
        tolerance=s["tolerance"], max_steps=s["max_steps"], seed=s["seed"], rule=s["ig_rule"])


def _occlusion(model, space, batch, s) -> Occlusion:
    size = s["input_size"]
    patch = max(1, size // 8) if size else None  # Occlusion's own default when the size is unknown
    stride = max(1, round(patch * s["occlusion_stride"])) if patch else None
    return Occlusion(model, space, batch, patch=patch, stride=stride)


METHODS: dict[str, Factory] = {
    "gradient": lambda model, space, batch, s: Gradient(model, space, batch),
    "gradient_x_input": lambda model, space, batch, s: GradientXInput(model, space, batch),
    "smoothgrad": _smooth("mean"),
    "smoothgrad_sq": _smooth("squared"),
    "vargrad": _smooth("vargrad"),
    "guided_backprop": lambda model, space, batch, s: GuidedBackprop(model, space, batch),
    "grad_cam": lambda model, space, batch, s: GradCAM(model, space, batch, layer=s["layer"],
                                                       input_size=s["input_size"]),
    "guided_grad_cam": lambda model, space, batch, s: GuidedGradCAM(model, space, batch, layer=s["layer"],
                                                                    input_size=s["input_size"]),
    "attention_rollout": lambda model, space, batch, s: AttentionRollout(model, space, batch),
    "integrated_gradients": _ig("black"),
    "ig_max_distance": _ig("max_distance"),
    "ig_blurred": _ig("blurred"),
    "ig_uniform": _ig("uniform"),
    "ig_gaussian": _ig("gaussian"),
    "expected_gradients": lambda model, space, batch, s: ExpectedGradients(
        model, space, batch, samples=s["samples"], seed=s["seed"], tolerance=s["tolerance"],
        max_samples=min(s["max_steps"], 2 * s["samples"])),  # its error shrinks slowly: cap the cost
    "lrp_epsilon_plus_flat": lambda model, space, batch, s: LRP(model, space, batch, "epsilon_plus_flat"),
    "lrp_epsilon_gamma_box": lambda model, space, batch, s: LRP(model, space, batch, "epsilon_gamma_box"),
    "occlusion": lambda model, space, batch, s: _occlusion(model, space, batch, s),
    "extremal_perturbation": lambda model, space, batch, s: ExtremalPerturbation(
        model, space, batch, steps=s["extremal_steps"]),
}

assert tuple(METHODS) == ALL_METHODS, "every method of the schema needs a factory, in the schema's order"


def settings(config: Config) -> dict:
    """A build config's attribution settings, by the names the factories read."""
    return {"samples": config.attr_samples, "noise": config.attr_noise, "steps": config.attr_steps,
            "draws": config.attr_draws, "tolerance": config.attr_tolerance, "max_steps": config.attr_max_steps,
            "ig_rule": config.attr_ig_rule, "smoothgrad_adaptive": config.attr_smoothgrad_adaptive,
            "smoothgrad_precision": config.attr_smoothgrad_precision,
            "extremal_steps": config.attr_extremal_steps, "occlusion_stride": config.attr_occlusion_stride,
            "seed": config.seed, "layer": None, "input_size": None}


# The settings a caller does not name: Config's defaults, the reference recipes (RECIPES.md).
DEFAULTS = settings(Config())


def check(name: str) -> None:
    """Raises AtlasError naming the choices if no method is called `name`."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=2)
        raise AtlasError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)}"
                         + (f" (did you mean {close[0]}?)" if close else ""))


def get(name: str, model: nn.Module, space: InputSpace | None = None, batch: int = 64,
        **settings) -> Attribution:
    """The method called `name`, bound to `model`.

    Args:
        name: a key of METHODS.
        model: the classifier.
        space: its input normalization.
        batch: model evaluations per forward pass (halved on out-of-memory).
        settings: overrides of DEFAULTS (samples, noise, steps, layer, ...).

    Returns:
        The configured method.
    """
    check(name)
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"settings: unknown name(s) {', '.join(sorted(unknown))}")
    return METHODS[name](model, space or InputSpace(), batch, {**DEFAULTS, **settings})
