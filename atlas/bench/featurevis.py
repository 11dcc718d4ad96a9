"""Feature-visualization benchmark: Atlas's batched renderer against Lucent 0.1.8.

Both tools render the same channels of the same model, in one process on the
same machine, under these rules:

* Same units: `channels` units spread over the depth of the model (block
  outputs at four evenly spaced depths, the deepest block always among them),
  with fixed channel indices, so every run measures the same work.
* Each tool in its ordinary mode of use. Atlas renders all chosen channels of a
  layer in one `render` call. Lucent renders one channel per call with its
  documented `render_vis(model, "layer:channel", ...)`. The headline speedup is
  against that usage; Lucent's own batched mode (one parameterization with
  batch N and a summed `channel(layer, c, batch=i)` objective) is timed once as
  well and reported beside it.
* The same image size (128 px) and steps for both, Adam with learning rate
  0.05, the same frozen model (weights need no gradient in either tool), and a
  fresh copy of it for each Lucent call, because Lucent never removes its
  forward hooks and they would pile up from call to call. Lucent runs as its
  users get it: it upsamples images below 224 px to 224 before the model
  (`lucent_size=None`). Atlas feeds the model its frame at the rendered size
  (`upsample=False`, as the quick preset does): the headline compares the
  tools at the size both render. `upsample=True` resizes Atlas's frames up to
  the model's input size as its full preset does (and as Lucent), for an
  equal-input run; `lucent_size=128` turns Lucent's upsampling off. Atlas
  keeps its own defaults otherwise (the redirected ReLU of its first steps,
  which Lucent 0.1.8 lacks, is part of its cost and of its quality).
* Noise: Atlas's call for a layer and Lucent's calls for the same units run
  back to back, so a load spike from elsewhere on the machine hits both; each
  tool is warmed up before anything is timed. Seeds are set (torch and numpy)
  before every Lucent call, so Lucent's runs are reproducible.
* Quality: each tool's final image is quantized to uint8 the same way, fed
  through the model without transforms, and the target channel's mean
  activation is read with Atlas's `Capture`, twice: at the image's own size
  (the image as an atlas shows it) and upsampled to 224 px (what Lucent
  optimizes, and Atlas with `upsample=True`). Each ratio is the mean over units of Atlas's
  value divided by the mean of Lucent's; the headline is the first, and both
  are printed.
* Overhead: Atlas's time per image and step on the deepest layer (which needs
  the whole network), divided by a plain forward and backward to the input per
  image at the same batch size and the size the model sees.

Time to quality (`to_quality`, the second summary line): Lucent renders each unit with its documented
call and defaults for 512 steps (Lucid's count; 128 px upsampled to 224 px before the model); the bar
is the mean over the units of their final activation read at 224 px. Atlas renders the same units with
its full preset's recipe (coarse-to-fine views, per-image stopping) under growing step budgets, each
budget a fresh render from the same seeds; its time to quality is the time of the smallest budget whose
mean activation at 224 px reaches the bar. Budgets that run past it are not counted.

Lucent is a benchmark-only dependency:
    pip install --no-deps torch-lucent==0.1.8 && pip install kornia ipython decorator
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from atlas import models
from atlas.bench.common import best_time, timed
from atlas.bench.lucent_tokens import grid_views
from atlas.errors import AtlasError
from atlas.featurevis.objectives import channel
from atlas.featurevis.param import unit_seed
from atlas.featurevis.render import RenderSettings, render
from atlas.layers import Capture, discover, select
from atlas.models import LoadedModel

LR = 0.05  # Adam's learning rate in both tools (Lucent's default)
DEPTHS = 4  # how many layers the units spread over
INSTALL = "pip install --no-deps torch-lucent==0.1.8 && pip install kornia ipython decorator"

Units = dict[str, list[int]]  # layer -> channel indices


def import_lucent():
    """Imports Lucent 0.1.8's objectives, param and render modules, patching kornia for it.

    Raises:
        AtlasError: Lucent or one of its imports is missing; the message says how to install them.
    """
    try:
        import kornia
        from kornia.geometry import transform as kornia_transform
        # Lucent 0.1.8 calls these at kornia's top level, where kornia <= 0.4.1 kept them;
        # those old kornia releases no longer work with current torch.
        for name in ("get_rotation_matrix2d", "warp_affine"):
            if not hasattr(kornia, name):
                setattr(kornia, name, getattr(kornia_transform, name))
        from lucent.optvis import objectives, param
        from lucent.optvis import render as lucent_render
    except ImportError as exc:
        raise AtlasError(f"the feature-visualization benchmark needs Lucent 0.1.8 ({exc}); "
                         f"install it with: {INSTALL}") from None
    return objectives, param, lucent_render


def pick_units(loaded: LoadedModel, channels: int, device: torch.device) -> Units:
    """`channels` units over block outputs at evenly spaced depths, deepest block included."""
    chosen = select(loaded.model, discover(loaded.model, loaded.input_size, device))
    modules = dict(loaded.model.named_modules())
    # a block is a module made of modules (a Bottleneck, an inverted residual), called once; Lucent names
    # layers by module, so one call of a module called several times (`relu@1`) is not one it can hook
    blocks = [l for l in chosen if "@" not in l.name and next(modules[l.module].children(), None) is not None] \
        or chosen
    n_layers = max(1, min(DEPTHS, channels, len(blocks)))
    layers = [blocks[round(i)] for i in np.linspace(0, len(blocks) - 1, n_layers)]
    # deeper layers take the remainder: they are the ones that cost the most per step
    counts = [channels // n_layers + (i >= n_layers - channels % n_layers) for i in range(n_layers)]
    # the middle of n equal slices of the channel range: fixed, and spread over the layer
    return {l.name: [l.channels * (2 * j + 1) // (2 * n) for j in range(n)] for l, n in zip(layers, counts)}


def _to_uint8(images01: np.ndarray) -> np.ndarray:
    """Lucent's float [B, H, W, 3] images in [0, 1] to uint8, rounded as Atlas rounds."""
    return (np.clip(images01, 0, 1) * 255).round().astype(np.uint8)


