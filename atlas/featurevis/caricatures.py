"""Caricatures: explained images re-optimized to exaggerate what a layer sees in them (as in Microscope).

For every selected layer, a few explained images (spread evenly over the explained set) are
optimized to raise the dot product of the layer's activation with its activation on the original
image (`objectives.dot`, Lucid's caricature objective), starting from the original, so that each
caricature reads as the photo pushed further towards what the layer found in it. The image is
parameterized as the stage's feature visualizations are (Lucid's Fourier coefficients scaled by
1/f, decorrelated colour, sigmoid), initialized by inverting that parameterization on the photo
(`param.spectrum_of`), so the optimization starts exactly at the photo. The transforms are Lucid's
(pad, jitter, scale, rotate, jitter), cropped back to the image's side as Lucid's caricature recipe
does; as in Lucid, the original passes through the same transforms each step, so both activations
line up position by position. Adam at Lucid's rate; no redirected ReLU (the photo already drives the
layer). Images are optimized at the model's input side, the side the explained images are stored at.

It runs once the dataset stage has stored every explained image's pixels (after the later stages of
a build, like the neuron groups' directions); a work unit, `caricatures/<layer>`, holds every
caricature of one layer, and a layer that has one is not rendered again.
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import torch
from torch import nn

from atlas import distributed
from atlas.dataset.reader import EXPLAINED, DatasetImages
from atlas.dataset.reader import STAGE as DATASET_STAGE
from atlas.featurevis import objectives as O
from atlas.featurevis.param import unit_seed
from atlas.featurevis.render import RenderSettings, render
from atlas.featurevis.transforms import Robustness
from atlas.models import Preprocess
from atlas.store import Store
from atlas.store.schema import CARICATURES, FEATUREVIS, LAYERS

STAGE = FEATUREVIS
PREFIX = f"{CARICATURES}/"  # the work units' keys: caricatures/<layer>
ARRAYS = ("index", "images", "objective_start", "objective_end", "loss", "finite")  # one row per image
LUCID_SIZE = 128  # the image side Lucid's transform sizes are for
OBJECTIVE = ("dot product of the layer's activation with its activation on the original image, "
             "averaged over positions (Lucid's caricature objective)")


def is_caricature_key(key: str) -> bool:
    return key.startswith(PREFIX)


def unit_key(layer: str) -> str:
    return f"{PREFIX}{layer}"


def crop_back(robustness: Robustness) -> Robustness:
    """The same transforms with the frame cropped back to the image's side, as Lucid's caricatures do.

    A view pixel maps to the image through the transforms in coordinates centred on both frames,
    so cropping the frame's centre is the same as padding less: half the jitters' sum (made even).
    """
    jitter = robustness.jitter
    if sum(jitter) % 2:
        jitter = (jitter[0] + 1, *jitter[1:])
    return dataclasses.replace(robustness, pad=sum(jitter) // 2, jitter=jitter)


def settings_of(config, size: int) -> RenderSettings:
    """The render settings of a build's caricatures, at the model's input side `size`: the photo as the
    model sees it, the layer's activation on it the target."""
    return RenderSettings(size=size, steps=config.fv_caricature_steps, lr=config.fv_caricature_lr,
                          loss_points=config.fv_loss_points, redirect_steps=0, param="fourier",
                          robustness=crop_back(Robustness().scaled(min(1.0, size / LUCID_SIZE))),
                          upsample=False)  # the frame is at the model's input side already


