"""Layer discovery and activation capture with forward hooks.

Forward hooks work for any `nn.Module`, including models that torch.fx cannot
trace. Two traps are handled here: a module whose output a later in-place op
overwrites (a conv followed by `ReLU(inplace=True)`), and a module called more
than once per forward pass (torchvision's Bottleneck calls one `relu` three
times). A layer is one call of one module: `layer1.0.relu@2` is the third call
of `layer1.0.relu`; modules called once keep their plain dotted name.
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

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def as_bchw(t: torch.Tensor) -> torch.Tensor | None:
    """Views an activation as [batch, channels, height, width].

    Feature vectors [B, C] become [B, C, 1, 1]; token sequences [B, N, D]
    (vision transformers) become [B, D, N, 1]. Anything else is not a layer.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        return t.transpose(1, 2)[..., None]
    return None


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
        self.names = {parse_layer_name(n): n for n in layers}
        self.wanted: dict[str, set[int]] = defaultdict(set)
        for module, call in self.names:
            self.wanted[module].add(call)
        modules = dict(model.named_modules())
        unknown = [m for m in self.wanted if m not in modules]
        if unknown:
            raise AtlasError(f"no module named {unknown[0]!r} in {type(model).__name__}")
        self._modules = {m: modules[m] for m in self.wanted}
        self._handles: list = []
        self._calls: dict[str, int] = {}
        self.outputs: dict[str, object] = {}
        self.returned = None

    def __enter__(self) -> Capture:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module_name: str):
        def hook(_module, _inputs, output):
            call = self._calls.get(module_name, 0)
            self._calls[module_name] = call + 1
            if call not in self.wanted[module_name]:
                return
            act = as_bchw(output)
            if act is None:
                raise AtlasError(f"layer {module_name} returns {type(output).__name__}, not a feature map")
            name = self.names[(module_name, call)]
            self.outputs[name] = (self.fn[name] if isinstance(self.fn, dict) else self.fn)(act)
            if self.stop and len(self.outputs) == len(self.names):
                raise _StopForward
        return hook

    def run(self, x: torch.Tensor) -> dict[str, object]:
        """Runs the model on `x`; returns the captured value of every chosen layer."""
        self._calls.clear()
        self.outputs = {}
        self.returned = None
        try:
            self.returned = self.model(x)
        except _StopForward:
            pass
        missing = set(self.names.values()) - set(self.outputs)
        if missing:
            raise AtlasError(f"layer(s) never called in the forward pass: {', '.join(sorted(missing))}")
        return self.outputs


def parse_layer_name(name: str) -> tuple[str, int]:
    """`layer1.0.relu@2` -> ("layer1.0.relu", 2); `conv1` -> ("conv1", 0)."""
    module, _, call = name.partition("@")
    return module, int(call) if call else 0


def discover(model: nn.Module, input_size: int, device: torch.device | str = "cpu") -> list[LayerInfo]:
    """Lists every hookable layer in execution order, with its output shape.

    Args:
        model: the model, on `device`.
        input_size: side of the square input.
        device: where to run the probing forward pass.

    Returns:
        One LayerInfo per call of every module whose output is a feature map.
    """
    seen: list[tuple[str, int, str, torch.Size]] = []
    calls: dict[str, int] = defaultdict(int)

    def make_hook(name: str):
        def hook(module, _inputs, output):
            act = as_bchw(output)
            if act is not None:
                seen.append((name, calls[name], type(module).__name__, act.shape))
            calls[name] += 1
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            model(torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return [LayerInfo(name=f"{n}@{c}" if calls[n] > 1 else n, module=n, call=c, kind=kind,
                      channels=s[1], height=s[2], width=s[3]) for n, c, kind, s in seen]


def default_selection(model: nn.Module, layers: list[LayerInfo]) -> list[LayerInfo]:
    """The layers a user of OpenAI Microscope would expect to browse.

    * timm EfficientNet / MobileNet style (a `blocks` stack): the stem
      convolution, every block output, and the head convolution. The
      convolutions, not the ReLU6 after them: a capped activation ties many
      images at its ceiling, and its zero gradient leaves renders grey.
    * anything else: every convolution and every block, where a block is a
      module with children that sits directly in the model or in an
      `nn.Sequential` (ResNet's `layer3.2`, GoogLeNet's `inception4a`).
    Only 4-D feature maps of first calls count.
    """
    modules = dict(model.named_modules())
    spatial = [l for l in layers if l.call == 0 and (l.height > 1 or l.width > 1)]
    if isinstance(getattr(model, "blocks", None), nn.Sequential) and hasattr(model, "conv_stem"):
        wanted = {"conv_stem", "conv_head"}
        picked = [l for l in spatial if l.name in wanted or fnmatch.fnmatchcase(l.name, "blocks.*.*")
                  and l.name.count(".") == 2]
        if picked:
            return picked

    def parent(name: str) -> nn.Module:
        return modules[name.rpartition(".")[0]] if "." in name else model

    def is_block(name: str) -> bool:
        m = modules[name]
        return (any(True for _ in m.children()) and not isinstance(m, nn.Sequential)
                and (isinstance(parent(name), nn.Sequential) or "." not in name))

    return [l for l in spatial if isinstance(modules[l.module], nn.Conv2d) or is_block(l.module)]


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


def receptive_field(model: nn.Module, layer: LayerInfo, input_size: int,
                    device: torch.device | str = "cpu", threshold: float = 1e-3) -> int:
    """Side in input pixels of the region that drives a layer's centre position.

    Measured, not derived from the architecture: the gradient of the centre
    position (summed over channels) with respect to a random input, thresholded
    at `threshold` of its peak. Works for any module graph.
    """
    if layer.height == 1 and layer.width == 1:
        return input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, input_size, input_size, generator=gen).to(device).requires_grad_(True)
    with torch.enable_grad(), Capture(model, [layer.name], stop=True) as cap:
        act = cap.run(x)[layer.name]
        act[0, :, layer.height // 2, layer.width // 2].sum().backward()
    g = x.grad.abs().sum(dim=(0, 1))
    rows, cols = torch.nonzero(g > g.max() * threshold, as_tuple=True)
    if rows.numel() == 0:
        return input_size
    side = max(rows.max() - rows.min(), cols.max() - cols.min()).item() + 1
    return int(min(input_size, side))