def activation(loaded: LoadedModel, pixels: np.ndarray, layer: str, chans: list[int],
               device: torch.device, size: int | None = None) -> np.ndarray:
    """Mean activation of channel chans[i] of `layer` for image i of uint8 [B, S, S, 3] pixels,
    optionally upsampled to `size` first (bilinearly, as Lucent does)."""
    x = torch.as_tensor(pixels).permute(0, 3, 1, 2).float().div(255).to(device)
    if loaded.preprocess.fixed:  # a model of one input side (a ViT) reads every image at that side
        size = loaded.input_size
    if size is not None and size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    with torch.no_grad(), Capture(loaded.model, [layer], stop=True) as cap:
        acts = cap.run(loaded.preprocess.normalize(x))[layer]
    return acts[torch.arange(len(chans)), torch.as_tensor(chans)].mean(dim=(1, 2)).float().cpu().numpy()


def _lucent_call(lucent, model: nn.Module, objective, size: int, steps: int, batch: int,
                 seed: int, model_size: int | None) -> np.ndarray:
    """One documented `render_vis` call on a fresh copy of `model`; returns its final images."""
    _, param, lucent_render = lucent
    torch.manual_seed(seed)  # Lucent's start image
    np.random.seed(seed % 2**32)  # Lucent's transforms
    with grid_views(model):  # token and channels-last layers as Atlas sees them (no-op on conv maps)
        images = lucent_render.render_vis(
            model, objective, param_f=lambda: param.image(size, batch=batch),
            optimizer=lambda p: torch.optim.Adam(p, lr=LR), thresholds=(steps,),
            show_image=False, progress=False, fixed_image_size=model_size)
    return images[-1]


def _lucent_one(lucent, model: nn.Module, layer: str, chan: int, size: int, steps: int,
                seed: int, model_size: int | None) -> tuple[np.ndarray, float]:
    fresh = copy.deepcopy(model)  # outside the timing: Lucent leaves its hooks on the model
    images, seconds = timed(lambda: _lucent_call(lucent, fresh, f"{layer.replace('.', '_')}:{chan}",
                                                   size, steps, 1, seed, model_size))
    return _to_uint8(images), seconds


def _lucent_batched(lucent, model: nn.Module, units: list[tuple[str, int]], size: int, steps: int,
                    seed: int, model_size: int | None) -> tuple[np.ndarray, float]:
    objectives = lucent[0]
    objective = objectives.Objective.sum([objectives.channel(layer.replace(".", "_"), c, batch=i)
                                          for i, (layer, c) in enumerate(units)])
    fresh = copy.deepcopy(model)
    images, seconds = timed(lambda: _lucent_call(lucent, fresh, objective, size, steps, len(units), seed,
                                                  model_size))
    return _to_uint8(images), seconds


