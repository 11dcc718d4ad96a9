"""Class activation maps: Grad-CAM and Guided Grad-CAM (Selvaraju et al. 2017).

Grad-CAM weighs the channels of one feature map A by the spatial mean of the
target logit's gradient with respect to them: ReLU(sum_k alpha_k A_k). The map
has the layer's resolution; `attribute` upsamples it to the input.

The layer's output is captured with a forward hook that hands the rest of the
network a clone of it. The clone is differentiable, so the gradient reaches
the captured tensor, and an in-place op after the layer (`ReLU(inplace=True)`
after a convolution) modifies the clone, not the values Grad-CAM weighs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atlas.attribution.base import Attribution, Explanation, InputSpace
from atlas.attribution.gradients import GuidedBackprop
from atlas.errors import AtlasError
from atlas.layers import TOKENS, LayerInfo, as_bchw, default_selection, discover, is_channels_last, parse_layer_name

# Modules whose output is never the layer Grad-CAM wants: pooling modules
# (VGG's adaptive pool to 7x7 is spatial but only resamples `features`), and
# modules that hand on their input unchanged (their input's producer is named).
_NOT_CAM_LAYERS = ("Identity", "Dropout", "Dropout2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d",
                   "SelectAdaptivePool2d", "AdaptiveAvgMaxPool2d", "AdaptiveCatAvgMaxPool2d")


def default_cam_layer(model: nn.Module, input_size: int) -> str:
    """The last spatial feature map before the classifier's global pooling.

    ResNet gives "layer4", timm EfficientNet "bn2" (the activated head),
    torchvision EfficientNet, MobileNet, VGG and DenseNet "features", GoogLeNet
    "inception5b", ConvNeXt its stages, Swin its `permute` (the last stage's
    normalized map, channels first). Modules complete after their children,
    so the last spatial output in completion order is the outermost module
    producing it. One forward pass of one zero image.

    A vision transformer (token layers) gets the output of the last encoder
    block's first LayerNorm (torchvision `encoder.layers.encoder_layer_11.ln_1`,
    timm `blocks.11.norm1`), seen as the patch grid: the last block's own output
    is useless, since the classifier reads only the class token, so the
    gradient reaches no patch token there; at the last block's input the
    gradient reaches the patches through the class token's attention to them,
    which gives a map that varies with the image and the class (the usual
    placement of Grad-CAM in transformers).

    Args:
        model: the classifier.
        input_size: side of the square input.

    Returns:
        A layer name as `layers.discover` writes it.

    Raises:
        AtlasError: no 4-D feature map larger than 1 x 1, and no transformer block.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    layers = discover(model, input_size, device)
    if any(l.layout == TOKENS for l in layers):
        return _transformer_cam_layer(model, layers)
    last = max((i for i, l in enumerate(layers) if _is_spatial(l)), default=None)
    if last is None:
        raise AtlasError(f"grad_cam: {type(model).__name__} has no spatial feature map before its "
                         "classifier; pass layer= the name of a convolutional layer "
                         "(`atlas layers MODEL` lists them)")
    return layers[last].name


def _transformer_cam_layer(model: nn.Module, layers: list[LayerInfo]) -> str:
    """The first LayerNorm of the last encoder block: its input, normalized."""
    blocks = [l for l in default_selection(model, layers) if l.layout == TOKENS]
    last = blocks[-1].module if blocks else None
    norm = next((l for l in layers if last and l.module.startswith(last + ".") and l.call == 0
                 and "LayerNorm" in l.kind and l.layout == TOKENS), None)
    if norm is None:
        raise AtlasError(f"grad_cam: {type(model).__name__} has token layers but no encoder block "
                         "with a LayerNorm; pass layer= the layer to weigh (`atlas layers MODEL` lists them)")
    return norm.name


def _is_spatial(layer: LayerInfo) -> bool:
    return layer.height > 1 and layer.width > 1 and layer.kind not in _NOT_CAM_LAYERS


