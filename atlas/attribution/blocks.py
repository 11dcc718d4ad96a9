"""Image building blocks (Olah et al. 2018, "The Building Blocks of Interpretability").

For each explained image, which units of every selected layer made its top-1
logit: activation x gradient of that logit with respect to the layer's output,
summed over positions, from one forward and one backward pass for all layers
at once. Where the network is linear above a layer (a classifier after global
average pooling), a layer's contributions add up to the logit minus the bias.
Only each layer's K strongest units (by |contribution|) are kept, with the sum
over all of them.

For the deepest selected layers, the image's activation [positions, channels],
clipped at 0, is also factorized into a few neuron groups by non-negative
matrix factorization: each group is a spatial map and a non-negative weight
per channel, the weights scaled to a largest value of 1.

A work unit is `blocks/<chunk>`: one pixel part of explained images.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from atlas.attribution.taps import Taps
from atlas.layers import LayerInfo
from atlas.store.schema import ATTRIBUTION, BLOCKS

STAGE = ATTRIBUTION
METHOD = "activation x gradient of the top-1 logit, summed over positions"
NMF_SETTINGS = "scikit-learn NMF, init nndsvda, Frobenius loss, activation clipped at 0, [positions, channels]"
GROUP_UNITS = 5  # strongest units kept per neuron group
KIND = BLOCKS  # the work units' prefix


def contributions(model: nn.Module, layers: list[str], x: torch.Tensor,
                  target: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Every layer's unit contributions to each image's target logit, from one forward and one backward.

    The images of a batch are independent (eval mode), so the gradient of the sum of
    their target logits is each image's own gradient.

    Args:
        model: the network, in eval mode.
        layers: layer names as `layers.discover` writes them.
        x: model inputs [B, 3, S, S].
        target: the class explained per image [B].

    Returns:
        ({layer: contributions float32 [B, C]}, {layer: activation [B, C, H, W]}, target logits float32 [B]).
    """
    with torch.enable_grad(), Taps(model, layers) as taps:
        logits = model(x)
        logit = logits.gather(1, target[:, None])[:, 0]
        found = taps.contributions(logit.sum())
    return found, {n: taps.view(n, a) for n, a in taps.acts.items()}, logit.detach().float()


