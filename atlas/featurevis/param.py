"""Image parameterization: a Fourier spectrum with 1/f scaling and decorrelated colour.

Optimizing Fourier coefficients scaled by 1/f instead of pixels evens out the
gradient across frequencies, so the optimizer does not fill the image with
high-frequency noise first. Colour is optimized in a decorrelated space
(the square root of the ImageNet colour covariance) and squashed to [0, 1] by
a sigmoid. These are the published Lucid recipe's choices.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch

# Square root of ImageNet's colour covariance, the Lucid recipe's constant.
COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
FOURIER_DIVISOR = 4.0  # keeps the initial image's contrast low (Lucid's "magic" 4)


def unit_seed(model: str, layer: str, channel: int, base: int = 0, view: str = "channel") -> int:
    """A seed that depends only on (model, layer, channel, view, base): never on batch or process."""
    digest = hashlib.sha256(f"{base}|{model}|{layer}|{channel}|{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def frequency_scale(size: int, decay: float = 1.0) -> torch.Tensor:
    """1 / max(f, 1/size)^decay for every coefficient of an rfft2 of a size x size image."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    freq = torch.sqrt(fx * fx + fy * fy)
    return 1.0 / torch.clamp(freq, min=1.0 / size) ** decay


def init_spectrum(seeds: list[int], size: int, std: float = 0.01) -> torch.Tensor:
    """Random Fourier coefficients [B, 3, size, size//2+1, 2], each image from its own seed."""
    shape = (3, size, size // 2 + 1, 2)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) * std
                        for s in seeds])


def spectrum_to_rgb(spectrum: torch.Tensor, size: int, scale: torch.Tensor) -> torch.Tensor:
    """Maps coefficients to images in [0, 1], shaped [B, 3, size, size]."""
    coeffs = torch.view_as_complex(spectrum.contiguous()) * scale
    image = torch.fft.irfft2(coeffs, s=(size, size), norm="ortho") / FOURIER_DIVISOR
    matrix = COLOR_SQRT.to(image.device) / COLOR_SQRT.norm(dim=0).max()
    image = torch.einsum("bchw,dc->bdhw", image, matrix)
    return torch.sigmoid(image)


# --- phase-only parameterization (MACO, Fel et al. 2023) ---
# The Fourier magnitude is fixed to that of natural photos and only the phase is
# optimized, so every render keeps a natural-image spectrum; this keeps deep
# layers from collapsing into high-frequency noise.

@functools.lru_cache(maxsize=8)
def natural_magnitude(size: int) -> torch.Tensor:
    """Mean |rfft2| per colour channel of the embedded sample photos at size x size: [3, size, size//2+1]."""
    from atlas.dataset.images import decode, sample_images
    from atlas.models import Preprocess
    pre = Preprocess(size=size, crop_pct=1.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    photos = [p for p, _ in (decode(r.path, pre) for r in sample_images()) if p is not None]
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255.0
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return torch.fft.rfft2(x, norm="ortho").abs().mean(0)


def init_phase(seeds: list[int], size: int) -> torch.Tensor:
    """Uniform random phases [B, 3, size, size//2+1], each image from its own seed."""
    shape = (3, size, size // 2 + 1)
    return torch.stack([(torch.rand(shape, generator=torch.Generator().manual_seed(s)) * 2 - 1) * math.pi
                        for s in seeds])


def phase_to_rgb(phase: torch.Tensor, size: int, magnitude: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from phases with the fixed natural magnitude, standardized per image."""
    spectrum = torch.polar(magnitude.expand_as(phase), phase)
    image = torch.fft.irfft2(spectrum, s=(size, size), norm="ortho")
    image = (image - image.mean(dim=(1, 2, 3), keepdim=True)) / (image.std(dim=(1, 2, 3), keepdim=True) + 1e-8)
    return torch.sigmoid(image)
