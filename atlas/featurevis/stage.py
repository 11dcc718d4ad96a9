"""The feature-visualization stage: every view of every channel of every selected layer.

Views: `channel` (maximize the channel's mean), `negative` (minimize it),
`neuron` (maximize the centre position) and `diversity` (several images of the
channel pushed apart in style). A work unit is one view of a contiguous
channel range of one layer, rendered as one batch; its key,
`<view>/<layer>/<first>-<end>`, says what it holds, so resume opens no part.
In the full preset the neuron groups of the building blocks get theirs too
(directions.py), once the attribution stage has found them; the deepest
layers get an activation atlas (activation_atlas.py) once the dataset stage
has chosen the explained images.

Faults are handled per unit: a batch that runs out of GPU memory is split in
halves (each half its own unit), and an image whose objective turns NaN or
infinite is rendered again from a fresh seed, then flagged if it fails again.
"""

from __future__ import annotations

import h5py
import numpy as np
import torch

from atlas import devices, distributed
from atlas.errors import AtlasError
from atlas.featurevis import objectives as O
from atlas.featurevis.directions import consolidate_directions, is_direction_key
from atlas.featurevis.directions import run_directions as directions_of
from atlas.featurevis.activation_atlas import consolidate_atlas, is_atlas_key, run_atlas
from atlas.featurevis.caricatures import consolidate_caricatures, is_caricature_key, run_caricatures
from atlas.featurevis.facets import consolidate_facets, is_facet_key, run_facets
from atlas.featurevis.param import unit_seed
from atlas.featurevis.render import Plateau, Rendered, RenderSettings, render
from atlas.featurevis.transforms import Robustness
from atlas.store import Store
from atlas.store.schema import FEATUREVIS, LAYERS, TOPK, VIEW_ARRAYS, VIEWS, view_dataset

STAGE = FEATUREVIS


LUCID_SIZE = 128  # the image side Lucid's transform sizes (pad 12, crops 8 and 4) are for


def settings_of(config) -> RenderSettings:
    """The render settings of a build; images smaller than Lucid's 128 px get its transforms at their scale."""
    robustness = Robustness().scaled(min(1.0, config.fv_size / LUCID_SIZE))
    return RenderSettings(size=config.fv_size, steps=config.fv_steps, lr=config.fv_lr,
                          loss_points=config.fv_loss_points, redirect_steps=config.fv_redirect_steps,
                          param=config.fv_param, robustness=robustness, upsample=config.fv_upsample,
                          coarse_steps=config.fv_coarse_steps,
                          plateau=Plateau(tol=config.fv_plateau) if config.fv_plateau > 0 else None)


def images_per_channel(view: str, config) -> int:
    return config.fv_diversity if view == "diversity" else 1