def strongest(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k entries of each row with the largest |value|, strongest first.

    Returns:
        (column int32 [n, k], value float32 [n, k]); -1 and NaN past the row's length.
    """
    n, width = values.shape
    order = np.argsort(-np.abs(values), axis=1, kind="stable")[:, :k]
    units = np.full((n, k), -1, np.int32)
    found = np.full((n, k), np.nan, np.float32)
    units[:, :order.shape[1]] = order
    found[:, :order.shape[1]] = np.take_along_axis(values, order, 1)
    return units, found


def neuron_groups(act: np.ndarray, groups: int, seed: int = 0, max_iter: int = 200,
                  units: int = GROUP_UNITS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Factorizes one image's activation into neuron groups by non-negative matrix factorization.

    Args:
        act: the activation [C, H, W]; clipped at 0.
        groups: how many groups G.
        seed: NMF's random state.
        max_iter: NMF iterations at most.
        units: strongest channels kept per group.

    Returns:
        (maps float32 [G, H, W]: each group's strength per position, in activation units;
        channels int32 [G, units] and weights float32 [G, units] in [0, 1]: each group's strongest
        channels and their weights, the group's largest weight being 1; directions float32 [G, C]: each
        group's weight on every channel, the direction in channel space a feature visualization of the
        group maximizes). Groups are ordered by their total strength; a group that cannot be found (a
        silent image, fewer positions or channels than groups) has a zero map and direction, channels -1
        and weights 0.
    """
    c, h, w = act.shape
    x = np.maximum(act.reshape(c, h * w).T, 0).astype(np.float64)  # [positions, channels]
    maps = np.zeros((groups, h, w), np.float32)
    channels = np.full((groups, units), -1, np.int32)
    weights = np.zeros((groups, units), np.float32)
    directions = np.zeros((groups, c), np.float32)
    g = min(groups, h * w, c)
    if g == 0 or x.max() <= 0:
        return maps, channels, weights, directions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        nmf = NMF(n_components=g, init="nndsvda", random_state=seed, max_iter=max_iter)
        spatial = nmf.fit_transform(x)  # [positions, g]
    basis = nmf.components_  # [g, channels]
    peak = basis.max(1)
    peak = np.where(peak > 0, peak, 1)
    basis, spatial = basis / peak[:, None], spatial * peak[None, :]
    order = np.argsort(-spatial.sum(0), kind="stable")
    k = min(units, c)
    for j, group in enumerate(order):
        maps[j], directions[j] = spatial[:, group].reshape(h, w), basis[group]
        top = np.argsort(-basis[group], kind="stable")[:k]
        channels[j, :k], weights[j, :k] = top, basis[group, top]
    return maps, channels, weights, directions


def nmf_layers(layers: list[LayerInfo], count: int) -> list[LayerInfo]:
    """The `count` deepest of the layers that have a spatial map (more than one position)."""
    spatial = [layer for layer in layers if layer.height * layer.width > 1]
    return spatial[len(spatial) - count:] if count > 0 else []



def block_key(chunk: str) -> str:
    return f"{KIND}/{chunk}"


def pending(store, layers: list[LayerInfo], chunks: list[str], done: set[str]) -> list[str]:
    """The chunks whose building blocks are missing, or were computed for another choice of layers."""
    names = [layer.name for layer in layers]
    todo = []
    for chunk in chunks:
        if block_key(chunk) in done:
            with store.read_unit(STAGE, block_key(chunk)) as part:
                if json.loads(part.attrs.get("layers", "[]")) == names:
                    continue
        todo.append(chunk)
    return todo


def run_blocks(ctx, images, chunks: list[str]) -> None:
    """Computes and writes the building blocks of these chunks of explained images."""
    if not chunks:
        return
    cfg = ctx.config
    grouped = nmf_layers(ctx.layers, cfg.attr_blocks_nmf_layers)
    with ctx.bar(sum(len(images.chunks[c]) for c in chunks), "building blocks", "img") as bar:
        for chunk in chunks:
            index = images.chunks[chunk]
            arrays = _chunk_arrays(ctx, images, index, grouped, bar)
            ctx.store.write_unit(STAGE, block_key(chunk), arrays, {
                "method": METHOD, "target_rule": "top-1 prediction", "k": cfg.attr_blocks_units,
                "layers": [layer.name for layer in ctx.layers], "nmf_layers": [layer.name for layer in grouped],
                "nmf": NMF_SETTINGS, "groups": cfg.attr_blocks_groups, "nmf_max_iter": cfg.attr_blocks_nmf_iter,
                "group_units": GROUP_UNITS, "seed": cfg.seed})


def _chunk_arrays(ctx, images, index: np.ndarray, grouped: list[LayerInfo], bar) -> dict[str, np.ndarray]:
    cfg, names = ctx.config, [layer.name for layer in ctx.layers]
    n, k, g = len(index), cfg.attr_blocks_units, cfg.attr_blocks_groups
    out = {"index": index, "target": np.array([images.top1[int(i)] for i in index], np.int64),
           "logit": np.zeros(n, np.float32), "units": np.full((n, len(names), k), -1, np.int32),
           "contribution": np.full((n, len(names), k), np.nan, np.float32),
           "total": np.zeros((n, len(names)), np.float32)}
    for j, layer in enumerate(grouped):
        out[f"nmf/{j}/maps"] = np.zeros((n, g, layer.height, layer.width), np.float16)
        out[f"nmf/{j}/units"] = np.full((n, g, GROUP_UNITS), -1, np.int32)
        out[f"nmf/{j}/weights"] = np.zeros((n, g, GROUP_UNITS), np.float32)
        out[f"nmf/{j}/directions"] = np.zeros((n, g, layer.channels), np.float16)
    for a in range(0, n, cfg.attr_batch):
        rows = slice(a, min(n, a + cfg.attr_batch))
        target = torch.as_tensor(out["target"][rows], device=ctx.device)
        found, acts, logit = contributions(ctx.loaded.model, names, images.inputs(index[rows]), target)
        out["logit"][rows] = logit.cpu().numpy()
        for col, name in enumerate(names):
            values = found[name].cpu().numpy()
            out["units"][rows, col], out["contribution"][rows, col] = strongest(values, k)
            out["total"][rows, col] = values.sum(1)
        for j, layer in enumerate(grouped):
            for r, act in enumerate(acts[layer.name].float().cpu().numpy()):
                maps, units, weights, directions = neuron_groups(act, g, cfg.seed, cfg.attr_blocks_nmf_iter)
                out[f"nmf/{j}/maps"][a + r], out[f"nmf/{j}/directions"][a + r] = maps, directions
                out[f"nmf/{j}/units"][a + r], out[f"nmf/{j}/weights"][a + r] = units, weights
        bar.update(rows.stop - rows.start)
    return out
