"""Each recipe against the field's reference implementation, side by side on the same model and units.

`atlas bench references` runs, on the embedded default model (ImageNet
weights, offline) and its sample photos, each pair it is asked for (`only`):

* lucent: Atlas's feature visualization against Lucent 0.1.8 (the Lucid
  recipe), through `atlas.bench.featurevis`: the same units, steps and size,
  each tool as its users run it (Lucent upsamples to 224 px), both final
  images judged by the unit's mean activation at 224 px:
  `lucid_quality_vs_lucent_224` is Atlas's mean over units divided by Lucent's.
* maco: MACO against horama 0.3.0 (its authors' PyTorch code): the same units,
  the same steps, the same magnitude (Atlas's, written where horama looks for
  its download, so both start from one spectrum), horama's defaults otherwise
  (six crops, noise 0.05, NAdam lr 1) and a canvas 1280/224 of the model's
  view for both; Atlas with its redirected ReLU for the first 16 steps, as
  the full preset renders (horama has none). Each tool in its ordinary use: Atlas renders a layer's units
  in one batch, horama one unit per call. Both final canvases are judged the
  same way: the unit's mean activation over the same 16 fixed crops, read
  through Atlas's `Capture` on uint8 pixels (horama's image mapped back from
  its -2.5..2.5 range to pixels first). `maco_activation_vs_horama` is Atlas's
  mean over units divided by horama's; `maco_time_vs_horama` Atlas's seconds
  over horama's.
* extremal: Extremal Perturbations against torchray 1.0.0.2 (the paper's
  authors'), the same images, target class, area and steps, the area counted
  as torchray counts it (`area_over="frame"`, where the definitions
  coincide): `extremal_mask_iou_vs_torchray` is the median over images of the
  IoU of the two masks' top `area` fractions. Atlas's own count, over the
  image, is run too and its IoU printed beside it.
* lrp: Atlas's LRP with zennit's rules against zennit's own attributor on the
  same canonized model (`atlas.bench.references_lrp`): the largest difference
  is printed; `lrp_conservation_error`, the median over photos of |sum of
  relevance - logit| / |logit|, is that of Atlas's EpsilonPlusFlat as the atlas
  runs it (units firing on their bias alone hand their relevance on).
* quantus: deletion, random logit and model-parameter randomization against
  Quantus 0.6.0 on the same maps (`atlas.bench.references_quantus`):
  `quantus_max_abs_diff`, the largest difference over the shared numbers.

A reference that is not installed, and a pair that was not asked for, is
reported as skipped (the first with how to install it), its figure `nan`.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from atlas import models
from atlas.bench import featurevis
from atlas.bench.common import timed
from atlas.bench.references_lrp import lrp_pair
from atlas.bench.references_quantus import quantus_pair
from atlas.config import Config
from atlas.errors import AtlasError
from atlas.featurevis import maco
from atlas.featurevis import objectives as O
from atlas.featurevis.param import unit_seed
from atlas.featurevis.render import RenderSettings, render
from atlas.featurevis.transforms import Robustness
from atlas.layers import Capture
from atlas.models import LoadedModel

HORAMA = "pip install --no-deps horama==0.3.0 einops matplotlib"
TORCHRAY = "pip install --no-deps torchray==1.0.0.2"
JUDGE_CROPS = 16  # fixed crops each MACO canvas is judged on
NOISE_FLOOR = 1e-6  # the input noise under which torchray's extremal masks are compared with its own
PAIRS = ("lucent", "maco", "extremal", "quantus", "lrp")  # what `only` picks from, in the order they run
SUMMARY = {"lucid_quality_vs_lucent_224": ".3f", "maco_activation_vs_horama": ".3f", "maco_time_vs_horama": ".3f",
           "extremal_mask_iou_vs_torchray": ".3f", "quantus_max_abs_diff": ".2e", "lrp_conservation_error": ".4f"}
TARGETS = {"lucid_quality_vs_lucent_224": (">=", 1.0), "maco_activation_vs_horama": (">=", 1.0),
           "maco_time_vs_horama": ("<=", 1.0), "extremal_mask_iou_vs_torchray": (">=", 0.7),
           "quantus_max_abs_diff": ("<=", 1e-3), "lrp_conservation_error": ("<=", 0.01)}


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def maco_units(loaded: LoadedModel, per_layer: int) -> dict[str, list[int]]:
    """`per_layer` units of three layers at a quarter, half and the end of the default selection."""
    from atlas.layers import discover, select
    chosen = select(loaded.model, discover(loaded.model, loaded.input_size))
    layers = [chosen[round(f * (len(chosen) - 1))] for f in (0.25, 0.5, 1.0)]
    return {l.name: [l.channels * (2 * j + 1) // (2 * per_layer) for j in range(per_layer)] for l in layers}


def judge(loaded: LoadedModel, canvases01: torch.Tensor, layer: str, chans: list[int], view: int) -> np.ndarray:
    """Each canvas's unit: mean activation over JUDGE_CROPS fixed crops (uint8 pixels, as stored)."""
    pixels = (canvases01.clamp(0, 1) * 255).round() / 255
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(chans))]
    crops = maco.Crops(count=JUDGE_CROPS)
    views = maco.cut(pixels, maco.crop_boxes(gens, pixels.shape[-1], crops), view)
    objective = maco.over_crops(O.channel(layer, chans), JUDGE_CROPS)
    with torch.no_grad(), Capture(loaded.model, [layer], stop=True) as cap:
        return objective(cap.run(loaded.preprocess.normalize(views))).numpy()


