"""Image parameterization: a Fourier spectrum with 1/f scaling and decorrelated colour.

Optimizing Fourier coefficients scaled by 1/f instead of pixels evens out the
gradient across frequencies, so the optimizer does not fill the image with
high-frequency noise first. Colour is optimized in a decorrelated space
(the square root of the ImageNet colour covariance) and squashed to [0, 1] by
a sigmoid. These are the published Lucid recipe's choices.
"""

from __future__ import annotations

import hashlib

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
    return torch.sigmoid(recorrelate(image, matrix))


# How far inside (0, 1) `spectrum_of` moves a pixel before inverting the sigmoid: a black or white pixel
# has no finite logit, and a quarter of a grey level rounds back to the same uint8 value.
SATURATION_MARGIN = 0.25 / 255


def spectrum_of(images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The coefficients [B, 3, S, S//2+1, 2] that `spectrum_to_rgb` maps to `images` [B, 3, S, S] in [0, 1].

    `spectrum_to_rgb` inverted step by step (logit, decorrelated colour, Fourier transform, 1/f scale),
    so an optimization can start from a photo in the Lucid parameterization: it starts exactly at the
    photo (within SATURATION_MARGIN).
    """
    size = images.shape[-1]
    matrix = COLOR_SQRT.to(images.device) / COLOR_SQRT.norm(dim=0).max()
    logits = torch.logit(images.float().clamp(SATURATION_MARGIN, 1 - SATURATION_MARGIN))
    decorrelated = recorrelate(logits, torch.linalg.inv(matrix)) * FOURIER_DIVISOR
    coeffs = torch.fft.rfft2(decorrelated, s=(size, size), norm="ortho") / scale
    return torch.view_as_real(coeffs).clone()


def recorrelate(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Each pixel's colour [B, 3, H, W] times `matrix` [3, 3] (out_d = sum_c matrix[d, c] in_c).

    A batched matrix product over flattened pixels: three times faster than the same einsum on a CPU.
    """
    return (matrix @ image.flatten(2)).view_as(image)
