"""Layer-wise Relevance Propagation (Bach et al. 2015) through zennit, with the canonization it needs.

LRP sends the target logit back through the network layer by layer, each
layer splitting the relevance of its outputs among its inputs by a rule:
ε for the dense layers, z⁺ (EpsilonPlusFlat) or γ (EpsilonGammaBox) for the
convolutions, and the flat or bounded z^B rule for the first layer: the two
composites Kohlbrenner et al. (2020) recommend for VGG- and ResNet-like
networks, as zennit (Anders et al.) implements them.

The rules hold only on a *canonical* network: every BatchNorm folded into the
convolution before it (else a negative BatchNorm scale sends relevance the
wrong way), and every residual sum an explicit module that splits relevance in
proportion to its two inputs (else autograd copies the whole relevance into
both branches and a ResNet's map sums to several times the logit).
torchvision's ResNets and VGGs get zennit's own canonizers; any other model
is traced with torch.fx on a copy, its tensor additions become zennit `Sum`
modules and each BatchNorm right after a convolution or linear layer (timm's
BatchNormAct2d included) is folded into it. What tracing cannot reach stays
as it was, and the conservation error says so.

Biases take no relevance here (zennit's `zero_params="bias"`), so every rule
conserves: the map sums to the target logit, and the relative difference
(`completeness`, shown as the conservation error) measures only what the
canonization missed, as a path method's completeness measures its integral.

Where Atlas differs from zennit's composites, on purpose: a convolution unit
that fires on its (folded) bias alone has no positive contribution for z+ to
divide its relevance by, and zennit's ZPlus drops it. On the default
EfficientNet-Lite0 that is most of the logit (its depthwise convolutions see
3 x 3 windows of a sparse ReLU6 map, often all zero): zennit's EpsilonPlusFlat
keeps about 7 % of it. Atlas's z+ rule (`ZPlusOrFlat`) hands such a unit's
relevance to its receptive field by the flat rule (evenly over the inputs it
sees, as the composites treat the first layer, whose inputs carry no
evidence of their own), so the map conserves the logit; every other unit is
z+ as zennit computes it. `dead_units="drop"` gives zennit's rule. The γ rule,
made for non-negative inputs, still blows up on the signed inputs of the
linear bottlenecks; the conservation error and the sanity checks show it.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.core import BasicHook, ParamMod, Stabilizer
from zennit.layer import Sum
from zennit.rules import ClampMod, zero_bias
from zennit.types import Convolution
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from torchvision.models import VGG, ResNet

from atlas.errors import AtlasError
from atlas.attribution.base import Attribution, Explanation, InputSpace

COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box")
DEAD_UNITS = ("flat", "drop")  # what z+ does with a unit that has no positive contribution
STABILIZER = 1e-6  # zennit's default: z+ below it counts as no positive contribution


class ZPlusOrFlat(BasicHook):
    """z+ (zennit's ZPlus: x+ w+ and x- w-), and the flat rule for units whose z+ is below the stabilizer.

    zennit's ZPlus divides by the stabilized z+ and so drops (nearly all of) such a unit's
    relevance; here it goes to the unit's receptive field, evenly over the inputs it sees.
    """

    def __init__(self, stabilizer: float = STABILIZER, zero_params=None):
        stabilize = Stabilizer.ensure(stabilizer)

        def mapper(out_grad, outputs):
            plus, flat = outputs[0] + outputs[1], outputs[2]
            dead = plus.abs() < stabilizer
            g = torch.where(dead, 0.0, out_grad / stabilize(plus))
            return [g, g, torch.where(dead, out_grad / stabilize(flat), 0.0)]

        super().__init__(
            input_modifiers=[lambda x: x.clamp(min=0), lambda x: x.clamp(max=0), torch.ones_like],
            param_modifiers=[ClampMod(min=0.0, zero_params=zero_params),
                             ClampMod(max=0.0, zero_params=zero_bias(zero_params)),
                             ParamMod(lambda p, _: torch.ones_like(p), zero_params=zero_bias(zero_params),
                                      require_params=False)],
            output_modifiers=[lambda out: out] * 3,
            gradient_mapper=mapper,
            reducer=lambda inputs, grads: inputs[0] * grads[0] + inputs[1] * grads[1] + grads[2],
        )
_ADDS = {operator.add, operator.iadd, torch.add}
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_ACTIVATIONS = {torch.relu: nn.ReLU, torch.nn.functional.relu: nn.ReLU, "relu": nn.ReLU,
                torch.nn.functional.relu6: nn.ReLU6}  # functions and tensor methods fx records


class LRP(Attribution):
    """LRP with one of zennit's composites on a canonized copy of the model.

    Args:
        composite: "epsilon_plus_flat" or "epsilon_gamma_box".
        epsilon: the ε rule's stabilizer (dense layers).
        gamma: the γ rule's weight of positive contributions (EpsilonGammaBox's convolutions).
        dead_units: EpsilonPlusFlat's convolution units with no positive contribution: "flat" hands
            their relevance to their receptive field (`ZPlusOrFlat`), "drop" loses it (zennit's ZPlus).
    """

    def __init__(self, model: nn.Module, space: InputSpace | None = None, batch: int = 64,
                 composite: str = "epsilon_plus_flat", epsilon: float = 1e-6, gamma: float = 0.25,
                 dead_units: str = "flat"):
        super().__init__(model, space, batch)
        if composite not in COMPOSITES:
            raise ValueError(f"composite: expected one of {', '.join(COMPOSITES)}, got {composite!r}")
        if dead_units not in DEAD_UNITS:
            raise ValueError(f"dead_units: expected one of {', '.join(DEAD_UNITS)}, got {dead_units!r}")
        self.composite, self.epsilon, self.gamma, self.dead_units = composite, epsilon, gamma, dead_units
        self.name = f"lrp_{composite}"
        self._canonical: Canonical | None = None

    @property
    def params(self) -> dict:
        canon = self._canonical.describe() if self._canonical else "not yet built"
        return {**super().params, "composite": self.composite, "epsilon": self.epsilon,
                **({"gamma": self.gamma} if self.composite == "epsilon_gamma_box" else {"dead_units": self.dead_units}),
                "zero_params": "bias", "canonization": canon}

    def _explain(self, inputs, target):
        attention = next((type(m).__name__ for m in self.model.modules()
                          if isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__), None)
        if attention is not None:
            raise AtlasError(f"{self.name}: {type(self.model).__name__} has attention layers ({attention}), which "
                             "zennit's composites have no LRP rule for; LRP applies to convolutional networks")
        if self._canonical is None:
            self._canonical = canonize(self.model, inputs[:1])
        parts = self.chunked(lambda a, b: self._relevance(inputs[a:b], target[a:b]), inputs.shape[0])
        maps = torch.cat([m for m, _ in parts])
        logit = torch.cat([o for _, o in parts])
        total = maps.flatten(1).sum(1).float()
        error = (total - logit).abs() / logit.abs().clamp_min(1e-12)
        return Explanation(maps, {"completeness": error})

    def _relevance(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Relevance of every input value for each row's target logit, and that logit."""
        if self.composite == "epsilon_plus_flat":
            rules = [(Convolution, ZPlusOrFlat(zero_params="bias"))] if self.dead_units == "flat" else []
            composite = EpsilonPlusFlat(epsilon=self.epsilon, zero_params="bias", layer_map=rules,
                                        canonizers=self._canonical.canonizers())
        else:
            composite = EpsilonGammaBox(low=self.space.lo(x).expand_as(x), high=self.space.hi(x).expand_as(x),
                                        epsilon=self.epsilon, gamma=self.gamma, zero_params="bias",
                                        canonizers=self._canonical.canonizers())
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), composite.context(self._canonical.module) as modified:
            out = modified(x)
            chosen = torch.zeros_like(out).scatter_(1, target[:, None], 1.0) * out.detach()
            (relevance,) = torch.autograd.grad(out, x, grad_outputs=chosen)
        return relevance.detach(), out.detach().gather(1, target[:, None])[:, 0].float()