def _horama_one(horama, loaded: LoadedModel, layer: str, chan: int, settings: RenderSettings,
                seed: int) -> torch.Tensor:
    """One documented `maco` call for one unit; its canvas as pixels in [0, 1]."""
    cap = Capture(loaded.model, [layer], stop=True)

    def objective(images: torch.Tensor) -> torch.Tensor:
        return cap.run(images)[layer][:, chan].mean()
    torch.manual_seed(seed)
    with cap:
        image, _ = horama.maco(objective, total_steps=settings.steps, image_size=settings.canvas,
                               model_input_size=settings.view, device="cpu")
    mean = torch.tensor(loaded.preprocess.mean).view(3, 1, 1)
    std = torch.tensor(loaded.preprocess.std).view(3, 1, 1)
    return (image.detach() * std + mean)[None]  # horama feeds its image as the model's input: undo it


def maco_pair(loaded: LoadedModel, steps: int, per_layer: int, size: int) -> dict:
    """MACO against horama on the same units: activation and time ratios."""
    try:
        import horama
    except ImportError as exc:
        print(f"MACO: skipped, horama is not installed ({exc}); install it with: {HORAMA}", flush=True)
        return {"maco_activation_vs_horama": math.nan, "maco_time_vs_horama": math.nan}
    # Atlas as it ships: the redirected ReLU of the first steps (horama has none), without which a unit
    # silent on the start image (two of bn2's, here) never moves
    settings = RenderSettings(size=size, steps=steps, param="phase", redirect_steps=Config().fv_redirect_steps,
                              robustness=Robustness().scaled(min(1.0, size / 128)))
    units = maco_units(loaded, per_layer)
    print(f"MACO: {loaded.name}, {steps} steps, canvas {settings.canvas} px, view {settings.view} px, "
          f"{maco.Crops().count} crops a step; units: " + "; ".join(f"{l} {c}" for l, c in units.items()), flush=True)
    ours_q, theirs_q, ours_s, theirs_s = [], [], 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp, _cwd(Path(tmp)):
        # horama loads its magnitude from this file when it exists (else downloads ImageNet's)
        np.save(horama.maco_fv.MACO_SPECTRUM_FILENAME, maco.magnitude(settings.canvas).numpy())
        for layer, chans in units.items():
            seeds = [unit_seed(loaded.name, layer, c, view="maco") for c in chans]
            out, seconds = timed(lambda: _atlas_canvases(loaded, layer, chans, seeds, settings))
            ours_s, atlas_layer_s = ours_s + seconds, seconds
            ours_q += judge(loaded, out, layer, chans, settings.view).tolist()
            for c, seed in zip(chans, seeds):
                canvas, seconds = timed(lambda: _horama_one(horama, loaded, layer, c, settings, seed))
                theirs_s += seconds
                theirs_q += judge(loaded, canvas, layer, [c], settings.view).tolist()
            print(f"  {layer}: atlas {atlas_layer_s:.1f} s for {len(chans)} units; activations atlas "
                  f"{np.round(ours_q[-len(chans):], 3).tolist()}, horama {np.round(theirs_q[-len(chans):], 3).tolist()}",
                  flush=True)
    print(f"MACO: atlas {ours_s:.1f} s, horama {theirs_s:.1f} s; mean activation atlas {np.mean(ours_q):.4g}, "
          f"horama {np.mean(theirs_q):.4g}", flush=True)
    return {"maco_activation_vs_horama": float(np.mean(ours_q) / np.mean(theirs_q)),
            "maco_time_vs_horama": ours_s / theirs_s, "maco_atlas_s": ours_s, "maco_horama_s": theirs_s}


