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
import torch.nn.functional as F
from torch import nn

from atlas.featurevis.objectives import START, Objective, on_start
from atlas.featurevis import maco
from atlas.featurevis.param import frequency_scale, init_spectrum, spectrum_of, spectrum_to_rgb
from atlas.featurevis.redirect import redirected_relus
from atlas.featurevis.transforms import Robustness, random_affine
from atlas.layers import Capture
from atlas.models import Preprocess


@dataclass(frozen=True)
class Plateau:
    """Per-image stopping: an image leaves the batch once its objective has stopped rising.

    Every `window` steps, the slope of the image's objective over its last two windows (a least-squares
    line through the per-step values, which the random transforms make noisy) is extrapolated over the
    steps left; where that projected gain is below `tol` of the objective's recent level, the image is
    done. Its picture is the one it had then; the batch goes on without it, so its forward and backward
    passes are saved. Growth that slows (as Adam's on these objectives does) makes the projection an
    overestimate, so a stopped image ends within about `tol` of where the full run would take it.
    """

    window: int = 16  # steps per window
    tol: float = 0.01  # the projected gain that is too small to go on for, as a fraction of the objective

    def done(self, trace: torch.Tensor, step: int, steps: int, after: int) -> torch.Tensor:
        """Which images have plateaued, from the per-step values `trace` [B, step + 1] (bool [B]); only at
        the end of a window, and only once two windows have passed since step `after`."""
        seen = step + 1
        if seen % self.window or seen - after < 2 * self.window:
            return torch.zeros(trace.shape[0], dtype=torch.bool)
        recent = trace[:, seen - 2 * self.window:seen].double()
        t = torch.arange(2 * self.window, dtype=torch.float64) - (2 * self.window - 1) / 2
        slope = (recent * t).sum(1) / (t * t).sum()
        level = recent[:, self.window:].mean(1).abs()
        return slope * (steps - seen) <= self.tol * level


@dataclass(frozen=True)
class RenderSettings:
    size: int = 128  # image side (pixels)
    steps: int = 512  # Adam steps
    lr: float = 0.05  # Adam learning rate
    loss_points: int = 32  # objective samples kept for the loss curve
    redirect_steps: int = 16  # first steps with the redirected ReLU gradient (Lucid: 16)
    param: str = "fourier"  # "fourier" (Lucid) or "phase" (MACO: phase only, natural magnitude, crops)
    robustness: Robustness = field(default_factory=Robustness)
    crops: maco.Crops = field(default_factory=maco.Crops)  # MACO's transforms (param "phase")
    keep_canvas: bool = False  # MACO: return the whole canvas instead of resizing it to `size` (benchmarks)
    # Lucid recipe: the model sees the transformed frame resized up to its input size, as Lucent feeds it 224 px,
    # so a unit is driven at the scale of the photos it learned from (and of its dataset examples)
    upsample: bool = True
    # coarse to fine: the first steps the model sees the frame at its own side, before `upsample` takes over
    coarse_steps: int = 0
    plateau: Plateau | None = None  # per-image stopping (separable objectives only); None: every image runs all steps

    @property
    def view(self) -> int:
        """The side of what the model sees: Lucid's transformed frame; a MACO crop is resized to it."""
        return self.robustness.frame(self.size)

    @property
    def canvas(self) -> int:
        """The side of the optimized image: `size` (Lucid), or MACO's canvas, horama's 1280 / 224 views wide
        (stored downscaled to `size`)."""
        return self.size if self.param == "fourier" else 2 * round(self.view * maco.CANVAS_PER_VIEW / 2)

    def provenance(self) -> dict:
        stop = {"stopping": "every image runs all steps" if self.plateau is None else
                f"per image, once the gain projected over the steps left is below {self.plateau.tol:g} of the "
                f"objective (slope over the last {2 * self.plateau.window} steps)"}
        if self.param == "fourier":
            view = "the frame as it is" if not self.upsample else "resized up to the model's input side" + (
                f" after {self.coarse_steps} steps at the frame's own side" if self.coarse_steps else "")
            return {"size": self.size, "steps": self.steps, "lr": self.lr, "optimizer": "Adam",
                    "parameterization": "fourier 1/f, decorrelated colour, sigmoid",
                    "transforms": self.robustness.describe(), "redirected_relu_steps": self.redirect_steps,
                    "model_view": view, **stop}
        return {**stop, "size": self.size, "canvas": self.canvas, "view": self.view, "steps": self.steps, "lr": maco.LR,
                "optimizer": "NAdam", "parameterization": "MACO: fourier phase only (standardized), magnitude of "
                "natural photos in decorrelated colour, image standardized, colour recorrelated, sigmoid",
                "transforms": self.crops.describe(), "redirected_relu_steps": self.redirect_steps,
                "alpha": "transparency: |gradient| on the image summed over steps"}