class GradCAM(Attribution):
    """Grad-CAM: channels of one layer weighed by their mean gradient.

    Args:
        model: the classifier.
        space: its input normalization.
        batch: images per forward pass.
        layer: the layer to weigh (`module` or `module@call`); default
            `default_cam_layer`, found at the first call if `input_size` is None.
        input_size: side of the input, to find the default layer now.
    """

    name = "grad_cam"
    needs_layer = True

    def __init__(self, model: nn.Module, space: InputSpace | None = None, batch: int = 64,
                 layer: str | None = None, input_size: int | None = None):
        super().__init__(model, space, batch)
        if layer is None and input_size is not None:
            layer = default_cam_layer(model, input_size)
        self.layer = layer

    @property
    def params(self):
        return {**super().params, "layer": self.layer}

    def layer_maps(self, inputs: torch.Tensor, target: torch.Tensor | int) -> torch.Tensor:
        """The class activation maps at the layer's resolution.

        Args:
            inputs: float tensor [B, 3, H, W] in the model's input space.
            target: class index per image, [B], or one int for all.

        Returns:
            ReLU(sum_k alpha_k A_k), [B, 1, h, w].
        """
        target = torch.as_tensor(target, device=inputs.device).long().reshape(-1).expand(inputs.shape[0])
        inputs = inputs.detach()
        if self.layer is None:
            self.layer = default_cam_layer(self.model, inputs.shape[-1])
        return torch.cat(self.chunked(lambda a, b: self._cam(inputs[a:b], target[a:b]), inputs.shape[0]))

    def _explain(self, inputs, target):
        return Explanation(spread(upsample(self.layer_maps(inputs, target), inputs)))

    def _cam(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        acts, grads = self._acts_and_grads(x, target)
        alpha = grads.mean(dim=(2, 3), keepdim=True)
        return F.relu((alpha * acts).sum(dim=1, keepdim=True)).detach()

    def _acts_and_grads(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output A and d logit / d A for a chunk of images."""
        with torch.enable_grad(), _LayerTap(self.model, self.layer) as tap:
            # Inputs require grad so the layer's output does even with frozen parameters.
            logits = self.model(x.detach().requires_grad_(True))
            acts = tap.tensor()
            picked = logits.gather(1, target[:, None])[:, 0]
            (grads,) = torch.autograd.grad(picked.sum(), acts, allow_unused=True)
        if grads is None:  # the target logit does not depend on the layer
            grads = torch.zeros_like(acts)
        return tap.view(acts.detach()), tap.view(grads)


class GuidedGradCAM(Attribution):
    """Guided Backprop times the upsampled Grad-CAM, per colour channel (Selvaraju et al. 2017).

    Args: as `GradCAM`.
    """

    name = "guided_grad_cam"
    needs_layer = True

    def __init__(self, model: nn.Module, space: InputSpace | None = None, batch: int = 64,
                 layer: str | None = None, input_size: int | None = None):
        super().__init__(model, space, batch)
        self.cam = GradCAM(model, space, batch, layer, input_size)
        self.guided = GuidedBackprop(model, space, batch)

    @property
    def layer(self) -> str | None:
        return self.cam.layer

    @property
    def params(self):
        return {**super().params, "layer": self.layer}

    def _explain(self, inputs, target):
        cam = upsample(self.cam.layer_maps(inputs, target), inputs)
        return Explanation(self.guided.explain(inputs, target).maps * cam)


def upsample(cam: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A layer-resolution map [B, 1, h, w] resized bilinearly to the input's [B, 1, H, W]."""
    return F.interpolate(cam, size=like.shape[-2:], mode="bilinear", align_corners=False)


def spread(cam: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] -> [B, 3, H, W] with a third on each colour, so the colours sum to the map."""
    return cam.expand(-1, 3, -1, -1) / 3


class _LayerTap:
    """Keeps the output of one call of one module and feeds the network a clone of it.

    Token sequences and channels-last maps are weighed as `layers.as_bchw` shows them: the patch grid.
    """

    def __init__(self, model: nn.Module, layer: str):
        self.module_name, self.call = parse_layer_name(layer)
        modules = dict(model.named_modules())
        if self.module_name not in modules:
            raise AtlasError(f"grad_cam: no module named {self.module_name!r} in {type(model).__name__}; "
                             "`atlas layers MODEL` lists the layers")
        self.layer, self.module = layer, modules[self.module_name]
        self.channels_last = is_channels_last(model, layer, self.module)
        self.calls, self.kept, self.handle = 0, None, None

    def __enter__(self) -> _LayerTap:
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _hook(self, _module, _inputs, output):
        call, self.calls = self.calls, self.calls + 1
        if call != self.call:
            return None
        view = self.view(output) if isinstance(output, torch.Tensor) else None
        if view is None or view.shape[-2] * view.shape[-1] < 2:
            raise AtlasError(f"grad_cam: layer {self.layer} returns "
                             f"{getattr(output, 'shape', type(output).__name__)}, not a feature map "
                             "(a [B, C, H, W] map, channels-last map or token sequence)")
        self.kept = output
        return output.clone()

    def view(self, t: torch.Tensor) -> torch.Tensor | None:
        """The layer's output (or its gradient) as [B, C, H, W]."""
        return as_bchw(t, self.channels_last)

    def tensor(self) -> torch.Tensor:
        """The captured output as the module returned it, after the forward pass."""
        if self.kept is None:
            raise AtlasError(f"grad_cam: layer {self.layer} was not called in the forward pass")
        return self.kept
