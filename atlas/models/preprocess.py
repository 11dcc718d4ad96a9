"""What a loaded model carries with it: its preprocessing, class names and provenance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a photo becomes a model input: resize, centre crop, normalize."""

    size: int  # side of the square input
    crop_pct: float  # the crop covers this fraction of the resized shorter side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fixed: bool = False  # the model accepts only inputs of this side (vision transformers): resize to it

    def crop(self, image: Image.Image) -> Image.Image:
        """Resizes the shorter side to size / crop_pct and cuts the centre square."""
        short = round(self.size / self.crop_pct)
        w, h = image.size
        scale = short / min(w, h)
        image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                             Image.BICUBIC, reducing_gap=3.0)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def to_unit(self, image: Image.Image) -> np.ndarray:
        """The model's view of an RGB photo as uint8 [size, size, 3]."""
        return np.array(self.crop(image.convert("RGB")), dtype=np.uint8)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Maps images in [0, 1], shaped [B, 3, H, W], to the model's input space."""
        mean = x01.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x01.new_tensor(self.std).view(1, 3, 1, 1)
        return (x01 - mean) / std

    def from_uint8(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] pixels to a normalized float [B, 3, H, W] batch.

        The batch is channels-last in memory, the layout CPU convolutions run fastest in.
        """
        x = torch.as_tensor(np.asarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
        return self.normalize(x).contiguous(memory_format=torch.channels_last)


@dataclass
class LoadedModel:
    """A model ready for Atlas: eval mode, frozen, with what it needs around it."""

    spec: str
    name: str  # file-system-safe name used for the store and the site
    model: nn.Module
    preprocess: Preprocess
    class_names: list[str]
    weights_id: str  # where the weights came from, recorded as provenance

    @property
    def input_size(self) -> int:
        return self.preprocess.size

    def to(self, device: torch.device) -> LoadedModel:
        self.model.to(device)
        return self
