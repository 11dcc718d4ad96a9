"""The feature-visualization stage: one image per channel of every selected layer.

A work unit is a contiguous channel range of one layer, rendered as one batch.
Its key, `<layer>/<first>-<end>`, says which channels it holds, so resume
needs no part to be opened.
"""

from __future__ import annotations

import h5py
import numpy as np

from atlas.featurevis.objectives import channel
from atlas.featurevis.param import unit_seed
from atlas.featurevis.render import RenderSettings, render
from atlas.store import Store

STAGE = "featurevis"


def settings_of(config) -> RenderSettings:
    return RenderSettings(size=config.fv_size, steps=config.fv_steps, lr=config.fv_lr,
                          loss_points=config.fv_loss_points)


def unit_key(layer: str, first: int, end: int) -> str:
    return f"{layer}/{first:05d}-{end:05d}"


def parse_key(key: str) -> tuple[str, int, int]:
    layer, _, span = key.rpartition("/")
    first, end = span.split("-")
    return layer, int(first), int(end)


def plan(layers, done: set[str], batch: int) -> list[tuple[str, list[int]]]:
    """Cuts the channels not yet rendered into contiguous batches, layer by layer."""
    rendered: dict[str, set[int]] = {}
    for key in done:
        layer, first, end = parse_key(key)
        rendered.setdefault(layer, set()).update(range(first, end))
    units = []
    for layer in layers:
        todo = [c for c in range(layer.channels) if c not in rendered.get(layer.name, set())]
        run: list[int] = []
        for c in todo:
            if run and (c != run[-1] + 1 or len(run) == batch):
                units.append((layer.name, run))
                run = []
            run.append(c)
        if run:
            units.append((layer.name, run))
    return units


def run(ctx) -> None:
    """Renders every channel the store does not have yet."""
    cfg = ctx.config
    done = ctx.store.begin(STAGE, cfg.stage_params(STAGE))
    settings = settings_of(cfg)
    units = plan(ctx.layers, done, cfg.fv_batch)
    with ctx.bar(sum(len(c) for _, c in units), "feature visualization", "ch") as bar:
        for layer, channels in units:
            bar.set_postfix_str(layer)
            seeds = [unit_seed(ctx.loaded.spec, layer, c, cfg.seed) for c in channels]
            result = render(ctx.loaded.model, ctx.loaded.preprocess, channel(layer, channels), seeds,
                            settings, ctx.device)
            ctx.store.write_unit(STAGE, unit_key(layer, channels[0], channels[-1] + 1), {
                "images": result.images, "objective": result.objective, "loss": result.loss,
                "seed": np.array(seeds, np.int64), "finite": result.finite,
            }, {**settings.provenance(), "objective": "channel (mean over positions)"})
            bar.update(len(channels))


def consolidate(store: Store, f: h5py.File) -> None:
    """Gathers the parts into /layers/<layer>/featurevis/channel*, layer by layer."""
    for key, part in store.units(STAGE):
        layer, first, end = parse_key(key)
        if layer not in f["layers"]:
            continue  # a layer no longer selected
        group = f["layers"][layer].require_group("featurevis")
        if "channel" not in group:
            _create(group, f["layers"][layer].attrs["channels"], part)
        group["channel"][first:end] = part["images"][...]
        group["channel_objective"][first:end] = part["objective"][...]
        group["channel_loss"][first:end] = part["loss"][...]
        group["channel_seed"][first:end] = part["seed"][...]
        group["channel_done"][first:end] = part["finite"][...]


def _create(group: h5py.Group, channels: int, part: h5py.File) -> None:
    size, points = part["images"].shape[1], part["loss"].shape[1]
    images = group.create_dataset("channel", (channels, size, size, 3), np.uint8,
                                  chunks=(1, size, size, 3), compression="gzip", compression_opts=1)
    for k, v in part.attrs.items():
        images.attrs[k] = v
    group.create_dataset("channel_objective", (channels,), np.float32, fillvalue=np.nan)
    group.create_dataset("channel_loss", (channels, points), np.float32, fillvalue=np.nan)
    group.create_dataset("channel_seed", (channels,), np.int64)
    group.create_dataset("channel_done", (channels,), bool)