def _atlas_canvases(loaded: LoadedModel, layer: str, chans: list[int], seeds: list[int],
                    settings: RenderSettings) -> torch.Tensor:
    """Atlas's MACO canvases of one layer's units, in one batch, whole, in [0, 1]."""
    whole = RenderSettings(**{**settings.__dict__, "keep_canvas": True})
    result = render(loaded.model, loaded.preprocess, O.channel(layer, chans), seeds, whole)
    return torch.from_numpy(result.images).permute(0, 3, 1, 2).float() / 255


def top_fraction(mask: torch.Tensor, area: float) -> torch.Tensor:
    """The `area` fraction of pixels where `mask` [H, W] is highest (ties by position), as booleans."""
    flat = mask.flatten().double()
    keep = max(1, round(area * flat.numel()))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.argsort(-flat, stable=True)[:keep]] = True
    return chosen.view_as(mask)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


def extremal_pair(loaded: LoadedModel, images: int, steps: int, area: float = 0.1) -> dict:
    """Extremal Perturbations against torchray on the same photos, class and area: median IoU of the masks.

    torchray returns the mask of its last iteration's forward pass, made before that iteration's update:
    it is asked for one iteration more, so that both masks have had `steps` updates. The optimization is
    chaotic, so the IoU is bounded by how well torchray agrees with itself: it runs a second time on the
    photo plus noise of NOISE_FLOOR, and that IoU is printed beside Atlas's.
    """
    try:
        from torchray.attribution.extremal_perturbation import extremal_perturbation
    except ImportError as exc:
        print(f"Extremal Perturbations: skipped, torchray is not installed ({exc}); install it with: {TORCHRAY}",
              flush=True)
        return {"extremal_mask_iou_vs_torchray": math.nan}
    from atlas.attribution.base import InputSpace
    from atlas.attribution.extremal import ExtremalPerturbation
    x, target = photo_batch(loaded, images)
    print(f"Extremal Perturbations: {loaded.name}, {len(x)} photos, area {area}, {steps} steps", flush=True)
    space = InputSpace.of(loaded.preprocess)
    same, own = (ExtremalPerturbation(loaded.model, space, batch=8, area=area, steps=steps, area_over=over)
                 for over in ("frame", "image"))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x) * NOISE_FLOOR

    def torchray_mask(image: torch.Tensor, cls: int) -> torch.Tensor:
        return extremal_perturbation(loaded.model, image, cls, areas=[area], max_iter=steps + 1)[0][0, 0]

    def top(mask: torch.Tensor) -> torch.Tensor:
        return top_fraction(mask, area)

    ious, own_ious, self_ious, ours_s, theirs_s = [], [], [], 0.0, 0.0
    for i in range(len(x)):
        one, cls = x[i:i + 1], target[i:i + 1]
        ours, seconds = timed(lambda: same.explain(one, cls).maps.sum(1)[0])
        ours_s += seconds
        theirs, seconds = timed(lambda: torchray_mask(one, int(cls)))
        theirs_s += seconds
        again = torchray_mask(one + noise[i:i + 1], int(cls))
        mine = own.explain(one, cls).maps.sum(1)[0]
        ious.append(iou(top(ours), top(theirs)))
        self_ious.append(iou(top(again), top(theirs)))
        own_ious.append(iou(top(mine), top(theirs)))
        print(f"  photo {i}: class {int(cls)}, IoU of the top {area:.0%} {ious[-1]:.3f}; torchray against itself "
              f"on the photo plus noise of {NOISE_FLOOR:g} {self_ious[-1]:.3f}; Atlas with the area over the image "
              f"(its default) {own_ious[-1]:.3f}; mask mean over the image atlas {float(ours.mean()):.3f} (area "
              f"over the image: {float(mine.mean()):.3f}), torchray {float(theirs.mean()):.3f}", flush=True)
    print(f"Extremal Perturbations: atlas {ours_s:.1f} s, torchray {theirs_s:.1f} s; median IoU torchray against "
          f"itself {np.median(self_ious):.3f}, Atlas with the area over the image {np.median(own_ious):.3f}",
          flush=True)
    return {"extremal_mask_iou_vs_torchray": float(np.median(ious)), "extremal_torchray_self_iou": float(
        np.median(self_ious)), "extremal_image_area_iou": float(np.median(own_ious)), "extremal_atlas_s": ours_s,
        "extremal_torchray_s": theirs_s}


