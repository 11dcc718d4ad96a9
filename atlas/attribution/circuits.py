"""Circuits: how the units of one selected layer feed the units of the next.

By attribution, for any architecture (residual sums, concatenations,
attention): the input a unit takes from channel j of the previous selected
layer is activation x gradient of the unit's spatial maximum (the score its
top examples are ranked by) with respect to that layer's output, summed over
positions, averaged over the unit's top examples. It comes out of the
backward pass the unit's pixel attribution already makes (taps.py), so it
costs one element-wise product per pass. For a piecewise-linear path without
biases the inputs of a unit add up to its maximum; positive inputs excite it,
negative ones inhibit it. A unit's outputs are the transpose: its column of
the next layer's inputs.

By weights ("Visualizing Weights", Voss et al. 2021), where one convolution
connects the two layers directly (its input is the previous layer's output,
and only normalization and activation lie between its output and the next
layer): the kernel slice between the two channels, W[c, j], scaled by the
normalization's per-channel factor (gamma / sqrt(var + eps)) so that its sign
is what the network passes on.
"""

from __future__ import annotations

import torch
from torch import nn

from atlas.layers import parse_layer_name

METHOD = "activation x gradient of the unit's spatial max, summed over positions, mean over its top examples"
NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardtanh,
               nn.Sigmoid, nn.Tanh, nn.Mish, nn.Identity, nn.Dropout)


def kernel_slices(model: nn.Module, source: str, target: str, example: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
    """The kernel of the one convolution connecting layer `source` to layer `target`, folded with the
    normalization between them: [C_target, C_source, kh, kw], and its provenance; None where no single
    ungrouped convolution connects them directly.

    Args:
        model: the network (eval mode).
        source, target: selected layer names, `source` earlier in the forward pass.
        example: one input batch, to follow the tensors through a forward pass.
    """
    path = _direct_path(model, source, target, example)
    if path is None:
        return None
    conv, norm = path
    weight = conv.weight.detach().float()
    provenance = {"conv": _names(model)[conv], "norm": "", "from": source}
    if isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None:
        scale = torch.rsqrt(norm.running_var.float() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach().float()
        weight = weight * scale.view(-1, 1, 1, 1)
        provenance["norm"] = _names(model)[norm]
    return weight.cpu(), provenance


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _direct_path(model: nn.Module, source: str, target: str, example: torch.Tensor):
    """(conv, batch norm or None) where `source`'s output goes straight into an ungrouped Conv2d whose
    output reaches `target`'s output through normalization and activation modules only."""
    modules = dict(model.named_modules())
    names = {parse_layer_name(source)[0], parse_layer_name(target)[0]}
    if not names <= set(modules):
        return None
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (module, input, output) of leaf calls
    outputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def hook(name):
        def fn(module, inputs, output):
            call = calls.get(name, 0)
            calls[name] = call + 1
            if isinstance(output, torch.Tensor):
                for layer in (source, target):
                    if parse_layer_name(layer) == (name, call):
                        outputs.setdefault(layer, output)
                if not any(True for _ in module.children()) and inputs and isinstance(inputs[0], torch.Tensor):
                    seen.append((module, inputs[0], output))
        return fn
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items() if n]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if source not in outputs or target not in outputs:
        return None
    start, end = outputs[source], outputs[target]
    for i, (module, x, out) in enumerate(seen):
        if x is not start or not isinstance(module, nn.Conv2d) or module.groups != 1:
            continue
        norm, current = None, out
        if current is end:
            return module, None
        for nxt, x2, out2 in seen[i + 1:]:
            if x2 is not current:
                continue
            if not isinstance(nxt, (*NORMS, *ACTIVATIONS)):
                break
            if isinstance(nxt, NORMS):
                if norm is not None:
                    break
                norm = nxt
            current = out2
            if current is end:  # a norm other than BatchNorm is not a per-channel scale: no slice
                return (module, norm) if norm is None or isinstance(norm, nn.BatchNorm2d) else None
    return None
