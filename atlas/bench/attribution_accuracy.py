"""Time to accuracy: Atlas's adaptive Integrated Gradients and SmoothGrad against Captum 0.9.

Integrated Gradients, accuracy = completeness: a relative error |sum of the map
- (f(x) - f(x'))| / |f(x) - f(x')| of at most 1 % per image. Captum's
Gauss-Legendre rule is fixed, so each image gets the smallest point count of
`CAPTUM_STEPS` at which Captum's own convergence delta is within 1 %, and
Captum's time is the sum over images of its run at that count (one image per
call, `internal_batch_size` = the chunk): Captum is given each image's minimal
count, found by a search that is not timed against it. Atlas runs its adaptive
rule once over all images together. Evaluations are forward + backward rows;
forward-only rows are timed but not counted (Captum's two per call for its
convergence delta, Atlas's one for f(x') of the black baseline all images share).

SmoothGrad, accuracy = Spearman rank correlation of the map summed over colour
(what the site shows) with a 200-draw map from independent noise. Captum's
NoiseTunnel draws 50 samples, one image a call in batches of the chunk (its
`nt_samples_batch_size` counts draws per image, so a call over all images
would put images x chunk rows through the model at once, far slower per row
on a CPU); Atlas's adaptive rule stops each image by its own estimate,
without the reference; both correlations are printed per image. Atlas runs
in float32 and with its gradients in bfloat16 (`attr_smoothgrad_precision`);
the summary takes bfloat16 where the device has bfloat16 matrix units (AMX
CPUs, CUDA from Ampere on), as the README recommends there, float32 elsewhere.

Each side runs the network as its users run it: Captum the model as given,
Atlas the model its build passes gradients through, with every BatchNorm
folded into its convolution (`models.fold`), so both speedups include the
cheaper passes and `evaluations_ratio` shows what the adaptive rules alone
save. The first line's races (`attribution.py`) compare definitions, on the
same unfolded model.
"""

from __future__ import annotations

import torch

from atlas.config import PRECISIONS
from atlas.attribution.gradients import SmoothGrad
from atlas.attribution.paths import IntegratedGradients
from atlas.devices import has_bfloat16_units
from atlas.models.fold import fold_batchnorm

TOLERANCE = 0.01
CAPTUM_STEPS = (4, 8, 16, 32, 50, 64, 128, 256, 512)
SAMPLES, REFERENCE_SAMPLES = 50, 200
REFERENCE_SEED = 100_000  # the reference map's noise is drawn apart from both runs' noise


def run(captum, net, space, x, target, chunk: int, noise: float, timed) -> dict:
    """Returns the two speedups and the ratio of IG evaluations, printing the details."""
    folded, names = fold_batchnorm(net)
    print(f"atlas runs the model with {len(names)} BatchNorms folded into their convolutions", flush=True)
    ig = _integrated_gradients(captum, net, folded, space, x, target, chunk, timed)
    sg = _smoothgrad(captum, net, folded, space, x, target, chunk, noise, timed)
    return {**ig, **sg}


def _integrated_gradients(captum, net, folded, space, x, target, chunk, timed) -> dict:
    baseline = space.lo(x).expand_as(x).contiguous()
    with torch.no_grad():
        gap = (net(x) - net(baseline)).gather(1, target[:, None])[:, 0].double()
    theirs = captum.IntegratedGradients(net)
    counts, t_captum = [], 0.0
    for i in range(x.shape[0]):
        for n in CAPTUM_STEPS:
            (_, delta), t = timed(lambda: theirs.attribute(
                x[i:i + 1], baselines=baseline[i:i + 1], target=target[i:i + 1], n_steps=n,
                method="gausslegendre", internal_batch_size=chunk, return_convergence_delta=True))
            if abs(float(delta)) / abs(float(gap[i])) <= TOLERANCE or n == CAPTUM_STEPS[-1]:
                counts.append(n)
                t_captum += t
                break
    ours = IntegratedGradients(folded, space, chunk, baseline="black", rule="adaptive", tolerance=TOLERANCE,
                               max_steps=CAPTUM_STEPS[-1])
    found, t_ours = timed(lambda: ours.explain(x, target))
    evaluations = found.info["evaluations"].tolist()
    print(f"integrated gradients to {TOLERANCE:.0%} completeness: captum {t_captum:.2f} s, Gauss-Legendre "
          f"points per image {counts}; atlas {t_ours:.2f} s, points per image {evaluations}, errors "
          + " ".join(f"{e:.2%}" for e in found.info["completeness"].tolist()), flush=True)
    return {"ig_speedup_vs_captum": t_captum / t_ours, "evaluations_ratio": sum(counts) / sum(evaluations)}


def _smoothgrad(captum, net, folded, space, x, target, chunk, noise, timed) -> dict:
    reference = SmoothGrad(net, space, chunk, samples=REFERENCE_SAMPLES, noise=noise,
                           seed=REFERENCE_SEED).attribute(x, target)
    tunnel = captum.NoiseTunnel(captum.Saliency(net))
    stdev = noise * float(space.range(x).mean())
    runs = [timed(lambda: tunnel.attribute(x[i:i + 1], nt_type="smoothgrad", nt_samples=SAMPLES, stdevs=stdev,
                                           nt_samples_batch_size=chunk, target=target[i:i + 1], abs=False))
            for i in range(x.shape[0])]
    theirs, t_captum = torch.cat([m for m, _ in runs]), sum(t for _, t in runs)
    rho_captum = _spearman(theirs, reference)
    print(f"smoothgrad to the rank correlation of {SAMPLES} draws with a {REFERENCE_SAMPLES}-draw float32 map: "
          f"captum {t_captum:.2f} s, correlations " + " ".join(f"{r:.3f}" for r in rho_captum.tolist())
          + f" (mean {rho_captum.mean():.3f})", flush=True)
    times = {}
    for precision in PRECISIONS:
        ours = SmoothGrad(folded, space, chunk, samples=SAMPLES, noise=noise, adaptive=True, precision=precision)
        found, times[precision] = timed(lambda: ours.explain(x, target))
        rho = _spearman(found.maps, reference)
        print(f"  atlas in {precision}: {times[precision]:.2f} s ({t_captum / times[precision]:.2f}x), draws "
              f"{found.info['samples'].tolist()}, correlations " + " ".join(f"{r:.3f}" for r in rho.tolist())
              + f" (mean {rho.mean():.3f})", flush=True)
    # the summary takes the precision the README recommends on this device
    chosen = "bfloat16" if has_bfloat16_units(x.device) else "float32"
    print(f"  summary: atlas in {chosen} ({'this device has' if chosen == 'bfloat16' else 'no'} "
          "bfloat16 matrix units)", flush=True)
    return {"smoothgrad_speedup_vs_captum": t_captum / times[chosen]}


def _spearman(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image of maps summed over colour [B]."""
    a, b = (_ranks(m.detach().double().sum(1).flatten(1)) for m in (maps, reference))
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def _ranks(v: torch.Tensor) -> torch.Tensor:
    return v.argsort(1).argsort(1).double()
