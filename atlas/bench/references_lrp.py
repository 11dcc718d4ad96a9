"""Atlas's LRP against a plain zennit run, and how much of the logit its maps conserve.

On the same canonized copy of the model (Atlas's `canonize`: zennit's own
canonizers for torchvision's ResNets and VGGs, else torch.fx with explicit
residual sums and folded BatchNorms), Atlas's map with zennit's rules
(`dead_units="drop"`) is compared with zennit's `Gradient` attributor under
the same composite, the relevance seeded with the target logit: there the
definitions coincide and the maps must agree. `lrp_conservation_error` is the
median over images of |sum of relevance - logit| / |logit| for Atlas's
first composite as the atlas runs it, EpsilonPlusFlat with the flat rule for
units z+ cannot divide among; zennit's own figure and EpsilonGammaBox's are
printed beside it.

Where zennit's relevance goes: z+ (the convolutions' rule) divides a unit's
relevance among its inputs by their positive contributions; a unit with none
(its activation comes from its folded bias alone, biases taking no relevance)
drops what it received. `dropped_relevance` sums that, layer by layer, as a
fraction of the logit, so the printout says which layers lose it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

from atlas.attribution.base import InputSpace
from atlas.attribution.lrp import COMPOSITES, LRP, STABILIZER, Canonical, canonize
from atlas.bench.common import timed
from atlas.models import LoadedModel

TOP_LAYERS = 3  # layers named in the printout of where relevance is dropped


def zennit_relevance(canonical: Canonical, lrp: LRP, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """zennit's own attributor on the canonized copy, with the composite and settings of `lrp` (zennit's rules)."""
    space, kw = lrp.space, {"epsilon": lrp.epsilon, "zero_params": "bias", "canonizers": canonical.canonizers()}
    if lrp.composite == "epsilon_plus_flat":
        composite = EpsilonPlusFlat(**kw)
    else:
        composite = EpsilonGammaBox(low=space.lo(inputs).expand_as(inputs), high=space.hi(inputs).expand_as(inputs),
                                    gamma=lrp.gamma, **kw)
    with Gradient(model=canonical.module, composite=composite) as attributor:
        _, relevance = attributor(inputs, lambda out: torch.zeros_like(out).scatter_(1, target[:, None], 1.0) * out)
    return relevance.detach()


def dropped_relevance(canonical: Canonical, inputs: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Per convolution under z+ (EpsilonPlusFlat), the relevance reaching units with no positive contribution.

    Returns:
        {layer: float [n]}: that relevance as a fraction of each image's target logit.
    """
    convs = {name: m for name, m in canonical.module.named_modules() if isinstance(m, nn.Conv2d)}
    seen: dict[str, dict[str, torch.Tensor]] = {n: {} for n in convs}
    handles = []
    for name, conv in convs.items():
        handles.append(conv.register_forward_pre_hook(_keep_input(seen[name])))
        handles.append(conv.register_forward_hook(_keep_relevance(seen[name])))
    x = inputs.detach().clone().requires_grad_(True)
    composite = EpsilonPlusFlat(zero_params="bias", canonizers=canonical.canonizers())
    try:
        with torch.enable_grad(), composite.context(canonical.module) as modified:
            out = modified(x)
            torch.autograd.grad(out, x, grad_outputs=torch.zeros_like(out).scatter_(1, target[:, None], 1.0) * out)
    finally:
        for h in handles:
            h.remove()
    logit = out.detach().gather(1, target[:, None])[:, 0]
    first = next(iter(convs), None)  # the first layer takes the flat rule, which needs no positive contribution
    return {name: (_no_positive(conv, seen[name]["x"]) * seen[name]["r"]).flatten(1).sum(1).div(logit).numpy()
            for name, conv in convs.items() if name != first and {"x", "r"} <= seen[name].keys()}


def _keep_input(slot: dict):
    def hook(module, args):
        if args[0].requires_grad:
            slot["x"] = args[0].detach()
    return hook


def _keep_relevance(slot: dict):
    def hook(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda grad: slot.__setitem__("r", grad.detach()))
    return hook


