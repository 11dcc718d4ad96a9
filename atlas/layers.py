"""Layer discovery and activation capture with forward hooks.

Forward hooks work for any `nn.Module`, including models that torch.fx cannot
trace. Two traps are handled here: a module whose output a later in-place op
overwrites (a conv followed by `ReLU(inplace=True)`), and a module called more
than once per forward pass (torchvision's Bottleneck calls one `relu` three
times). A layer is one call of one module: `layer1.0.relu@2` is the third call
of `layer1.0.relu`; modules called once keep their plain dotted name. A name
ending in `:in` is that call's input instead of its output: a layer's
pre-activation, `layer1.0.relu@2:in`, is what the ReLU that produced the
layer's output received.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.layouts import NHWC, TOKENS, as_bchw, follow_layouts, is_channels_last, patch_grid

# the layout helpers live in atlas.layouts; callers may read them from here, with the layers
__all__ = ["LayerInfo", "Capture", "discover", "default_selection", "select", "passed_on", "parse_layer_name",
           "embedding_layer", "INPUT", "ACTIVATIONS", "NHWC", "TOKENS", "as_bchw", "is_channels_last", "patch_grid"]


@dataclass(frozen=True)
class LayerInfo:
    """One hookable layer: one call of one module, with its output shape."""

    name: str  # `module` or `module@call`
    module: str  # dotted module name, as in state_dict keys
    call: int  # which call of the module (0 for the first)
    kind: str  # the module's class name
    channels: int
    height: int
    width: int
    pre: str | None = None  # `<activation call>:in`, when the output is an activation's: its pre-activation
    then: str | None = None  # the normalization or activation layer that takes this output as it is
    layout: str = "nchw"  # how the module hands on its output: nchw, nhwc (channels last), tokens or vector

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


INPUT = ":in"  # suffix of a name that means a call's input
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.Hardtanh,
               nn.PReLU, nn.Softplus)


class _StopForward(Exception):
    pass


class Capture:
    """Hooks chosen layers and keeps `fn(activation)` of each in a forward pass.

    `fn` runs inside the hook, before any later in-place op can touch the
    activation; the default clones it. A dict gives each layer its own `fn`. With `stop=True` the forward pass ends
    as soon as every chosen layer has been seen, so no time is spent on the
    layers above the deepest one needed.

    Usage:
        with Capture(model, ["layer4.2"]) as cap:
            acts = cap.run(x)  # {"layer4.2": tensor [B, C, H, W]}
    """

    def __init__(self, model: nn.Module, layers: Iterable[str],
                 fn: Callable[[torch.Tensor], object] | dict[str, Callable] = torch.clone,
                 stop: bool = False):
        self.model, self.fn, self.stop = model, fn, stop
        self.names: dict[tuple[str, int], str] = {}
        self.inputs: dict[tuple[str, int], str] = {}  # the `:in` names: a call's input
        for n in layers:
            base, is_input = (n[:-len(INPUT)], True) if n.endswith(INPUT) else (n, False)
            (self.inputs if is_input else self.names)[parse_layer_name(base)] = n
        self.wanted: dict[str, set[int]] = defaultdict(set)
        self.wanted_in: dict[str, set[int]] = defaultdict(set)
        for module, call in self.names:
            self.wanted[module].add(call)
        for module, call in self.inputs:
            self.wanted_in[module].add(call)
        modules = dict(model.named_modules())
        unknown = [m for m in [*self.wanted, *self.wanted_in] if m not in modules]
        if unknown:
            raise AtlasError(f"no module named {unknown[0]!r} in {type(model).__name__}")
        self._modules = {m: modules[m] for m in self.wanted}
        self._in_modules = {m: modules[m] for m in self.wanted_in}
        self._handles: list = []
        self._calls: dict[str, int] = {}
        self._in_calls: dict[str, int] = {}
        self.total = len(self.names) + len(self.inputs)
        self.outputs: dict[str, object] = {}
        self.returned = None

    def __enter__(self) -> Capture:
        for name, module in self._in_modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module_name: str):
        def hook(module, _inputs, output):
            call = self._calls.get(module_name, 0)
            self._calls[module_name] = call + 1
            if call not in self.wanted[module_name]:
                return
            name = self.names[(module_name, call)]
            act = as_bchw(output, is_channels_last(self.model, name, module))
            if act is None:
                raise AtlasError(f"layer {module_name} returns {type(output).__name__}, not a feature map")
            self._keep(name, act)
        return hook

    def _pre_hook(self, module_name: str):
        def hook(module, inputs):
            call = self._in_calls.get(module_name, 0)
            self._in_calls[module_name] = call + 1
            if call not in self.wanted_in[module_name]:
                return
            name = self.inputs[(module_name, call)]
            act = as_bchw(inputs[0], is_channels_last(self.model, name, module)) if inputs else None
            if act is None:
                raise AtlasError(f"layer {module_name} takes {type(inputs[0]).__name__}, not a feature map")
            self._keep(name, act)
        return hook

    def _keep(self, name: str, act: torch.Tensor) -> None:
        self.outputs[name] = (self.fn[name] if isinstance(self.fn, dict) else self.fn)(act)
        if self.stop and len(self.outputs) == self.total:
            raise _StopForward

    def run(self, x: torch.Tensor) -> dict[str, object]:
        """Runs the model on `x`; returns the captured value of every chosen layer."""
        self._calls.clear()
        self._in_calls.clear()
        self.outputs = {}
        self.returned = None
        try:
            self.returned = self.model(x)
        except _StopForward:
            pass
        missing = {*self.names.values(), *self.inputs.values()} - set(self.outputs)
        if missing:
            raise AtlasError(f"layer(s) never called in the forward pass: {', '.join(sorted(missing))}")
        return self.outputs


def embedding_layer(model: nn.Module, classes: int) -> str | None:
    """The input of the model's classifier, `<name>:in`: the penultimate embedding of an image.

    The classifier is the last `nn.Linear` that outputs one value per class (the head of every
    torchvision and timm classifier with a linear head); None for a model without one (a
    convolutional head such as SqueezeNet's).
    """
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    return f"{linear[-1]}{INPUT}" if linear else None


def parse_layer_name(name: str) -> tuple[str, int]:
    """`layer1.0.relu@2` -> ("layer1.0.relu", 2); `conv1` -> ("conv1", 0)."""
    module, _, call = name.partition("@")
    return module, int(call) if call else 0


def discover(model: nn.Module, input_size: int, device: torch.device | str = "cpu") -> list[LayerInfo]:
    """Lists every hookable layer in execution order, with its output shape.

    It also finds, by following tensors through one forward pass, each
    layer's pre-activation (the input of the activation call that produced
    its output) and the normalization or activation its output goes straight
    into (`then`), which `default_selection` follows. A tensor is followed by
    identity and version, so an in-place operation in between (a residual
    `out += identity`) ends the chain.

    Args:
        model: the model, on `device`.
        input_size: side of the square input.
        device: where to run the probing forward pass.

    Returns:
        One LayerInfo per call of every module whose output is a feature map.
    """
    calls: dict[str, int] = defaultdict(int)
    started: dict[str, list] = defaultdict(list)  # module -> input keys of its calls, in order
    ended: list[dict] = []  # one record per finished call, in the order calls end
    alive: list[torch.Tensor] = []  # every tensor seen, so that no id is reused during the pass

    def key(t) -> tuple[int, int] | None:
        if not isinstance(t, torch.Tensor):
            return None
        alive.append(t)
        return id(t), t._version

    def make_pre_hook(name: str):
        def hook(_module, inputs):
            first = inputs[0] if inputs else None
            started[name].append((key(first), tuple(first.shape) if isinstance(first, torch.Tensor) else None))
        return hook

    def make_hook(name: str):
        def hook(module, _inputs, output):
            call = calls[name]
            calls[name] += 1
            into, in_shape = started[name][call] if call < len(started[name]) else (None, None)
            ended.append({"module": name, "call": call, "kind": type(module).__name__, "obj": module,
                          "in": into, "in_shape": in_shape, "out": key(output),
                          "raw": tuple(output.shape) if isinstance(output, torch.Tensor) and output.is_floating_point()
                          else None})
        return hook

    named = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_pre_hook(make_pre_hook(n)) for n, m in named]
    handles += [m.register_forward_hook(make_hook(n)) for n, m in named]
    try:
        with torch.no_grad():
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            model(torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    for r in ended:
        r["name"] = f"{r['module']}@{r['call']}" if calls[r["module"]] > 1 else r["module"]
    follow_layouts(model, ended, INPUT)
    layers = []
    for i, r in enumerate(ended):
        if r["shape"] is None:
            continue
        producer = next((a for a in reversed(ended[:i + 1]) if isinstance(a["obj"], ACTIVATIONS)
                         and a["out"] == r["out"] and a["in"] is not None), None)
        pre = f"{producer['name']}{INPUT}" if producer else None
        if pre is None and r["out"] is not None:  # a functional in-place activation (F.relu(x, inplace=True))
            inner = next((a for a in reversed(ended[:i]) if a["out"] is not None and a["out"][0] == r["out"][0]
                          and a["out"][1] < r["out"][1] and a["module"].startswith(r["module"] + ".")
                          and a["shape"] == r["shape"]), None)
            pre = inner["name"] if inner else None
        taker = next((t for t in ended if t["in"] == r["out"] and t is not r and t["shape"] is not None
                      and isinstance(t["obj"], (*ACTIVATIONS, nn.modules.batchnorm._NormBase))), None)
        layers.append(LayerInfo(name=r["name"], module=r["module"], call=r["call"], kind=r["kind"],
                                channels=r["shape"][1], height=r["shape"][2], width=r["shape"][3],
                                pre=pre,
                                then=taker["name"] if taker else None, layout=r["layout"]))
    return layers


def default_selection(model: nn.Module, layers: list[LayerInfo]) -> list[LayerInfo]:
    """The layers a user of OpenAI Microscope would expect to browse, as the network passes them on.

    * timm EfficientNet / MobileNet style (a `blocks` stack): the stem, every
      block output, and the head.
    * vision transformers (token layers): the patch embedding and each
      encoder block's output (torchvision's `conv_proj` and
      `encoder.layers.encoder_layer_0` ..., timm's `patch_embed` and
      `blocks.0` ...): the blocks of the stack (an `nn.Sequential`) whose output is tokens.
    * anything else: every convolution and every block, where a block is a
      module with children that sits directly in the model or in an
      `nn.Sequential` (ResNet's `layer3.2`, GoogLeNet's `inception4a`).

    A convolution is shown as the network passes it on (`passed_on`): after
    its normalization and activation where those follow it, so a negative
    BatchNorm scale cannot show a unit upside down. Names stay PyTorch's (a
    ResNet's `layer1.0.conv1` is browsed as `layer1.0.relu@0`). Only 4-D
    feature maps count, and of convolutions and blocks only first calls.
    """
    modules = dict(model.named_modules())
    by_name = {l.name: l for l in layers}
    spatial = [l for l in layers if l.call == 0 and (l.height > 1 or l.width > 1)]

    def unique(picked: Iterable[LayerInfo]) -> list[LayerInfo]:
        return list({l.name: l for l in picked}.values())

    if isinstance(getattr(model, "blocks", None), nn.Sequential) and hasattr(model, "conv_stem"):
        picked = [passed_on(l, by_name) if l.name in ("conv_stem", "conv_head") else l for l in spatial
                  if l.name in ("conv_stem", "conv_head")
                  or fnmatch.fnmatchcase(l.name, "blocks.*.*") and l.name.count(".") == 2]
        if picked:
            return unique(picked)

    def parent(name: str) -> nn.Module:
        return modules[name.rpartition(".")[0]] if "." in name else model

    def is_block(name: str) -> bool:
        m = modules[name]
        return (any(True for _ in m.children()) and not isinstance(m, nn.Sequential)
                and (isinstance(parent(name), nn.Sequential) or "." not in name))

    def wrapper(l: LayerInfo) -> LayerInfo | None:
        """The module that wraps a convolution alone (GoogLeNet's BasicConv2d: conv, norm, F.relu)."""
        owner = l.module.rpartition(".")[0]
        m = modules.get(owner) if "." in l.module else None
        if m is None or isinstance(m, nn.Sequential) or owner not in by_name:
            return None
        return by_name[owner] if sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 1 else None

    def shown(l: LayerInfo) -> LayerInfo:
        return (wrapper(l) or passed_on(l, by_name)) if isinstance(modules[l.module], nn.Conv2d) else l

    if any(l.layout == TOKENS for l in spatial):  # a vision transformer
        convs = [shown(l) for l in spatial if isinstance(modules[l.module], nn.Conv2d)]
        stack = [l for l in spatial if l.layout == TOKENS and is_block(l.module)
                 and isinstance(parent(l.module), nn.Sequential)]
        return unique(convs[:1] + stack)
    return unique(shown(l) for l in spatial if isinstance(modules[l.module], nn.Conv2d) or is_block(l.module))


NORM_KINDS = ("BatchNorm", "InstanceNorm")  # class names that mark a normalization a `then` link may reach


def passed_on(layer: LayerInfo, by_name: dict[str, LayerInfo]) -> LayerInfo:
    """What the network makes of a layer's output: its normalization, then that one's activation.

    Follows `then` links: to a normalization or an activation; from a
    normalization, on to an activation. An activation ends the walk (what
    follows it belongs to the next layer).
    """
    first = by_name.get(layer.then) if layer.then else None
    if first is None:
        return layer
    if not any(k in first.kind for k in NORM_KINDS):
        return first  # the activation itself
    second = by_name.get(first.then) if first.then else None
    return second if second is not None and not any(k in second.kind for k in NORM_KINDS) else first


def select(model: nn.Module, layers: list[LayerInfo], patterns: Iterable[str] = ()) -> list[LayerInfo]:
    """Picks layers by glob patterns, or the default selection when none are given.

    Raises:
        AtlasError: a pattern matches no layer; the message names the closest ones.
    """
    patterns = list(patterns)
    if not patterns:
        return default_selection(model, layers)
    names = [l.name for l in layers]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=4, cutoff=0.4) or names[:4]
            raise AtlasError(f"layer pattern {pattern!r} matches no layer; closest: {', '.join(close)}; "
                             f"`atlas layers MODEL` lists them all")
        chosen |= hits
    return [l for l in layers if l.name in chosen]