class Canonical:
    """A copy of a model ready for LRP, and the zennit canonizers still to apply around each pass."""

    def __init__(self, module: nn.Module, zennit: str | None, sums: int = 0, folded: int = 0,
                 traced: str | None = None, activations: int = 0):
        self.module, self.zennit, self.sums, self.folded, self.traced = module, zennit, sums, folded, traced
        self.activations = activations

    def canonizers(self) -> list:
        """Fresh zennit canonizers (they hold the state they undo), or none where the copy is canonized already."""
        if self.zennit == "resnet":
            return [ResNetCanonizer()]
        if self.zennit == "vgg":
            return [VGGCanonizer()]
        if self.zennit == "sequential":
            return [SequentialMergeBatchNorm()]
        return []

    def describe(self) -> str:
        """One line for the store and the about page."""
        if self.zennit in ("resnet", "vgg"):
            return f"zennit {'ResNetCanonizer' if self.zennit == 'resnet' else 'VGGCanonizer'}"
        if self.traced:
            return (f"torch.fx failed ({self.traced}); zennit SequentialMergeBatchNorm only, "
                    f"residual sums not canonized")
        line = f"torch.fx: {self.sums} residual sums as zennit Sum, {self.folded} BatchNorms folded"
        return line + (f", {self.activations} functional activations as modules" if self.activations else "")