@torch.no_grad()
def _no_positive(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Where z+ (x+ w+ plus x- w-, bias left out) is below zennit's stabilizer: units z+ cannot divide among."""
    bias = 0.0 if conv.bias is None else conv.bias.view(1, -1, 1, 1)
    z = sum(torch.func.functional_call(conv, {"weight": w}, (part,)) - bias
            for w, part in ((conv.weight.clamp(min=0), x.clamp(min=0)), (conv.weight.clamp(max=0), x.clamp(max=0))))
    return (z.abs() < STABILIZER).float()


def _difference(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, str]:
    """The largest |ours - theirs| where both are finite, and a note on the scale and the non-finite values."""
    finite = ours.isfinite() & theirs.isfinite()
    diff = float((ours - theirs).abs()[finite].max()) if finite.any() else float("nan")
    note = f"largest finite |map| {float(ours.abs()[finite].max()) if finite.any() else float('nan'):.3g}"
    bad = (int((~ours.isfinite()).sum()), int((~theirs.isfinite()).sum()))
    if any(bad):
        note += f"; non-finite values atlas {bad[0]}, zennit {bad[1]}, at the same places: " \
                f"{bool(torch.equal(ours.isfinite(), theirs.isfinite()))}"
    return diff, note


def _list(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def lrp_pair(loaded: LoadedModel, inputs: torch.Tensor, target: torch.Tensor) -> dict:
    """Atlas's LRP composites on `inputs`: conservation error and agreement with zennit's own run.

    Args:
        loaded: the model with its preprocessing.
        inputs: [n, 3, H, W] photos in the model's input space.
        target: [n] the explained classes (top-1).

    Returns:
        {"lrp_conservation_error": median relative error of Atlas's EpsilonPlusFlat, "lrp_errors": {composite: [n]}
        (as the atlas runs each), "lrp_zennit_errors": {composite: [n]} (zennit's rules),
        "lrp_max_abs_diff_vs_zennit": {composite: largest |Atlas with zennit's rules - zennit|},
        "lrp_dropped": {layer: [n]}}.
    """
    space = InputSpace.of(loaded.preprocess)
    canonical = canonize(loaded.model, inputs[:1])
    print(f"LRP: {loaded.name}, {len(inputs)} photos, canonization: {canonical.describe()}", flush=True)
    errors, zennit_errors, diffs = {}, {}, {}
    for composite in COMPOSITES:
        same = LRP(loaded.model, space, composite=composite, dead_units="drop")
        plain = same.explain(inputs, target)
        theirs = zennit_relevance(canonical, same, inputs, target)
        zennit_errors[composite] = plain.info["completeness"].cpu().numpy()
        diffs[composite], note = _difference(plain.maps, theirs)
        lrp = LRP(loaded.model, space, composite=composite)
        ours, seconds = timed(lambda: lrp.explain(inputs, target))
        errors[composite] = ours.info["completeness"].cpu().numpy()
        print(f"  {composite}: conservation error per photo {_list(errors[composite])} (median "
              f"{np.median(errors[composite]):.4g}; with zennit's rules {np.median(zennit_errors[composite]):.4g}); "
              f"max |atlas - zennit| with zennit's rules {diffs[composite]:.3g} ({note}); atlas {seconds:.1f} s",
              flush=True)
    dropped = dropped_relevance(canonical, inputs, target)
    worst = sorted(dropped, key=lambda k: -float(np.median(dropped[k])))[:TOP_LAYERS]
    total = np.sum(list(dropped.values()), axis=0) if dropped else np.zeros(len(inputs))
    print(f"  zennit's EpsilonPlusFlat drops the relevance of units with no positive contribution (they fire on their "
          f"bias alone): median {np.median(total):.3f} of the logit in all, most in " + ", ".join(
              f"{k} {np.median(dropped[k]):.3f}" for k in worst), flush=True)
    return {"lrp_conservation_error": float(np.median(errors[COMPOSITES[0]])), "lrp_errors": errors,
            "lrp_zennit_errors": zennit_errors, "lrp_max_abs_diff_vs_zennit": diffs, "lrp_dropped": dropped}
