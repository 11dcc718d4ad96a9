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
from atlas.bench.common import sync
from atlas.errors import AtlasError
from atlas.images import decode, sample_images
from atlas.pipeline import resolve_device

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
        chunk: int = 10) -> dict:
    """Times and compares both libraries; returns the ratios and the largest relative difference."""
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
    ig, ig_diff = _integrated_gradients(captum, net, space, x, target, chunk)
    sg, sg_diff = _smoothgrad(captum, net, space, x, target, chunk)
    diffs = {"integrated_gradients": ig_diff, "smoothgrad": sg_diff,
             **_agreement_only(captum, net, space, x, target, loaded.input_size)}
    for name, d in diffs.items():
        print(f"  {name}: max relative difference {d:.2e}", flush=True)
    return {"ig_speedup_vs_captum": ig, "smoothgrad_speedup_vs_captum": sg,
            "max_rel_diff_vs_captum": max(diffs.values())}


def _integrated_gradients(captum, net, space, x, target, chunk) -> tuple[float, float]:
    ours = IntegratedGradients(net, space, chunk, steps=STEPS, baseline="black", tolerance=float("inf"))
    baseline = space.lo(x).expand_as(x).contiguous()
    theirs = captum.IntegratedGradients(net)

    def captum_run(xx, batch):
        return lambda: theirs.attribute(xx, baselines=baseline, target=target, n_steps=STEPS,
                                        method="gausslegendre", internal_batch_size=batch)
    ours.attribute(x[:1], target[:1])  # warm-up (allocator, kernels) for both
    return _race("integrated gradients", lambda: ours.attribute(x, target), captum_run, x, chunk)


def _smoothgrad(captum, net, space, x, target, chunk) -> tuple[float, float]:
    stdev = NOISE * float(space.range(x).mean())
    seed = 0
    theirs = captum.NoiseTunnel(captum.Saliency(net))

    def captum_run(xx, batch):
        def go():
            torch.manual_seed(seed)
            return theirs.attribute(xx, nt_type="smoothgrad", nt_samples=SAMPLES, stdevs=stdev,
                                    nt_samples_batch_size=batch, target=target, abs=False)
        return go

    def ours_run(partition):
        method = ReplayedSmoothGrad(net, space, chunk, samples=SAMPLES, stdev=stdev, captum_seed=seed,
                                    partition=partition)
        return method.attribute(x, target)
    best_captum_batch = {}
    speed, _ = _race("smoothgrad", lambda: ours_run(chunk), captum_run, x, chunk, best_captum_batch)
    # agreement: the noise of the Captum run being compared (its partition size decides the draws)
    _, theirs_map = best_captum_batch["map"]
    diff = rel_diff(ours_run(best_captum_batch["batch"] or SAMPLES), theirs_map)
    return speed, diff


def _race(label, ours_fn, captum_run, x, chunk, keep: dict | None = None) -> tuple[float, float]:
    """Times Atlas and Captum (defaults, tuned batch, channels-last); returns (speedup, rel. diff)."""
    ours_map, t_ours = timed(ours_fn)
    results = {}
    for name, batch in (("defaults", None), (f"internal batch {chunk}", chunk)):
        results[name] = (batch, *timed(captum_run(x, batch)))
    cl = x.contiguous(memory_format=torch.channels_last)
    _, t_cl = timed(captum_run(cl, chunk))
    best = min(results, key=lambda k: results[k][2])
    batch, theirs_map, t_best = results[best]
    print(f"{label}: atlas {t_ours:.2f} s; captum " + ", ".join(f"{k} {v[2]:.2f} s" for k, v in results.items())
          + f" (channels-last batch: {t_cl:.2f} s)", flush=True)
    if keep is not None:
        keep.update(batch=batch, map=(batch, theirs_map))
    return t_best / t_ours, rel_diff(ours_map, theirs_map)


def _agreement_only(captum, net, space, x, target, input_size) -> dict[str, float]:
    gbp = GuidedBackprop(net, space).attribute(x, target)
    layer = default_cam_layer(net, input_size)
    cam = GradCAM(net, space, layer=layer, input_size=input_size)
    theirs_cam = captum.LayerGradCam(net, dict(net.named_modules())[layer]).attribute(
        x, target=target, relu_attributions=True)
    return {"guided_backprop": rel_diff(gbp, captum.GuidedBackprop(net).attribute(x, target=target)),
            f"grad_cam ({layer})": rel_diff(cam.layer_maps(x, target), theirs_cam)}