@dataclass
class Rendered:
    images: np.ndarray  # uint8 [B, S, S, 3]
    objective: np.ndarray  # float32 [B], reached by the final image without transforms
    loss: np.ndarray  # float32 [B, P], objective during optimization
    finite: np.ndarray  # bool [B], False where the objective became NaN or infinite
    acts: dict[str, torch.Tensor]  # the objective's layers on the final images, without transforms
    alpha: np.ndarray | None = None  # uint8 [B, S, S]: MACO's transparency (gradient energy), 255 the most
    steps: np.ndarray | None = None  # int32 [B]: the steps each image took (fewer where it stopped early)


def _checkpoints(steps: int, points: int) -> dict[int, int]:
    at = np.unique(np.linspace(0, steps - 1, max(1, min(points, steps))).round().astype(int))
    return {int(s): i for i, s in enumerate(at)}


def render(model: nn.Module, preprocess: Preprocess, objective: Objective, seeds: list[int],
           settings: RenderSettings, device: torch.device | str = "cpu",
           start: torch.Tensor | None = None) -> Rendered:
    """Optimizes one image per seed to maximize `objective`.

    Args:
        model: the model, in eval mode with frozen parameters, on `device`.
        preprocess: the model's normalization.
        objective: per-image objective; its batch is len(seeds).
        seeds: one seed per image; it fixes the start image (unless `start` is given) and the transforms.
        settings: size, steps, learning rate, robustness.
        start: images [B, 3, size, size] in [0, 1] to start from (the Fourier parameterization only);
            None: from random coefficients drawn from the seeds. Each step passes them through the
            same transforms as the images, for objectives that compare with them (`objectives.dot`).

    Returns:
        The images, their final objective values, loss curves and steps taken (MACO: and transparency).
    """
    start = start.to(device) if start is not None else None
    params, to_rgb, optimizer = _parameterize(settings, seeds, device, preprocess, start)
    gens = [torch.Generator().manual_seed(s ^ 0x5EED5EED) for s in seeds]
    marks = _checkpoints(settings.steps, settings.loss_points)
    loss = np.zeros((len(seeds), len(marks)), np.float32)
    device = torch.device(device)
    is_maco = settings.param == "phase"
    seen = maco.over_crops(objective, settings.crops.count) if is_maco else objective
    energy = None
    hooked = sorted(name for name in objective.layers if not name.endswith(START))
    compared = len(hooked) < len(objective.layers)  # the objective compares with the start images
    if compared and start is None:
        raise ValueError(f"objective: {objective.name!r} compares with the start images; pass `start`")
    twins = [torch.Generator().manual_seed(s ^ 0x5EED5EED) for s in seeds]  # gens' twins: the start images' draws
    start_view = None
    b = len(seeds)
    stopping = settings.plateau is not None and objective.separable
    active = torch.ones(b, dtype=torch.bool)
    taken = np.full(b, settings.steps, np.int32)
    trace = torch.zeros(b, settings.steps) if stopping else None
    last = torch.zeros(b)  # each image's latest objective, for the loss curve of a stopped one
    kept = None  # the parameters of stopped images, as they were when they stopped
    with Capture(model, hooked, stop=True, fn=_as_float) as capture:
        for step in range(settings.steps):
            image = to_rgb(params)
            if is_maco:
                image.retain_grad()
                boxes = maco.crop_boxes(gens, settings.canvas, settings.crops)
                view = _model_input(preprocess, fixed_side(maco.cut(image, boxes, settings.view,
                                                                        maco.band(settings.canvas, settings.crops)),
                                                               preprocess))
                view = view + maco.noise(view.shape, gens, settings.crops).to(view)
            else:
                fine = step >= settings.coarse_steps
                view = _model_input(preprocess, _model_side(random_affine(image, gens, settings.robustness),
                                                            preprocess, settings, fine))
                if compared:
                    start_view = _model_input(preprocess, _model_side(
                        random_affine(start, twins, settings.robustness), preprocess, settings, fine))
            rows = _rows(active, view.shape[0] // b)
            with redirected_relus(model, step < settings.redirect_steps), _autocast(device):
                values = seen(_with_start(capture, view, start_view, rows))
            optimizer.zero_grad(set_to_none=True)
            (-values[active.to(values.device)].sum()).backward()
            if is_maco:
                energy = image.grad.abs().sum(1) if energy is None else energy + image.grad.abs().sum(1)
            optimizer.step()
            now = values.detach().float().cpu()
            last = torch.where(active, now, last)
            if kept is not None:  # Adam's momentum would still move a stopped image
                with torch.no_grad():
                    params[~active.to(params.device)] = kept[~active.to(params.device)]
            if step in marks:
                loss[:, marks[step]] = last.numpy()
            if stopping:
                trace[:, step] = last
                after = max(settings.redirect_steps, settings.coarse_steps if settings.upsample else 0)
                ended = settings.plateau.done(trace, step, settings.steps, after) & active
                if ended.any():
                    kept = params.detach().clone() if kept is None else kept
                    with torch.no_grad():
                        kept[ended.to(params.device)] = params[ended.to(params.device)]
                    taken[ended.numpy()] = step + 1
                    active &= ~ended
                    if not active.any():
                        for later, column in marks.items():
                            if later > step:
                                loss[:, column] = last.numpy()
                        break
        with torch.no_grad(), _autocast(device):
            image = to_rgb(params)
            # MACO's canvas is judged on its centre crop at the crops' mean size, and stored whole at `size`
            seen_final = fixed_side(maco.cut(image, maco.centre_box(len(seeds), settings.canvas, settings.crops),
                                             settings.view), preprocess) if is_maco \
                else _model_side(image, preprocess, settings)
            if compared:
                start_view = _model_input(preprocess, _model_side(start, preprocess, settings))
            acts = _with_start(capture, _model_input(preprocess, seen_final), start_view)
            final = objective(acts).float().cpu().numpy()
    if is_maco:
        side = settings.canvas if settings.keep_canvas else settings.size
        image = _resize(image, side)
        alpha = _alpha(energy if energy is not None else torch.zeros(len(seeds), settings.canvas, settings.canvas),
                       side)
    pixels = (image.detach().permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()
    finite = np.isfinite(final) & np.isfinite(loss).all(axis=1)
    return Rendered(pixels, final.astype(np.float32), loss, finite, acts, alpha if is_maco else None, taken)


def _rows(active: torch.Tensor, per_image: int) -> torch.Tensor | None:
    """The rows of a view batch [per_image * B] (image-major blocks of B, as MACO's crop-major views) that
    belong to active images; None while every image is active."""
    if bool(active.all()):
        return None
    b = active.shape[0]
    return (torch.arange(per_image)[:, None] * b + active.nonzero()[:, 0][None]).flatten()


def _with_start(capture: Capture, view: torch.Tensor, start_view: torch.Tensor | None,
                rows: torch.Tensor | None = None) -> dict:
    """The captured activations of `view`; with `start_view` (the start images, seen alike), also theirs,
    without gradient, under each layer's `on_start` name. With `rows`, only those rows go through the
    model; the others' activations are zeros (their images have left the batch)."""
    def run(x: torch.Tensor) -> dict:
        if rows is None:
            return capture.run(x)
        index = rows.to(x.device)
        return {name: act.new_zeros((x.shape[0], *act.shape[1:])).index_copy(0, index, act)
                for name, act in capture.run(x[index]).items()}
    acts = run(view)
    if start_view is not None:
        with torch.no_grad():
            acts.update({on_start(name): act for name, act in run(start_view).items()})
    return acts


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-1] == side:
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def _model_side(frame: torch.Tensor, preprocess: Preprocess, settings: RenderSettings,
                fine: bool = True) -> torch.Tensor:
    """The Lucid recipe's frame as the model sees it: resized up to the model's input side where smaller
    and `settings.upsample` asks for it (bilinear, corners aligned, as Lucent's upsampling); not during
    the coarse steps (`fine` False)."""
    side = preprocess.size
    if preprocess.fixed:
        return fixed_side(frame, preprocess)
    if not settings.upsample or not fine or frame.shape[-1] >= side:
        return frame
    return F.interpolate(frame, size=(side, side), mode="bilinear", align_corners=True)


def fixed_side(frame: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """What a model that accepts only its own input side sees of a frame of another side: the frame
    resized to it (up bilinearly as Lucent does, down with antialiasing); any other model, the frame."""
    side = preprocess.size
    if not preprocess.fixed or frame.shape[-1] == side:
        return frame
    if frame.shape[-1] < side:
        return F.interpolate(frame, size=(side, side), mode="bilinear", align_corners=True)
    return F.interpolate(frame, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def _alpha(energy: torch.Tensor, side: int) -> np.ndarray:
    """Gradient energy [B, S, S] at the stored side, scaled so each image's 99th percentile is opaque."""
    e = _resize(energy[:, None].float(), side)[:, 0]
    top = torch.quantile(e.flatten(1), 0.99, dim=1).clamp_min(1e-12)
    return (e / top[:, None, None]).clamp(0, 1).mul(255).round().byte().cpu().numpy()


def _parameterize(settings: RenderSettings, seeds: list[int], device, preprocess: Preprocess,
                  start: torch.Tensor | None = None):
    """The optimized tensor, the function that maps it to images in [0, 1], and its optimizer."""
    size = settings.size
    if start is not None and settings.param != "fourier":
        raise ValueError(f"start: only the 'fourier' parameterization starts from images, not {settings.param!r}")
    if settings.param == "fourier":
        scale = frequency_scale(size).to(device)
        spectrum = (init_spectrum(seeds, size).to(device) if start is None
                    else spectrum_of(start, scale)).requires_grad_(True)
        return spectrum, lambda p: spectrum_to_rgb(p, size, scale), torch.optim.Adam([spectrum], lr=settings.lr)
    if settings.param == "phase":
        phase = maco.init_phase(seeds, settings.canvas).to(device).requires_grad_(True)
        magnitude = maco.magnitude(settings.canvas).to(device)
        return (phase, lambda p: maco.to_rgb(p, magnitude, preprocess.mean, preprocess.std),
                torch.optim.NAdam([phase], lr=maco.LR))
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