def canonize(model: nn.Module, example: torch.Tensor) -> Canonical:
    """A canonical copy of `model` (never the model itself) for LRP.

    Args:
        model: the classifier, in eval mode.
        example: one input, for the shapes that tell a residual sum from a broadcast.
    """
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    if isinstance(model, ResNet):
        return Canonical(clone, "resnet")
    if isinstance(model, VGG):
        return Canonical(clone, "vgg")
    try:
        traced = torch.fx.GraphModule(clone, _Tracer().trace(clone))
        ShapeProp(traced).propagate(example.detach())
    except Exception as exc:  # control flow fx cannot follow: fall back to what zennit can do on modules
        reason = (str(exc).splitlines() or [""])[0][:120]
        return Canonical(clone, "sequential", traced=f"{type(exc).__name__}: {reason}")
    sums = _explicit_sums(traced)
    folded = _fold_batchnorms(traced)
    activations = _activation_modules(traced)
    traced.graph.lint()
    traced.recompile()
    return Canonical(traced.eval(), None, sums=sums, folded=folded, activations=activations)


class _Tracer(torch.fx.Tracer):
    """fx's tracer, keeping every BatchNorm, convolution and linear layer a module of its own.

    Subclasses count: timm's BatchNormAct2d (a BatchNorm carrying its activation) and Conv2dSame (the
    TensorFlow padding of ported weights) must stay modules, or no rule would see them.
    """

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, (_BatchNorm, _ConvNd, nn.Linear)) or super().is_leaf_module(m, name)


def _shape(node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return getattr(meta, "shape", None)


def _explicit_sums(gm: torch.fx.GraphModule) -> int:
    """Replaces each sum of two same-shaped tensors by stack + zennit `Sum`; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if _shape(a) is None or _shape(a) != _shape(b):
            continue
        name = f"lrp_sum_{count}"
        gm.add_submodule(name, Sum())
        with gm.graph.inserting_before(node):
            stacked = gm.graph.call_function(torch.stack, ((a, b),), {"dim": -1})
            summed = gm.graph.call_module(name, (stacked,))
        summed.meta = dict(node.meta)  # the shape a later sum compares against
        node.replace_all_uses_with(summed)
        gm.graph.erase_node(node)
        count += 1
    return count


def _activation_modules(gm: torch.fx.GraphModule) -> int:
    """Replaces each functional ReLU or ReLU6 by a module, so relevance passes it as it passes one; returns how many.

    LRP counts the activation as part of its unit: relevance goes through it unchanged (zennit's Pass rule,
    which hooks modules only). Where the gradient carries it instead, relevance reaching an inactive input
    is lost; the flat rule of `ZPlusOrFlat` sends relevance to exactly such inputs.
    """
    count = 0
    for node in list(gm.graph.nodes):
        kind = _ACTIVATIONS.get(node.target) if node.op in ("call_function", "call_method") else None
        if kind is None or len(node.args) != 1:
            continue
        name = f"lrp_activation_{count}"
        gm.add_submodule(name, kind())
        with gm.graph.inserting_before(node):
            module = gm.graph.call_module(name, (node.args[0],))
        module.meta = dict(node.meta)
        node.replace_all_uses_with(module)
        gm.graph.erase_node(node)
        count += 1
    return count


def _fold_batchnorms(gm: torch.fx.GraphModule) -> int:
    """Folds each BatchNorm whose input is a convolution or linear layer used only by it; returns how many."""
    modules = dict(gm.named_modules())
    count = 0
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm) or not bn.track_running_stats or bn.running_mean is None:
            continue
        source = node.args[0]
        layer = modules.get(source.target) if isinstance(source, torch.fx.Node) and source.op == "call_module" \
            else None
        if not isinstance(layer, _FOLDABLE) or len(source.users) != 1 or _out_features(layer) != bn.num_features:
            continue
        fold(layer, bn)
        count += 1
    return count


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@torch.no_grad()
def fold(layer: nn.Module, bn: _BatchNorm) -> None:
    """Folds `bn` into `layer` (y = bn(layer(x)) = layer'(x)) and makes `bn` an exact identity.

    The identity keeps the module (and whatever activation it carries, as timm's BatchNormAct2d
    does): running mean 0, running variance 1 - eps, so that (x - 0) / sqrt(var + eps) is x itself.
    """
    scale = 1.0 / (bn.running_var + bn.eps).sqrt()
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(scale.view(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    layer.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    if bn.weight is not None:
        bn.weight.fill_(1.0)
        bn.bias.zero_()