@dataclass
class LayerRenders:
    """Both tools' final images of one layer's units, uint8, and the seconds each took."""

    atlas: np.ndarray  # [N, S, S, 3], one image per unit, from one Atlas call
    atlas_s: float
    lucent: list[np.ndarray]  # one [1, S, S, 3] image per unit, one Lucent call each
    lucent_s: list[float]


def render_both(loaded: LoadedModel, lucent, layer: str, chans: list[int], settings: RenderSettings,
                device: torch.device, lucent_size: int | None = None) -> LayerRenders:
    """Renders `chans` of `layer` with Atlas (one batch) and Lucent (one documented call per unit).

    Both start from each unit's own seed and run `settings.size` px for `settings.steps` steps;
    Lucent feeds the model `lucent_size` px (None: its default, 224 for small images).

    Args:
        loaded: the model with its preprocessing.
        lucent: what `import_lucent` returns.
        layer, chans: the units.
        settings: Atlas's settings; Lucent takes their size and steps, and Adam at `LR`.
        device: torch device.
        lucent_size: the size Lucent feeds the model.

    Returns:
        The images and seconds of both tools; progress lines are printed as each finishes.
    """
    steps, size = settings.steps, settings.size
    seeds = [unit_seed(loaded.name, layer, c) for c in chans]
    out, atlas_s = timed(lambda: render(loaded.model, loaded.preprocess, channel(layer, chans), seeds, settings,
                                        device))
    print(f"  atlas  {layer}: {len(chans)} channels in one batch, {atlas_s:.1f} s "
          f"({1e3 * atlas_s / (steps * len(chans)):.0f} ms per image-step)", flush=True)
    images, seconds = [], []
    for c, seed in zip(chans, seeds):
        pixels, lucent_s = _lucent_one(lucent, loaded.model, layer, c, size, steps, seed, lucent_size)
        images.append(pixels)
        seconds.append(lucent_s)
        print(f"  lucent {layer}:{c}: {lucent_s:.1f} s ({1e3 * lucent_s / steps:.0f} ms per step)", flush=True)
    return LayerRenders(out.images, atlas_s, images, seconds)


def _forward_backward(loaded: LoadedModel, batch: int, size: int, device: torch.device) -> float:
    """Seconds per image of a plain forward and backward to the input, frozen weights."""
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        xg = x.clone().requires_grad_(True)
        loaded.model(loaded.preprocess.normalize(xg)).sum().backward()
    step()  # warm-up
    return best_time(step, repeats=5) / batch


def _warm_up(loaded: LoadedModel, lucent, units: Units, settings: RenderSettings, device: torch.device,
             model_size: int | None) -> None:
    """A few steps of each tool, so neither pays first-call costs inside the timings."""
    layer, size = list(units)[-1], settings.size
    render(loaded.model, loaded.preprocess, channel(layer, units[layer]), list(range(len(units[layer]))),
           RenderSettings(**{**settings.__dict__, "steps": 2}), device)
    _lucent_one(lucent, loaded.model, layer, units[layer][0], size, 2, 0, model_size)
    _lucent_batched(lucent, loaded.model, [(l, c) for l, cs in units.items() for c in cs], size, 2, 0,
                    model_size)


