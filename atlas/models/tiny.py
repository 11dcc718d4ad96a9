"""Tiny built-in models, loadable as `atlas:NAME`.

They run an end-to-end build in seconds on a CPU, so tests and demos use them.
Their weights are fixed by a seed, so results are the same on every machine.
They deliberately contain what trips up activation capture: in-place ReLUs,
a module called more than once, and a residual block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from atlas.models.preprocess import Preprocess

# name -> factory returning (model, preprocessing, class names); loaded as `atlas:<name>`
TINY: dict[str, Callable[[], tuple[nn.Module, Preprocess, list[str]]]] = {}


def register_tiny(name: str):
    """Registers a tiny built-in model factory as `atlas:<name>` (as timm registers its test models)."""
    def wrap(factory):
        TINY[name] = factory
        return factory
    return wrap


class Block(nn.Module):
    """A residual block that calls its one ReLU twice, as torchvision's Bottleneck does."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        return self.relu(self.conv2(out) + x)


class TinyConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.block = Block(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.block(self.relu2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def seeded_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initializes every parameter from one seed, independent of global RNG state."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            if name.endswith("bias"):
                p.mul_(0.1)
    return model


@register_tiny("tiny_convnet")
def tiny_convnet():
    model = seeded_init(TinyConvNet())
    pre = Preprocess(size=32, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return model, pre, [f"class {i}" for i in range(10)]


class ColorProbe(nn.Module):
    """Hand-set weights: channel c of `probe` is colour channel c of the pixel, exactly.

    With mean 0 and std 1 preprocessing, the input is the pixel value / 255, so
    every activation of this model is known before running it.
    """

    def __init__(self):
        super().__init__()
        self.probe = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.probe.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.probe.bias.zero_()
            self.fc.weight.copy_(torch.eye(3))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.probe(x).mean(dim=(2, 3)))


@register_tiny("color_probe")
def color_probe():
    pre = Preprocess(size=16, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return ColorProbe(), pre, ["red", "green", "blue"]


CONCEPT_COLOURS = ("red", "green", "blue", "yellow", "cyan", "grey")


class ConceptProbe(nn.Module):
    """Hand-set weights for labelling: `units` reads the pixel's colour (inputs are pixel / 255).

    Unit 0 is red minus green minus blue: it fires on red images only. Unit 1 is red plus blue
    minus twice green: red and blue images excite it alike, and nothing else does, so its top
    images hold two unrelated colours. Unit 2 is green minus red minus blue. The classifier's input (the embedding)
    is the image's mean colour, which tells red images from blue ones.
    """

    def __init__(self):
        super().__init__()
        self.units = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, len(CONCEPT_COLOURS))
        with torch.no_grad():
            self.units.weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [1.0, -2.0, 1.0], [-1.0, 1.0, -1.0]]).view(3, 3, 1, 1))
            self.units.bias.zero_()
            self.fc.weight.copy_(torch.randn(len(CONCEPT_COLOURS), 3, generator=torch.Generator().manual_seed(0)))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.units(x)  # read by hooks only: the classes follow from the mean colour alone
        return self.fc(x.mean(dim=(2, 3)))


@register_tiny("concept_probe")
def concept_probe():
    pre = Preprocess(size=16, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return ConceptProbe(), pre, list(CONCEPT_COLOURS)


@register_tiny("tiny_vit")
def tiny_vit():
    """torchvision's VisionTransformer at a toy size: 32 px inputs only (it refuses any other side),
    8 px patches (a 4 x 4 grid and a class token), 2 encoder blocks of width 16; seeded weights, the
    head drawn too (torchvision initializes it to zero, which makes every logit a constant)."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.25)
    pre = Preprocess(size=32, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return model, pre, [f"class {i}" for i in range(10)]
