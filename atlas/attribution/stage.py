"""The attribution stage: every method on every explained image, unit attributions, and the checks.

It reads the explained images the dataset stage stored (the model's exact view
of each photo); a unit's top example outside the explained set is decoded
from the source again for its unit attribution. Work units, each written
atomically:

  * `<method>/<chunk>`: one method's maps of one chunk of explained images
    (a pixel part of the dataset stage), for the top-1 class and for the true
    class where the label is known;
  * `unit/<layer>/<first channel>`: unit attributions of a range of channels, and
    their circuit inputs from the previous selected layer (same backward passes);
  * `kernel/<layer>`: the kernel slices from the previous selected layer, where one
    convolution connects the two (empty where none does);
  * `blocks/<chunk>`: the building blocks of one chunk of explained images (units'
    shares of the top-1 logit per selected layer, neuron groups of the deepest);
  * `skipped/<method>`: a method that does not apply to the model, and why;
  * `checks/<method>` and `checks/random`: the sanity checks of one method on
    the checked images, and the random-order control.
"""

from __future__ import annotations

import numpy as np
import torch

from atlas import distributed
from atlas.attribution.base import Attribution, InputSpace
from atlas.attribution.blocks import pending, run_blocks
from atlas.attribution.checks import sanity
from atlas.attribution.checks.ablation import fractions
from atlas.attribution.circuits import METHOD as CIRCUIT_METHOD
from atlas.attribution.circuits import kernel_slices
from atlas.attribution.maps import run_maps
from atlas.attribution.methods import check, get, settings
from atlas.attribution.units import UnitAttribution, unit_maps
from atlas.dataset.reader import DatasetImages, source_records, top_examples
from atlas.errors import AtlasError
from atlas.models.fold import fold_batchnorm
from atlas.store.schema import ALL_METHODS, ATTRIBUTION, RANDOM_CONTROL

STAGE = ATTRIBUTION
UNIT_CHANNELS = 128  # channels per unit-attribution work unit
KERNEL = "kernel/"  # the kernel slices' parts: kernel/<layer>
# The methods that read only the model's input and output (Guided Backprop also its ReLU modules, which
# folding keeps) run on the build's folded model; Grad-CAM and rollout read inner layers of their own
# choosing, LRP the weights of each layer, so they run on the loaded model.
ON_FOLDED = frozenset(ALL_METHODS) - {"grad_cam", "guided_grad_cam", "attention_rollout", "lrp_epsilon_plus_flat",
                                      "lrp_epsilon_gamma_box"}


def run(ctx) -> None:
    """Computes every map, unit attribution and check the store does not have yet."""
    cfg = ctx.config
    done = ctx.begin(STAGE, cfg.stage_params(STAGE))
    for name in cfg.attr_methods:
        check(name)  # an unknown name fails before any work
    images = DatasetImages(ctx.store, ctx.loaded.preprocess, ctx.device,
                           source_records(cfg, ctx.loaded.class_names))
    data_units = list(images.chunks)  # in image order
    if not data_units:
        raise AtlasError("attribution needs the explained dataset images: run `atlas dataset` "
                         "(or `atlas build`) first")
    # a rank takes whole data units, so the SmoothGrad variants of a unit share their samples
    run_maps(ctx, images, [(m, d) for d in ctx.ranks.shard(data_units) for m in cfg.attr_methods
                           if f"{m}/{d}" not in done and f"skipped/{m}" not in done], make_method)
    if cfg.attr_blocks_units:
        run_blocks(ctx, images, pending(ctx.store, ctx.layers, ctx.ranks.shard(data_units), done))
    if cfg.attr_unit_topk:
        _run_units(ctx, images, done)
        if ctx.ranks.main:
            _run_kernels(ctx, done)
    distributed.barrier()  # every rank's skipped methods are known before the checks
    skipped = {key.split("/", 1)[1] for key in ctx.store.done(STAGE) if key.startswith("skipped/")}
    if cfg.attr_check_images and len(images.explained):
        todo = [m for m in (*cfg.attr_methods, RANDOM_CONTROL) if f"checks/{m}" not in done and m not in skipped]
        _run_checks(ctx, images, ctx.ranks.shard(todo))


def chunk(ctx) -> int:
    """Model evaluations per pass: about 10 rows is fastest on CPUs (measured on ResNet-50 and
    EfficientNet-Lite0); GPUs want far more, and out-of-memory halves it."""
    return ctx.config.attr_chunk or (64 if ctx.device.type == "cuda" else 10)


def make_method(ctx, name: str, images: DatasetImages | None, model=None,
                fixed_steps: bool = False) -> Attribution:
    """The method `name` configured from the build config (Expected Gradients gets its references).

    Args:
        model: the network to bind it to; default the build's gradient model for the methods that read
            only the input and the output (`ON_FOLDED`), the loaded model for the others (the checks
            pass randomized copies).
        fixed_steps: path methods keep their first step count (no completeness-driven increase, and
            Gauss-Legendre points where the adaptive rule is configured): the checks compare maps, and
            a randomized network's path integral may never converge.
    """
    cfg, loaded = ctx.config, ctx.loaded
    fixed = {"tolerance": float("inf"), "ig_rule": "gauss_legendre"} if fixed_steps else {}
    model = model or (ctx.gradient_model if name in ON_FOLDED else loaded.model)
    method = get(name, model, InputSpace.of(loaded.preprocess), chunk(ctx),
                 **{**settings(cfg), **fixed, "input_size": loaded.input_size})
    if images is not None and hasattr(method, "set_references"):
        method.set_references(images.references())
    return method


