"""Attribution benchmark: Atlas against Captum 0.9 on the same model, images and targets.

Integrated Gradients (50 steps) and SmoothGrad (50 samples) are timed in both
libraries; Captum runs twice, with its defaults (every sample in one batch)
and with its batching option (`internal_batch_size`, `nt_samples_batch_size`)
set to the chunk Atlas uses, and each speedup is taken against the faster of
the two. Guided Backprop and Grad-CAM are compared for agreement only.

Settings aligned so the definitions coincide: the same black baseline tensor
and Gauss-Legendre points for IG (Atlas's automatic step increase is off, so
both evaluate 50 points); for SmoothGrad, Atlas replays the exact noise
Captum draws (same seed, same draw order), so both average the same 50
gradients; Saliency with abs=False; Grad-CAM on the same layer with its ReLU.
Captum receives the batch as users usually hold it (contiguous NCHW); Atlas
switches every batch to channels-last memory itself. The time Captum takes
with a channels-last batch is printed too.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Callable

import numpy as np
import torch

from atlas import models
from atlas.attribution.base import InputSpace
from atlas.attribution.cam import GradCAM, default_cam_layer
from atlas.attribution.gradients import GuidedBackprop, SmoothGrad
from atlas.attribution.paths import IntegratedGradients
from atlas.bench import attribution_accuracy as to_accuracy
from atlas.bench.common import sync
from atlas.dataset.images import decode, sample_images
from atlas.devices import resolve_device
from atlas.errors import AtlasError

STEPS = SAMPLES = 50  # the settings: IG with 50 steps, SmoothGrad with 50 samples
NOISE = 0.15  # SmoothGrad noise level, as a fraction of the input range


def import_captum():
    try:
        import captum.attr as captum_attr
    except ImportError:
        raise AtlasError("the attribution benchmark needs Captum: pip install 'captum==0.9.0'") from None
    return captum_attr


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest absolute value of Captum's map."""
    ours, theirs = ours.detach().float(), theirs.detach().float().reshape(ours.shape)
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