def caricatures(model: nn.Module, preprocess: Preprocess, layer: str, originals: torch.Tensor,
                seeds: list[int], settings: RenderSettings, device: torch.device | str = "cpu") -> dict:
    """Caricatures of some images for one layer.

    Args:
        model: the model, in eval mode with frozen parameters, on `device`.
        preprocess: the model's normalization.
        layer: the layer whose activation is exaggerated.
        originals: the images [n, 3, S, S] in [0, 1], S = settings.size.
        seeds: one per image; it fixes the image's transforms.
        settings: the caricatures' render settings (`settings_of`).

    Returns:
        images uint8 [n, S, S, 3]; objective_start and objective_end float32 [n] (the objective on the
        original and on the caricature, both without transforms); loss [n, P] (the objective during
        the optimization); finite bool [n].
    """
    objective = O.dot(layer)
    result = render(model, preprocess, objective, seeds, settings, device, start=originals)
    seen = result.acts[O.on_start(layer)]  # the originals' activation, without transforms
    begin = objective({layer: seen, O.on_start(layer): seen}).float().cpu().numpy()
    return {"images": result.images, "objective_start": begin.astype(np.float32),
            "objective_end": result.objective, "loss": result.loss, "finite": result.finite & np.isfinite(begin)}


def run_caricatures(ctx) -> None:
    """Renders the caricatures of every selected layer that has none yet, once the explained set is stored."""
    cfg = ctx.config
    if not cfg.fv_caricatures:
        return
    # rank 0 lists what is left, so every rank splits the same list however far the others have got
    todo = distributed.on_main(lambda: [l.name for l in ctx.layers if unit_key(l.name) not in ctx.store.done(STAGE)])
    images = _explained(ctx) if todo else None
    if images is None:
        return
    todo = ctx.ranks.shard(todo)
    index = images.spread(cfg.fv_caricatures)
    settings = settings_of(cfg, ctx.loaded.preprocess.size)
    originals = torch.from_numpy(images.pixels(index)).permute(0, 3, 1, 2).float() / 255
    batch = max(1, cfg.fv_batch)
    with ctx.bar(len(todo) * len(index), "caricatures", "img") as bar:
        for layer in todo:
            seeds = [unit_seed(ctx.loaded.spec, layer, int(i), cfg.seed, "caricature") for i in index]
            pieces = []
            for a in range(0, len(index), batch):
                pieces.append(caricatures(ctx.gradient_model, ctx.loaded.preprocess, layer, originals[a:a + batch],
                                          seeds[a:a + batch], settings, ctx.device))
                bar.update(len(pieces[-1]["images"]))
            arrays = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
            ctx.store.write_unit(STAGE, unit_key(layer), {"index": index.astype(np.int64), **arrays}, {
                **settings.provenance(), "layer": layer, "objective": OBJECTIVE,
                "transforms": f"Lucid's, cropped back to the image's side: {settings.robustness.describe()}; "
                              f"the original through the same transforms each step",
                "start": "the original image (the parameterization inverted on it)",
                "images": f"{len(index)} explained images spread evenly over the explained set"})


def _explained(ctx) -> DatasetImages | None:
    """The explained images, once the dataset stage has stored the pixels of every one; else None
    (caricatures picked from a partial set would differ from those of a finished one)."""
    if EXPLAINED not in ctx.store.done(DATASET_STAGE):
        return None
    with ctx.store.read_unit(DATASET_STAGE, EXPLAINED) as part:
        chosen = part["index"][...]
    images = DatasetImages(ctx.store, ctx.loaded.preprocess, ctx.device)
    complete = len(chosen) > 0 and np.array_equal(np.sort(chosen), images.explained)
    return images if complete else None


def consolidate_caricatures(store: Store, f: h5py.File) -> dict:
    """Writes /layers/<layer>/caricatures/ from each layer's part.

    Returns:
        Where each part's images went (`Moves`): the parts hand them over to the store.
    """
    moves = {}
    for key, part in store.units(STAGE, PREFIX):
        layer = key[len(PREFIX):]
        if layer not in f[LAYERS]:
            continue  # a layer no longer selected
        g = f[LAYERS][layer].create_group(CARICATURES)
        for name in ARRAYS:
            data = part[name][...]
            g.create_dataset(name, data=data, chunks=(1, *data.shape[1:]) if name == "images" else None)
        g.attrs.update({k: v for k, v in part.attrs.items() if k not in ("written", "layer")})
        moves[key] = {"images": (g["images"].name, 0, len(g["index"]))}
    return moves