def _run_units(ctx, images: DatasetImages, done: set[str]) -> None:
    cfg = ctx.config
    todo = ctx.ranks.shard([(layer, a, min(a + UNIT_CHANNELS, layer.channels)) for layer in ctx.layers
                            for a in range(0, layer.channels, UNIT_CHANNELS) if _unit_key(layer.name, a) not in done])
    if not todo:
        return
    examples = top_examples(ctx.store, [layer for layer in ctx.layers if any(t[0] is layer for t in todo)],
                            ctx.loaded.input_size)
    todo = [t for t in todo if t[0].name in examples]  # a layer added after the dataset pass has none yet
    source = _sources(ctx)
    with ctx.bar(sum(e - a for _, a, e in todo), "unit attributions", "ch") as bar:
        for layer, first, end in todo:
            bar.set_postfix_str(layer.name)
            index, boxes, _ = examples[layer.name]
            k = min(cfg.attr_unit_topk, index.shape[1])
            method = UnitAttribution(ctx.gradient_model, layer, chunk(ctx), source[layer.name])
            maps, inputs = unit_maps(method, images.inputs, index[first:end, :k], boxes[first:end, :k],
                                     range(first, end), cfg.attr_unit_size)
            peak = np.nanmax(np.abs(maps), axis=(2, 3), initial=0) if maps.size else np.zeros(maps.shape[:2])
            scale = np.where(np.isfinite(peak) & (peak > 0), peak, 1).astype(np.float32)
            arrays = {"maps": (maps / scale[..., None, None]).astype(np.float16), "scale": scale}
            circuit = {}
            if inputs is not None:
                arrays["inputs"] = inputs
                circuit = {"inputs_from": source[layer.name].name, "inputs_method": CIRCUIT_METHOD}
            ctx.store.write_unit(STAGE, _unit_key(layer.name, first), arrays, {
                **method.params, "layer": layer.name, "first": first, "end": end, "k": k,
                "size": cfg.attr_unit_size, **circuit})
            bar.update(end - first)


def _sources(ctx) -> dict:
    """Each selected layer's previous selected layer (None for the first): where its circuit inputs are."""
    return {layer.name: ctx.layers[i - 1] if i else None for i, layer in enumerate(ctx.layers)}


def _run_kernels(ctx, done: set[str]) -> None:
    """The kernel slices between neighbouring selected layers one convolution connects: one part per
    layer (`kernel/<layer>`; an empty one records that no single convolution connects it)."""
    source = _sources(ctx)
    todo = [l for l in ctx.layers if source[l.name] is not None and f"{KERNEL}{l.name}" not in done]
    example = torch.zeros(1, 3, ctx.loaded.input_size, ctx.loaded.input_size, device=ctx.device)
    for layer in todo:
        found = kernel_slices(ctx.loaded.model, source[layer.name].name, layer.name,
                              example.contiguous(memory_format=torch.channels_last))
        arrays, attrs = ({"kernel": found[0].numpy().astype(np.float16)}, found[1]) if found else ({}, {})
        ctx.store.write_unit(STAGE, f"{KERNEL}{layer.name}", arrays, {"layer": layer.name, **attrs})


def _unit_key(layer: str, first: int) -> str:
    return f"unit/{layer}/{first:06d}"


def _run_checks(ctx, images: DatasetImages, todo: list[str]) -> None:
    if not todo:
        return
    cfg = ctx.config
    index = images.spread(cfg.attr_check_images)
    x = images.inputs(index)
    target = torch.as_tensor([images.top1[int(i)] for i in index], device=ctx.device)
    with ctx.bar(len(todo), "attribution checks", "method") as bar:
        for name in todo:
            bar.set_postfix_str(name)
            if name == RANDOM_CONTROL:
                result = sanity.run_controls(ctx.loaded.model, x, target, points=cfg.attr_check_points,
                                             seed=cfg.seed, batch=chunk(ctx))
            else:
                def make(model, name=name):  # the trained model or a randomized copy, folded where it may be
                    model = fold_batchnorm(model)[0] if name in ON_FOLDED else model
                    return make_method(ctx, name, images, model, fixed_steps=True)
                result = sanity.run_checks(make, ctx.loaded.model, x, target, n_classes=len(ctx.loaded.class_names),
                                           groups_count=cfg.attr_check_groups, points=cfg.attr_check_points,
                                           seed=cfg.seed, batch=chunk(ctx))
            arrays, attrs = sanity.flatten(result)
            arrays.update(images=index, fractions=fractions(cfg.attr_check_points))
            ctx.store.write_unit(STAGE, f"checks/{name}", arrays,
                                 {"method": name, "nested_attrs": attrs, "seed": cfg.seed})
            bar.update(1)
