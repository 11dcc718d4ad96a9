"""Atlas's checks against Quantus 0.6.0, on the metrics the two define the same way.

Each pair runs on the same model, images, maps and settings; Quantus gets
Atlas's maps through its `explain_func` (so both see the same arrays) and is
configured to Atlas's choices where its options reach them
(docs/references.md lists each metric, each setting and each difference):

* deletion = Quantus's `PixelFlipping`: the softmax probability of the class
  as pixels go in the order of Atlas's map (|map| summed over colour for a
  sign-free method, passed as a one-channel map), replaced by zero in the
  model's input space (Atlas's "mean", `perturb_baseline=0.0`) or by a
  blurred copy (Atlas's "blur", through `perturb_func`). Quantus counts colour
  values, not pixels, so it runs three of its steps per curve point and its
  curve is read where whole pixels are gone;
* random logit = Quantus's `RandomLogit` with Spearman's correlation, with and
  without absolute values, on the class Quantus drew (Atlas draws its own from
  another generator, so the class is read from Quantus's call);
* model-parameter randomization = Quantus's `MPRT` (cascading, top down) with
  Spearman's correlation of absolute values: Atlas's Spearman on the maps of
  Quantus's randomized models. The randomized weights themselves differ
  (Quantus seeds every layer alike, Atlas each by its name), so on a trained
  model only the scores of the same maps can agree; the whole procedure is
  compared on a model whose re-initialization draws nothing
  (tests/test_reference_quantus.py).

`quantus_max_abs_diff` is the largest absolute difference over these numbers.
SSIM is printed beside them but not counted: Quantus computes it on flattened
maps with a uniform 7-sample window, Atlas on the 2-D map with Wang et al.'s
Gaussian window, so the two are different measures.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from atlas.attribution import methods
from atlas.attribution.base import Attribution, InputSpace
from atlas.attribution.checks import ablation
from atlas.attribution.checks.similarity import compare, ssim
from atlas.models import LoadedModel

QUANTUS = "pip install quantus==0.6.0"
POINTS = 17  # deletion curve points: 224 x 224 pixels go in 16 equal steps of 3,136
MPRT_PHOTOS = 2  # photos the MPRT pair explains (one map per layer of the model for each)

MakeMethod = Callable[[nn.Module], Attribution]


class Explainer:
    """A Quantus `explain_func` that returns Atlas's colour-summed maps, [n, 1, H, W], and records each call.

    Args:
        make_method: builds the Atlas method on the model Quantus passes (the original or a randomized copy).
    """

    def __init__(self, make_method: MakeMethod):
        self.make_method = make_method
        self.targets: list[np.ndarray] = []
        self.maps: list[np.ndarray] = []

    def __call__(self, model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **kwargs) -> np.ndarray:
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=_device(model))
        target = torch.as_tensor(np.asarray(targets), device=x.device).long()
        maps = self.make_method(model).attribute(x, target).sum(1, keepdim=True).float().cpu().numpy()
        self.targets.append(target.cpu().numpy())
        self.maps.append(maps)
        return maps


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def replaced_by(image: np.ndarray) -> Callable:
    """A Quantus `perturb_func` that replaces the chosen values by those of `image` ([n, ...], e.g. blurred)."""
    flat = np.asarray(image).reshape(len(image), -1)

    def perturb(arr: np.ndarray, indices: np.ndarray, **kwargs) -> np.ndarray:
        out = np.array(arr, copy=True)
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = flat[rows, indices]
        return out
    return perturb


def pixel_flipping(quantus, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, order: torch.Tensor,
                   points: int, replacement: str = "mean") -> np.ndarray:
    """Quantus's pixel-flipping curve at Atlas's deletion points after the first, [n, points - 1].

    Args:
        quantus: the imported module.
        model: the classifier, in eval mode.
        inputs: [n, C, H, W] in the model's input space (n <= 64: one Quantus batch).
        target: [n] classes.
        order: [n, H, W] the map whose largest values go first (Atlas's ranking map).
        points: Atlas's curve points; (points - 1) must divide H * W.
        replacement: "mean" (zero in input space) or "blur" (Atlas's blurred copy).
    """
    n, channels, h, w = inputs.shape
    if (h * w) % (points - 1) or n > 64:
        raise ValueError(f"points: {points - 1} steps must divide the {h * w} pixels, and at most 64 images "
                         f"(got {n})")
    if replacement == "mean":
        perturb = {"perturb_baseline": 0.0}
    else:
        perturb = {"perturb_func": replaced_by(ablation.replacement_image(inputs, replacement).cpu().numpy())}
    metric = quantus.PixelFlipping(features_in_step=h * w // (points - 1), abs=False, normalise=False,
                                   disable_warnings=True, **perturb)
    curves = metric(model, inputs.cpu().numpy(), target.cpu().numpy(), a_batch=order[:, None].cpu().numpy(),
                    device=str(inputs.device), batch_size=64)
    # one Quantus step removes (H * W) / (points - 1) colour values: whole pixels after every C-th step
    return np.asarray(curves, np.float64)[:, channels - 1::channels]


def deletion_diffs(quantus, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, order: torch.Tensor,
                   points: int) -> dict[str, float]:
    """Largest |Atlas - Quantus| over the deletion curves, per replacement."""
    out = {}
    for replacement in ablation.REPLACEMENTS:
        ours = ablation.ablation_curves(model, inputs, target, order, points, replacement)[:, 1:]
        theirs = pixel_flipping(quantus, model, inputs, target, order, points, replacement)
        out[f"deletion_{replacement}"] = float(np.abs(ours - theirs).max())
    return out


def random_logit_scores(quantus, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                        make_method: MakeMethod, n_classes: int, absolute: bool, seed: int = 42) -> dict:
    """Quantus's RandomLogit (Spearman) and Atlas's scores of the same maps, for the class Quantus drew.

    Returns:
        {"quantus": [n], "atlas": [n] (Atlas's `spearman_abs` or `spearman`), "class": [n],
        "ssim_quantus", "ssim_atlas": [n] (the pinned difference)}.
    """
    explain = Explainer(make_method)
    original = explain(model, inputs.cpu().numpy(), target.cpu().numpy())
    metric = quantus.RandomLogit(num_classes=n_classes, similarity_func=quantus.similarity_func.correlation_spearman,
                                 abs=absolute, normalise=False, seed=seed, disable_warnings=True)
    theirs = metric(model, inputs.cpu().numpy(), target.cpu().numpy(), a_batch=original, explain_func=explain,
                    device=str(inputs.device))
    other = explain.maps[-1]
    ours = compare(original[:, 0], other[:, 0])["spearman_abs" if absolute else "spearman"]
    flat = (len(original), -1)
    ssim_theirs = quantus.similarity_func.ssim(original.reshape(flat), other.reshape(flat), batched=True)
    return {"quantus": np.asarray(theirs, np.float64), "atlas": ours.astype(np.float64),
            "class": explain.targets[-1], "ssim_quantus": np.asarray(ssim_theirs),
            "ssim_atlas": ssim(original[:, 0], other[:, 0])}


def mprt_scores(quantus, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                make_method: MakeMethod) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Quantus's cascading MPRT (Spearman of |map|) and Atlas's Spearman of the same maps.

    Returns:
        (quantus [L, n], atlas [L, n], the L layer names in Quantus's order, top first).
    """
    explain = Explainer(make_method)
    metric = quantus.MPRT(similarity_func=quantus.similarity_func.correlation_spearman, layer_order="top_down",
                          abs=True, normalise=False, disable_warnings=True)
    theirs = metric(model, inputs.cpu().numpy(), target.cpu().numpy(), a_batch=None, explain_func=explain,
                    device=str(inputs.device))
    layers = [k for k in theirs if k != "original"]
    # Quantus explains the original twice (its a_batch, then its reference), then once per randomized layer
    original, randomized = explain.maps[0][:, 0], [m[:, 0] for m in explain.maps[2:]]
    ours = np.stack([compare(original, m)["spearman_abs"] for m in randomized]).astype(np.float64)
    return np.asarray([theirs[k] for k in layers], np.float64), ours, layers


def quantus_pair(loaded: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, method: str = "gradient",
                 points: int = POINTS, mprt_photos: int = MPRT_PHOTOS) -> dict:
    """Atlas's deletion, random-logit and randomization scores against Quantus's on the same maps.

    Args:
        loaded: the model with its preprocessing.
        inputs: [n, 3, H, W] photos in the model's input space.
        target: [n] the explained classes (top-1).
        method: the Atlas attribution method whose maps both judge.
        points: deletion curve points; (points - 1) must divide the pixels of an image.
        mprt_photos: photos the (costly: one map per layer) MPRT pair uses.

    Returns:
        {"quantus_max_abs_diff": the largest difference over the shared numbers (NaN when Quantus is
        missing), "quantus_diffs": the largest difference of each}.
    """
    try:
        import quantus
    except ImportError as exc:
        print(f"Quantus: skipped, quantus is not installed ({exc}); install it with: {QUANTUS}", flush=True)
        return {"quantus_max_abs_diff": math.nan}
    model, space = loaded.model, InputSpace.of(loaded.preprocess)

    def make_method(m: nn.Module) -> Attribution:
        return methods.get(method, m, space)
    explainer = make_method(model)
    maps = explainer.attribute(inputs, target).float()
    order = maps.abs().sum(1) if explainer.magnitude else maps.sum(1)  # Atlas's ablation order (run_checks)
    print(f"Quantus {quantus.__version__}: {loaded.name}, {len(inputs)} photos, {method} maps (ordered by "
          f"{'|map|' if explainer.magnitude else 'the signed map'}), deletion at {points} points", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Quantus warns about its own parameterisation on every call
        diffs = deletion_diffs(quantus, model, inputs, target, order, points)
        n_classes = int(model(inputs[:1]).shape[1])
        logit = {absolute: random_logit_scores(quantus, model, inputs, target, make_method, n_classes, absolute)
                 for absolute in (True, False)}
        mprt = mprt_scores(quantus, model, inputs[:mprt_photos], target[:mprt_photos], make_method)
    diffs["random_logit_spearman_abs"] = float(np.abs(logit[True]["atlas"] - logit[True]["quantus"]).max())
    diffs["random_logit_spearman"] = float(np.abs(logit[False]["atlas"] - logit[False]["quantus"]).max())
    diffs["mprt_spearman_abs"] = float(np.abs(mprt[1] - mprt[0]).max())
    _report(logit[False], *mprt, diffs)
    return {"quantus_max_abs_diff": max(diffs.values()), "quantus_diffs": diffs}


def _report(logit: dict, theirs: np.ndarray, ours: np.ndarray, layers: list[str], diffs: dict[str, float]) -> None:
    def r(values: np.ndarray) -> list[float]:
        return np.round(values, 4).tolist()
    print(f"  random logit (Quantus's classes {logit['class'].tolist()}): Spearman atlas {r(logit['atlas'])}, "
          f"quantus {r(logit['quantus'])}", flush=True)
    print(f"  MPRT over {len(layers)} layers, top first: Spearman of |map| after the first layer atlas {r(ours[0])}, "
          f"quantus {r(theirs[0])}; after all atlas {r(ours[-1])}, quantus {r(theirs[-1])}", flush=True)
    print(f"  not compared (a different measure): SSIM of the random-logit maps atlas {r(logit['ssim_atlas'])}, "
          f"quantus {r(logit['ssim_quantus'])}", flush=True)
    print("Quantus: largest |atlas - quantus|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()), flush=True)