def run(model: str = "resnet50", weights: str = models.RANDOM, channels: int = 16, steps: int = 64,
        size: int = 128, device: str = "cpu", lucent_size: int | None = None, upsample: bool = False,
        quality: bool = True) -> dict:
    """Renders the same units with Atlas and Lucent; prints details, returns the three ratios.

    Args:
        model: model spec; Lucent's layer names are Atlas's with dots as underscores.
        weights: weights as for `atlas.models.load` ("random" needs no download).
        channels: how many units both tools render.
        steps: optimization steps per image, the same for both tools.
        size: image side in pixels, the same for both tools.
        device: torch device.
        lucent_size: the size Lucent feeds the model (None: its default, 224 for small images).
        upsample: Atlas shows the model its frames resized up to the model's input size (as Lucent).
        quality: also race to Lucent's 512-step quality (`to_quality`).

    Returns:
        speedup_vs_lucent (channels per second, Atlas over one-at-a-time Lucent),
        quality_vs_lucent (mean final channel activation, Atlas over Lucent),
        overhead_vs_forward_backward (Atlas per image-step over a plain forward+backward
        per image), and the measurements behind them.
    """
    lucent = import_lucent()
    dev = torch.device(device)
    loaded = models.load(model, weights).to(dev)
    units = pick_units(loaded, channels, dev)
    if loaded.preprocess.fixed and lucent_size is None:  # Lucent's default 224 px would be refused
        lucent_size = loaded.input_size
    print(f"{model} ({loaded.weights_id}), {channels} units, {size} px, {steps} steps, Adam lr {LR}, "
          f"{torch.get_num_threads()} threads, {dev}", flush=True)
    print("units: " + "; ".join(f"{l} {c}" for l, c in units.items()), flush=True)
    settings = RenderSettings(size=size, steps=steps, lr=LR, upsample=upsample)
    _warm_up(loaded, lucent, units, settings, dev, lucent_size)
    atlas_s, lucent_s, atlas_q, lucent_q, atlas_q224, lucent_q224 = {}, {}, [], [], [], []
    for layer, chans in units.items():
        both = render_both(loaded, lucent, layer, chans, settings, dev, lucent_size)
        atlas_s[layer] = both.atlas_s
        atlas_q += activation(loaded, both.atlas, layer, chans, dev).tolist()
        atlas_q224 += activation(loaded, both.atlas, layer, chans, dev, 224).tolist()
        for c, pixels, seconds in zip(chans, both.lucent, both.lucent_s):
            lucent_s[(layer, c)] = seconds
            lucent_q += activation(loaded, pixels, layer, [c], dev).tolist()
            lucent_q224 += activation(loaded, pixels, layer, [c], dev, 224).tolist()
    flat = [(l, c) for l, cs in units.items() for c in cs]
    atlas_total, lucent_total = sum(atlas_s.values()), sum(lucent_s.values())
    pixels, batched_total = _lucent_batched(lucent, loaded.model, flat, size, steps, unit_seed(loaded.name, "", 0),
                                            lucent_size)
    batched_q = [activation(loaded, pixels[i:i + 1], l, [c], dev)[0] for i, (l, c) in enumerate(flat)]
    print(f"  lucent batched (all {len(flat)} units, one param, summed objective): {batched_total:.1f} s",
          flush=True)
    deepest = list(units)[-1]
    # the side the model sees
    seen = loaded.input_size if loaded.preprocess.fixed else \
        max(settings.view, loaded.input_size) if upsample else settings.view
    fb = _forward_backward(loaded, len(units[deepest]), seen, dev)
    per_image_step = atlas_s[deepest] / (steps * len(units[deepest]))
    result = {
        "speedup_vs_lucent": lucent_total / atlas_total,
        "quality_vs_lucent": float(np.mean(atlas_q) / np.mean(lucent_q)),
        "quality_vs_lucent_at_size": float(np.mean(atlas_q) / np.mean(lucent_q)),
        "quality_vs_lucent_at_224": float(np.mean(atlas_q224) / np.mean(lucent_q224)),
        "overhead_vs_forward_backward": per_image_step / fb,
        "speedup_vs_lucent_batched": batched_total / atlas_total,
        "quality_vs_lucent_batched": float(np.mean(atlas_q) / np.mean(batched_q)),
        "atlas_channels_per_s": len(flat) / atlas_total,
        "lucent_channels_per_s": len(flat) / lucent_total,
        "lucent_batched_channels_per_s": len(flat) / batched_total,
        "atlas_mean_activation": float(np.mean(atlas_q)),
        "lucent_mean_activation": float(np.mean(lucent_q)),
        "lucent_batched_mean_activation": float(np.mean(batched_q)),
        "atlas_ms_per_image_step_deepest": 1e3 * per_image_step,
        "forward_backward_ms_per_image": 1e3 * fb,
    }
    print("per-unit final activation (atlas / lucent / lucent batched): " + "; ".join(
        f"{l}:{c} {a:.3g}/{b:.3g}/{q:.3g}" for (l, c), a, b, q in zip(flat, atlas_q, lucent_q, batched_q)),
        flush=True)
    print(f"channels/s: atlas {result['atlas_channels_per_s']:.4f}, lucent one at a time "
          f"{result['lucent_channels_per_s']:.4f} (the headline), lucent batched "
          f"{result['lucent_batched_channels_per_s']:.4f} (speedup vs batched "
          f"{result['speedup_vs_lucent_batched']:.2f}x)", flush=True)
    print(f"mean final activation at {size} px: atlas {result['atlas_mean_activation']:.4g}, lucent "
          f"{result['lucent_mean_activation']:.4g}, lucent batched {result['lucent_batched_mean_activation']:.4g}; "
          f"quality ratio at {size} px {result['quality_vs_lucent_at_size']:.3f}, upsampled to 224 px "
          f"{result['quality_vs_lucent_at_224']:.3f}", flush=True)
    print(f"atlas {result['atlas_ms_per_image_step_deepest']:.1f} ms per image-step on {deepest} (batch "
          f"{len(units[deepest])}); plain forward+backward at {seen} px {result['forward_backward_ms_per_image']:.1f} "
          f"ms per image", flush=True)
    if quality:
        result.update(to_quality(loaded, lucent, units, size, dev, lucent_size))
    return result