def photo_batch(loaded: LoadedModel, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` sample photos in the model's input space, and the model's top-1 class for each."""
    from atlas.dataset.images import decode, sample_images
    pixels = [p for p, _ in (decode(r.path, loaded.preprocess) for r in sample_images()[:count]) if p is not None]
    device = next(loaded.model.parameters()).device
    x = loaded.preprocess.from_uint8(np.stack(pixels)).to(device)
    with torch.no_grad():
        return x, loaded.model(x).argmax(1)


def lucent_pair(loaded: LoadedModel, steps: int, units: int, size: int) -> dict:
    """The Lucid recipe against Lucent on the same units, steps and size: activations both read at 224 px."""
    try:
        lucent = featurevis.import_lucent()
    except AtlasError as exc:
        print(f"Lucid recipe: skipped, {exc}", flush=True)
        return {"lucid_quality_vs_lucent_224": math.nan}
    device = next(loaded.model.parameters()).device
    chosen = featurevis.pick_units(loaded, units, device)
    settings = RenderSettings(size=size, steps=steps, lr=featurevis.LR)
    print(f"Lucid recipe: {loaded.name}, {steps} steps, {size} px (Lucent feeds the model 224 px), Adam lr "
          f"{featurevis.LR}; units: " + "; ".join(f"{l} {c}" for l, c in chosen.items()), flush=True)
    ours, theirs = [], []
    for layer, chans in chosen.items():
        both = featurevis.render_both(loaded, lucent, layer, chans, settings, device)
        ours += featurevis.activation(loaded, both.atlas, layer, chans, device, 224).tolist()
        theirs += [float(featurevis.activation(loaded, p, layer, [c], device, 224)[0])
                   for c, p in zip(chans, both.lucent)]
    print(f"Lucid recipe: mean activation at 224 px atlas {np.mean(ours):.4g}, lucent {np.mean(theirs):.4g}; per "
          f"unit atlas {np.round(ours, 3).tolist()}, lucent {np.round(theirs, 3).tolist()}", flush=True)
    return {"lucid_quality_vs_lucent_224": float(np.mean(ours) / np.mean(theirs))}


def pairs(only: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The pairs to run, in PAIRS' order, from a comma-separated string or names (None: all).

    Raises:
        AtlasError: a name that is not a pair; the message lists them.
    """
    names = [p.strip() for p in (only.split(",") if isinstance(only, str) else only or PAIRS) if p.strip()]
    unknown = [n for n in names if n not in PAIRS]
    if unknown or not names:
        raise AtlasError(f"--only: expected some of {', '.join(PAIRS)} (comma-separated), got {only!r}")
    return tuple(p for p in PAIRS if p in names)


def run(steps: int = 64, per_layer: int = 2, size: int = 128, device: str = "cpu", photos: int = 3,
        extremal_steps: int = 800, only: str | tuple[str, ...] | None = None, lucent_units: int = 4,
        check_photos: int = 8) -> dict:
    """The reference pairs `only` names (default all); returns the summary figures and what stands behind them.

    Args:
        steps, size: feature-visualization steps and view size, the same for both tools (Lucent and MACO pairs).
        per_layer: MACO's units per layer (three layers).
        device: torch device.
        photos, extremal_steps: the photos both Extremal Perturbations explain, and their steps.
        only: the pairs to run, some of PAIRS; the others' figures are NaN.
        lucent_units: the units the Lucent pair renders.
        check_photos: the photos the Quantus and LRP pairs explain.
    """
    chosen = pairs(only)
    loaded = models.load(models.DEFAULT_MODEL).to(torch.device(device))
    result = {key: math.nan for key in SUMMARY}
    print("references: " + ", ".join(f"{p} {'runs' if p in chosen else 'skipped (not in --only)'}" for p in PAIRS),
          flush=True)
    if "lucent" in chosen:
        result.update(lucent_pair(loaded, steps, lucent_units, size))
    if "maco" in chosen:
        result.update(maco_pair(loaded, steps, per_layer, size))
    if "extremal" in chosen:
        result.update(extremal_pair(loaded, photos, extremal_steps))
    if "quantus" in chosen or "lrp" in chosen:
        x, target = photo_batch(loaded, check_photos)
        if "quantus" in chosen:
            result.update(quantus_pair(loaded, x, target))
        if "lrp" in chosen:
            result.update(lrp_pair(loaded, x, target))
    return result
