"""The batched feature-visualization renderer.

Many images are optimized in one batch, each with its own objective and its
own seed; model weights stay frozen, only the images' Fourier coefficients get
gradients. Because parameters, transforms and Adam's state are all per image,
and the model runs in eval mode, an image comes out the same whether it is
rendered alone or in a batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from atlas.featurevis.objectives import Objective
from atlas.featurevis.param import (frequency_scale, init_phase, init_spectrum, natural_magnitude,
                                    phase_to_rgb, spectrum_to_rgb)
from atlas.featurevis.redirect import redirected_relus
from atlas.featurevis.transforms import Robustness, random_affine
from atlas.layers import Capture
from atlas.models import Preprocess


@dataclass(frozen=True)
class RenderSettings:
    size: int = 128  # image side (pixels)
    steps: int = 512  # Adam steps
    lr: float = 0.05  # Adam learning rate
    loss_points: int = 32  # objective samples kept for the loss curve
    redirect_steps: int = 16  # first steps with the redirected ReLU gradient (Lucid: 16)
    param: str = "fourier"  # "fourier" (Lucid) or "phase" (MACO: phase only, natural magnitude)
    robustness: Robustness = field(default_factory=Robustness)

    def provenance(self) -> dict:
        fourier = self.param == "fourier"
        return {"size": self.size, "steps": self.steps, "lr": self.lr if fourier else PHASE_LR,
                "optimizer": "Adam" if fourier else "NAdam",
                "parameterization": "fourier 1/f, decorrelated colour, sigmoid" if fourier else
                "fourier phase only, magnitude of natural photos, standardized, sigmoid",
                "transforms": self.robustness.describe(), "redirected_relu_steps": self.redirect_steps}


PHASE_LR = 1.0  # MACO's NAdam learning rate for phases


@dataclass
class Rendered:
    images: np.ndarray  # uint8 [B, S, S, 3]
    objective: np.ndarray  # float32 [B], reached by the final image without transforms
    loss: np.ndarray  # float32 [B, P], objective during optimization
    finite: np.ndarray  # bool [B], False where the objective became NaN or infinite
    acts: dict[str, torch.Tensor]  # the objective's layers on the final images, without transforms


def _checkpoints(steps: int, points: int) -> dict[int, int]:
    at = np.unique(np.linspace(0, steps - 1, max(1, min(points, steps))).round().astype(int))
    return {int(s): i for i, s in enumerate(at)}


def render(model: nn.Module, preprocess: Preprocess, objective: Objective, seeds: list[int],
           settings: RenderSettings, device: torch.device | str = "cpu") -> Rendered:
    """Optimizes one image per seed to maximize `objective`.

    Args:
        model: the model, in eval mode with frozen parameters, on `device`.
        preprocess: the model's normalization.
        objective: per-image objective; its batch is len(seeds).
        seeds: one seed per image; it fixes the start image and the transforms.
        settings: size, steps, learning rate, robustness.

    Returns:
        The images, their final objective values and loss curves.
    """
    params, to_rgb, optimizer = _parameterize(settings, seeds, device)
    gens = [torch.Generator().manual_seed(s ^ 0x5EED5EED) for s in seeds]
    marks = _checkpoints(settings.steps, settings.loss_points)
    loss = np.zeros((len(seeds), len(marks)), np.float32)
    device = torch.device(device)
    with Capture(model, sorted(objective.layers), stop=True, fn=_as_float) as capture:
        for step in range(settings.steps):
            image = to_rgb(params)
            view = random_affine(image, gens, settings.robustness)
            with redirected_relus(model, step < settings.redirect_steps), _autocast(device):
                values = objective(capture.run(_model_input(preprocess, view)))
            optimizer.zero_grad(set_to_none=True)
            (-values.sum()).backward()
            optimizer.step()
            if step in marks:
                loss[:, marks[step]] = values.detach().float().cpu().numpy()
        with torch.no_grad(), _autocast(device):
            image = to_rgb(params)
            acts = capture.run(_model_input(preprocess, image))
            final = objective(acts).float().cpu().numpy()
    pixels = (image.detach().permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()
    finite = np.isfinite(final) & np.isfinite(loss).all(axis=1)
    return Rendered(pixels, final.astype(np.float32), loss, finite, acts)


def _parameterize(settings: RenderSettings, seeds: list[int], device):
    """The optimized tensor, the function that maps it to images in [0, 1], and its optimizer."""
    size = settings.size
    if settings.param == "fourier":
        spectrum = init_spectrum(seeds, size).to(device).requires_grad_(True)
        scale = frequency_scale(size).to(device)
        return spectrum, lambda p: spectrum_to_rgb(p, size, scale), torch.optim.Adam([spectrum], lr=settings.lr)
    if settings.param == "phase":
        phase = init_phase(seeds, size).to(device).requires_grad_(True)
        magnitude = natural_magnitude(size).to(device)
        return phase, lambda p: phase_to_rgb(p, size, magnitude), torch.optim.NAdam([phase], lr=PHASE_LR)
    raise ValueError(f"param: expected 'fourier' or 'phase', got {settings.param!r}")


def _as_float(act: torch.Tensor) -> torch.Tensor:
    """Objectives are computed in float32, also when the model runs in bfloat16."""
    return act.float() if act.dtype != torch.float32 else act.clone()


def _model_input(preprocess: Preprocess, images01: torch.Tensor) -> torch.Tensor:
    # channels-last is the faster layout for convolutions on CPUs and on tensor-core GPUs
    return preprocess.normalize(images01).contiguous(memory_format=torch.channels_last)


def _autocast(device: torch.device):
    """bfloat16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