class ReplayedSmoothGrad(SmoothGrad):
    """Atlas's SmoothGrad fed the noise Captum's NoiseTunnel draws for the same seed."""

    def __init__(self, *args, stdev: float, captum_seed: int, partition: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stdev, self.captum_seed, self.partition = stdev, captum_seed, partition

    def noise_for(self, x: torch.Tensor, i: int) -> torch.Tensor:
        # Captum draws torch.normal(0, stdev) of [B * part, ...] per partition from the global RNG
        gen = torch.Generator().manual_seed(self.captum_seed)
        b = x.shape[0]
        draws, left = [], self.samples
        while left > 0:
            part = min(self.partition, left)
            noise = torch.normal(0.0, torch.full((b * part, *x.shape[1:]), self.stdev), generator=gen)
            draws.append(noise.view(b, part, *x.shape[1:])[i])
            left -= part
        return torch.cat(draws).to(x.device, x.dtype)


def _inputs(loaded: models.LoadedModel, n: int, device: torch.device) -> torch.Tensor:
    pixels = np.stack([decode(r.path, loaded.preprocess)[0] for r in sample_images()[:n]])
    return loaded.preprocess.from_uint8(pixels).to(device).contiguous()  # NCHW, as Captum users hold it


def run(model: str = "resnet50", weights: str = models.RANDOM, device: str = "cpu", images: int = 1,
        chunk: int = 10, accuracy_images: int = 8) -> dict:
    """Times and compares both libraries; returns the ratios and the largest relative difference,
    then the times to accuracy of the adaptive rules over `accuracy_images` photos (0: skipped)."""
    captum = import_captum()
    warnings.filterwarnings("ignore", module=r"captum\.")  # its notes on hooks and requires_grad
    dev = resolve_device(device)
    loaded = models.load(model, weights).to(dev)
    net, space = loaded.model, InputSpace.of(loaded.preprocess)
    x = _inputs(loaded, images, dev)
    with torch.no_grad():
        target = net(x).argmax(1)
    print(f"{model} ({loaded.weights_id}), {images} image(s) of {loaded.input_size} px, chunk {chunk}, {dev}",
          flush=True)
    ig = _race("integrated gradients", *_ig_pair(captum, net, space, x, target, chunk), x, chunk)
    sg = _race("smoothgrad", *_sg_pair(captum, net, space, x, target, chunk), x, chunk)
    # agreement in float64: what remains is a difference of definitions, not of summation order
    net64, x64 = copy.deepcopy(net).double(), x.double()
    diffs = {}
    for name, pair in (("integrated_gradients", _ig_pair), ("smoothgrad", _sg_pair)):
        ours, theirs = pair(captum, net64, space, x64, target, chunk)
        diffs[name] = rel_diff(ours(), theirs(x64, chunk)())
    diffs.update(_agreement_only(captum, net64, space, x64, target, loaded.input_size))
    print("max relative difference to Captum in float64: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
    out = {"ig_speedup_vs_captum": ig, "smoothgrad_speedup_vs_captum": sg,
           "max_rel_diff_vs_captum": max(diffs.values())}
    if accuracy_images:
        xa = _inputs(loaded, accuracy_images, dev)
        with torch.no_grad():
            ta = net(xa).argmax(1)
        print(f"time to accuracy: {accuracy_images} image(s)", flush=True)
        out["to_accuracy"] = to_accuracy.run(captum, net, space, xa, ta, chunk, NOISE, timed)
    return out


def _ig_pair(captum, net, space, x, target, chunk):
    """Atlas's IG and a Captum run of the same definition: black baseline, 50 Gauss-Legendre points."""
    ours = IntegratedGradients(net, space, chunk, steps=STEPS, baseline="black", tolerance=float("inf"))
    baseline = space.lo(x).expand_as(x)
    theirs = captum.IntegratedGradients(net)

    def captum_run(xx, batch):
        return lambda: theirs.attribute(xx, baselines=baseline.contiguous(memory_format=_layout(xx)),
                                        target=target, n_steps=STEPS, method="gausslegendre",
                                        internal_batch_size=batch)
    return (lambda: ours.attribute(x, target)), captum_run


def _sg_pair(captum, net, space, x, target, chunk):
    """Atlas's SmoothGrad replaying the noise of Captum's run with `chunk` samples per partition."""
    stdev, seed = NOISE * float(space.range(x).mean()), 0
    theirs = captum.NoiseTunnel(captum.Saliency(net))
    ours = ReplayedSmoothGrad(net, space, chunk, samples=SAMPLES, stdev=stdev, captum_seed=seed, partition=chunk)

    def captum_run(xx, batch):
        def go():
            torch.manual_seed(seed)
            return theirs.attribute(xx, nt_type="smoothgrad", nt_samples=SAMPLES, stdevs=stdev,
                                    nt_samples_batch_size=batch, target=target, abs=False)
        return go
    return (lambda: ours.attribute(x, target)), captum_run


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _best_of(fn: Callable[[], torch.Tensor], repeats: int = 2) -> tuple[torch.Tensor, float]:
    runs = [timed(fn) for _ in range(repeats)]
    return runs[0][0], min(t for _, t in runs)


def _race(label, ours_fn, captum_run, x, chunk) -> float:
    """Times Atlas and Captum with its defaults and with its batch option; returns the speedup
    against the faster of the two. Captum on a channels-last batch is timed for reference."""
    ours_fn()  # warm-up: allocator and kernels, shared by both libraries
    ours_map, t_ours = _best_of(ours_fn)
    times = {}
    for name, batch in (("defaults", None), (f"batch {chunk}", chunk)):
        theirs, times[name] = _best_of(captum_run(x, batch))
    _, t_cl = _best_of(captum_run(x.contiguous(memory_format=torch.channels_last), chunk))
    print(f"{label}: atlas {t_ours:.2f} s; captum " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
          + f"; captum given a channels-last batch {t_cl:.2f} s (atlas {t_cl / t_ours:.2f}x that); "
          f"float32 difference {rel_diff(ours_map, theirs):.1e}", flush=True)
    return min(times.values()) / t_ours


def _agreement_only(captum, net, space, x, target, input_size) -> dict[str, float]:
    gbp = GuidedBackprop(net, space).attribute(x, target)
    layer = default_cam_layer(net, input_size)
    cam = GradCAM(net, space, layer=layer, input_size=input_size)
    theirs_cam = captum.LayerGradCam(net, dict(net.named_modules())[layer]).attribute(
        x, target=target, relu_attributions=True)
    return {"guided_backprop": rel_diff(gbp, captum.GuidedBackprop(net).attribute(x, target=target)),
            f"grad_cam ({layer})": rel_diff(cam.layer_maps(x, target), theirs_cam)}