LUCENT_STEPS = 512  # Lucid's and Lucent's step count: the quality bar
BUDGETS = (32, 48, 64, 96, 128, 192, 256, 384, 512)  # Atlas's step budgets, tried in order until one reaches it


def recipe(size: int, steps: int) -> RenderSettings:
    """The full preset's feature-visualization recipe at `size` px with a budget of `steps`: the coarse
    steps and the redirected-ReLU steps keep their share of the budget."""
    from atlas.config import preset
    from atlas.featurevis.stage import settings_of
    full = preset("full")
    base = settings_of(full)
    share = steps / full.fv_steps
    return RenderSettings(**{**base.__dict__, "size": size, "steps": steps,
                             "coarse_steps": round(base.coarse_steps * share),
                             "redirect_steps": max(1, round(base.redirect_steps * min(1.0, 4 * share)))})


def to_quality(loaded: LoadedModel, lucent, units: Units, size: int, device: torch.device,
               lucent_size: int | None = None, budgets: tuple[int, ...] = BUDGETS) -> dict:
    """Lucent's 512 steps against Atlas's time to the same mean activation at 224 px, on the same units.

    Returns:
        speedup_vs_lucent_to_quality (Lucent's seconds for 512 steps over Atlas's to reach its mean
        activation at 224 px), quality_at_224 (Atlas's mean activation then over Lucent's), and what
        stands behind them; if no budget reaches the bar, the largest budget's figures.
    """
    flat = [(l, c) for l, cs in units.items() for c in cs]
    lucent_s, lucent_q = 0.0, []
    print(f"time to quality: Lucent, {LUCENT_STEPS} steps per unit, one documented call each", flush=True)
    for layer, c in flat:
        pixels, seconds = _lucent_one(lucent, loaded.model, layer, c, size, LUCENT_STEPS,
                                      unit_seed(loaded.name, layer, c), lucent_size)
        lucent_s += seconds
        lucent_q += activation(loaded, pixels, layer, [c], device, 224).tolist()
        print(f"  lucent {layer}:{c}: {seconds:.1f} s, activation at 224 px {lucent_q[-1]:.4g}", flush=True)
    bar = float(np.mean(lucent_q))
    print(f"  lucent: {lucent_s:.1f} s; the bar, mean activation at 224 px: {bar:.4g}", flush=True)
    tried = []
    for steps in budgets:
        settings = recipe(size, steps)
        seconds, q, taken = 0.0, [], []
        for layer, chans in units.items():
            seeds = [unit_seed(loaded.name, layer, c) for c in chans]
            out, s = timed(lambda: render(loaded.model, loaded.preprocess, channel(layer, chans), seeds, settings,
                                          device))
            seconds += s
            q += activation(loaded, out.images, layer, chans, device, 224).tolist()
            taken += out.steps.tolist()
        tried.append((steps, seconds, float(np.mean(q)), float(np.mean(taken))))
        print(f"  atlas budget {steps} steps ({settings.coarse_steps} coarse; {np.mean(taken):.0f} taken on "
              f"average): {seconds:.1f} s, mean activation at 224 px {np.mean(q):.4g} "
              f"({np.mean(q) / bar:.3f} of the bar)", flush=True)
        if np.mean(q) >= bar:
            break
    steps, seconds, mean, taken = tried[-1]
    reached = mean >= bar
    print(f"time to quality: atlas {'reaches' if reached else 'does not reach'} Lucent's {LUCENT_STEPS}-step "
          f"activation {'with a budget of ' + str(steps) + ' steps' if reached else 'within ' + str(steps)} "
          f"in {seconds:.1f} s, against Lucent's {lucent_s:.1f} s", flush=True)
    return {"speedup_vs_lucent_to_quality": lucent_s / seconds, "quality_at_224": mean / bar,
            "to_quality_reached": reached, "to_quality_budget": steps, "to_quality_steps_taken": taken,
            "to_quality_atlas_s": seconds, "to_quality_lucent_s": lucent_s, "to_quality_bar": bar}