def objective_of(view: str, layer: str, channels: list[int], config, pre: str | None = None) -> O.Objective:
    """The objective of a batch holding `channels` (each repeated for a diversity set).

    `pre`: the layer's pre-activation, which the negative view minimizes where there is one.
    """
    if view == "channel":
        return O.channel(layer, channels)
    if view == "negative":
        return O.negative_channel(layer, channels, pre)
    if view == "neuron":
        return O.neuron(layer, channels)
    k = config.fv_diversity
    per_image = [c for c in channels for _ in range(k)]
    groups = [i // k for i in range(len(per_image))]
    return O.channel(layer, per_image) + config.fv_diversity_weight * O.diversity(layer, groups)


def unit_key(view: str, layer: str, first: int, end: int) -> str:
    return f"{view}/{layer}/{first:05d}-{end:05d}"


def parse_key(key: str) -> tuple[str, str, int, int]:
    view, _, rest = key.partition("/")
    layer, _, span = rest.rpartition("/")
    first, end = span.split("-")
    return view, layer, int(first), int(end)


def plan(layers, views, done: set[str], batch_of) -> list[tuple[str, str, list[int]]]:
    """Cuts the channels not yet rendered into contiguous batches, per view and layer.

    `batch_of(view)` is how many channels one batch of that view holds.
    """
    rendered: dict[tuple[str, str], set[int]] = {}
    for key in (k for k in done if not is_direction_key(k) and not is_atlas_key(k) and not is_caricature_key(k)
                and not is_facet_key(k)):
        view, layer, first, end = parse_key(key)
        rendered.setdefault((view, layer), set()).update(range(first, end))
    units = []
    for view in views:
        for layer in layers:
            have = rendered.get((view, layer.name), set())
            run: list[int] = []
            for c in (c for c in range(layer.channels) if c not in have):
                if run and (c != run[-1] + 1 or len(run) == batch_of(view)):
                    units.append((view, layer.name, run))
                    run = []
                run.append(c)
            if run:
                units.append((view, layer.name, run))
    return units


def run(ctx) -> None:
    """Renders every view of every channel the store does not have yet."""
    cfg = ctx.config
    unknown = [v for v in cfg.fv_views if v not in VIEWS]
    if unknown:
        raise AtlasError(f"unknown feature-visualization view {unknown[0]!r}; choose from {', '.join(VIEWS)}")
    done = ctx.begin(STAGE, cfg.stage_params(STAGE))
    renderer = _Renderer(ctx, settings_of(cfg))
    units = ctx.ranks.shard(plan(ctx.layers, cfg.fv_views, done, renderer.channels_per_batch))
    pres = {l.name: l.pre for l in ctx.layers}
    with ctx.bar(sum(len(c) for _, _, c in units), "feature visualization", "unit") as bar:
        for view, layer, channels in units:
            bar.set_postfix_str(f"{view} {layer}")
            for part, arrays in renderer.render_unit(view, layer, channels):
                ctx.store.write_unit(STAGE, unit_key(view, layer, part[0], part[-1] + 1), arrays,
                                     {**renderer.settings.provenance(), "view": view,
                                      "objective": objective_of(view, layer, part[:1], cfg, pres[layer]).name})
                bar.update(len(part))
    # the neuron groups the attribution stage has factorized so far; the other late renders read the dataset
    # stage's parts, which that stage may still have to recompute (its store gone): the pipeline runs them after it
    directions_of(ctx, renderer.settings)


def run_later(ctx) -> None:
    """Renders what waits on a later stage's results, as far as its parts allow; each step does only what
    no part holds yet, and nothing while its inputs are missing."""
    settings = settings_of(ctx.config)
    directions_of(ctx, settings)  # the neuron groups the attribution stage has found (directions.py)
    run_atlas(ctx, settings)  # the activation atlas of the explained images (activation_atlas.py)
    run_caricatures(ctx)  # explained images exaggerated by what each layer sees in them (caricatures.py)
    run_facets(ctx, settings)  # the polysemantic units' facets, once labelled (facets.py)


class _Renderer:
    """Renders units with the stage's fault handling; remembers a batch size that fits."""

    def __init__(self, ctx, settings: RenderSettings):
        self.ctx, self.cfg, self.settings = ctx, ctx.config, settings
        self.pres = {l.name: l.pre for l in ctx.layers}
        self.batch = self.cfg.fv_batch
        if ctx.device.type == "cuda" and ctx.layers:
            self.batch = self._batch_from_free_memory(ctx.layers[-1].name)
        self.batch = distributed.smallest(self.batch)  # every rank cuts the channels into the same units
        self.fitting = self.batch  # channels rendered together that fit in memory (shrinks on out-of-memory)

    def _batch_from_free_memory(self, layer: str, cap: int = 1024) -> int:
        """Measures one image's memory on the deepest layer and fills 60 % of what is free."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.ctx.device)
        before = torch.cuda.memory_allocated(self.ctx.device)
        probe = RenderSettings(size=self.settings.size, steps=1, lr=self.settings.lr, loss_points=1,
                               param=self.settings.param, upsample=self.settings.upsample)
        render(self.ctx.gradient_model, self.ctx.loaded.preprocess, O.channel(layer, [0, 0]), [0, 1], probe,
               self.ctx.device)
        per_image = max(1, (torch.cuda.max_memory_allocated(self.ctx.device) - before) // 2)
        free, _ = torch.cuda.mem_get_info(self.ctx.device)
        return int(max(1, min(cap, 0.6 * free // per_image)))

    def channels_per_batch(self, view: str) -> int:
        return max(1, self.batch // images_per_channel(view, self.cfg))

    def render_unit(self, view: str, layer: str, channels: list[int]) -> list[tuple[list[int], dict]]:
        """Renders one unit; on out-of-memory, in smaller pieces, each returned as its own unit.

        Later units start from the piece that fitted, so a GPU that ran out of memory once
        is not made to run out again on every unit.
        """
        def piece(a: int, b: int) -> tuple[list[int], dict]:
            return channels[a:b], self._render(view, layer, channels[a:b])
        parts, fitted = devices.chunked(
            piece, len(channels), min(len(channels), self.fitting),
            too_big=f"one unit of {layer} does not fit in GPU memory at {self.settings.size} px; "
                    f"use --size smaller or --device cpu")
        self.fitting = min(self.fitting, fitted)
        return parts

    def _seeds(self, view: str, layer: str, channels: list[int], attempt: int) -> list[int]:
        k = images_per_channel(view, self.cfg)
        suffix = "" if attempt == 0 else f"#retry{attempt}"
        return [unit_seed(self.ctx.loaded.spec, layer, c, self.cfg.seed, f"{view}{j if k > 1 else ''}{suffix}")
                for c in channels for j in range(k)]

    def _run(self, view: str, layer: str, channels: list[int], attempt: int) -> tuple[Rendered, list[int]]:
        seeds = self._seeds(view, layer, channels, attempt)
        objective = objective_of(view, layer, channels, self.cfg, self.pres[layer])
        return render(self.ctx.gradient_model, self.ctx.loaded.preprocess, objective, seeds, self.settings,
                      self.ctx.device), seeds

    def _render(self, view: str, layer: str, channels: list[int]) -> dict[str, np.ndarray]:
        k = images_per_channel(view, self.cfg)
        result, seeds = self._run(view, layer, channels, 0)
        arrays = _arrays(result, seeds, channels, k, layer)
        bad = [i for i in range(len(channels)) if not arrays["finite"][i]]
        if bad:  # NaN or inf: one more try from fresh seeds, then the flag stays
            retry, retry_seeds = self._run(view, layer, [channels[i] for i in bad], 1)
            again = _arrays(retry, retry_seeds, [channels[i] for i in bad], k, layer)
            for key in arrays:
                arrays[key][bad] = again[key]
        return arrays


def _arrays(result: Rendered, seeds: list[int], channels: list[int], k: int, layer: str) -> dict[str, np.ndarray]:
    """Per-channel arrays of a rendered batch: [n, ...] for single images, [n, k, ...] for sets."""
    n = len(channels)
    act = result.acts[layer]
    index = torch.arange(act.shape[0], device=act.device)
    per_image = torch.as_tensor([c for c in channels for _ in range(k)], device=act.device)
    peak = act[index, per_image].flatten(1).amax(1).float().cpu().numpy()

    def shape(a: np.ndarray) -> np.ndarray:
        return a.reshape(n, *a.shape[1:]) if k == 1 else a.reshape(n, k, *a.shape[1:])
    out = {"images": shape(result.images), "objective": shape(result.objective), "loss": shape(result.loss),
           "seed": shape(np.array(seeds, np.int64)), "peak": shape(peak), "finite": result.finite.reshape(n, k).all(1),
           "steps": shape(result.steps)}
    if result.alpha is not None:  # MACO's transparency
        out["alpha"] = shape(result.alpha)
    return out


def consolidate(store: Store, f: h5py.File) -> dict:
    """Gathers the parts into /layers/<layer>/featurevis/<view>*, unit by unit.

    Returns:
        Where each part's pictures went (`Moves`): the parts hand them over to the store.
    """
    moves = {}
    consolidate_directions(store, f)
    consolidate_atlas(store, f)
    consolidate_facets(store, f)
    moves.update(consolidate_caricatures(store, f))
    for key, part in store.units(STAGE):
        if is_direction_key(key):
            continue
        if is_atlas_key(key):
            continue
        if is_caricature_key(key) or is_facet_key(key):
            continue
        view, layer, first, end = parse_key(key)
        if layer not in f[LAYERS]:
            continue  # a layer no longer selected
        group = f[LAYERS][layer].require_group(FEATUREVIS)
        if view not in group:
            _create(group, view, int(f[LAYERS][layer].attrs["channels"]), part)
        for name in VIEW_ARRAYS:
            if name in part:  # "alpha" only where the render has one (MACO)
                group[view_dataset(view, name)][first:end] = part[name][...]
        moves[key] = {"images": (group[view].name, first, end - first)}
    return moves


def _create(group: h5py.Group, view: str, channels: int, part: h5py.File) -> None:
    images = part["images"]
    per = images.shape[1:]
    ds = group.create_dataset(view, (channels, *per), np.uint8, chunks=(1, *per), compression="gzip",
                              compression_opts=1)
    ds.attrs.update(dict(part.attrs))
    extra = per[:-3]  # (k,) for diversity sets
    group.create_dataset(view_dataset(view, "objective"), (channels, *extra), np.float32, fillvalue=np.nan)
    group.create_dataset(view_dataset(view, "loss"), (channels, *part["loss"].shape[1:]), np.float32,
                         fillvalue=np.nan)
    group.create_dataset(view_dataset(view, "seed"), (channels, *extra), np.int64)
    group.create_dataset(view_dataset(view, "peak"), (channels, *extra), np.float32, fillvalue=np.nan)
    group.create_dataset(view_dataset(view, "finite"), (channels,), bool)
    if "steps" in part:  # the steps each image took (fewer where it stopped early)
        group.create_dataset(view_dataset(view, "steps"), (channels, *extra), np.int32)
    if "alpha" in part:
        group.create_dataset(view_dataset(view, "alpha"), (channels, *per[:-1]), np.uint8, chunks=(1, *per[:-1]),
                             compression="gzip", compression_opts=1)


def derive_quality(f: h5py.File) -> None:
    """quality = the channel visualization's peak activation / the top dataset image's.

    Below 1, the visualization does not excite the unit as much as a real photo
    does, and says little; NaN where either is missing or the unit is dead.
    """
    peak_name = f"{FEATUREVIS}/{view_dataset('channel', 'peak')}"
    for layer in f[LAYERS].values():
        if peak_name not in layer or f"{TOPK}/value" not in layer:
            continue
        peak, best = layer[peak_name][...], layer[f"{TOPK}/value"][:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            quality = np.where(best > 0, peak / best, np.nan).astype(np.float32)
        ds = layer[FEATUREVIS].create_dataset("quality", data=quality)
        ds.attrs["definition"] = ("spatial max of the channel on its visualization (at the rendered size) / "
                                  "highest spatial max over the dataset images")
