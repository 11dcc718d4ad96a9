"""The building blocks section of an explained image's page.

A semantic dictionary (each selected layer's units that moved the top-1 logit
most, as their feature visualizations with their share of the logit) and, for
the factorized layers, the neuron groups as one picture: every pixel of the
photo tinted with the colour of the group strongest there, the more the
stronger that group is.
"""

from __future__ import annotations

import numpy as np

from atlas.site import pictures as img
from atlas.site.data import Model
from atlas.site.pages import class_name

SHOWN = 5  # units of each layer in the dictionary
# one colour per neuron group (ColorBrewer Set1); more groups than colours reuse them
PALETTE = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999")
TINT = 0.7  # opacity of a group's colour where it is at its strongest


def groups_picture(photo: np.ndarray, maps: np.ndarray, side: int = img.HEAT_SIDE) -> np.ndarray:
    """The photo with each pixel tinted by its strongest neuron group, by how strong it is.

    Args:
        photo: uint8 [S, S, 3], the image as the model saw it.
        maps: the groups' spatial maps [G, H, W] (non-negative; NaN where not computed).
        side: pixels of the picture at most (the photo's side where smaller).

    Returns:
        uint8 [side, side, 3].
    """
    side = min(side, photo.shape[0])
    base = img.shrink(photo, side).astype(np.float32)
    strength = np.zeros((1, side, side), np.float32)
    if len(maps):
        strength = np.maximum(np.stack([img.resize_map(np.nan_to_num(m), side) for m in maps]), 0)
    peak = strength.max()
    if not peak > 0:
        return base.astype(np.uint8)
    colours = np.array([_rgb(PALETTE[g % len(PALETTE)]) for g in range(len(strength))], np.float32)
    alpha = TINT * strength.max(0)[..., None] / peak
    tinted = base * (1 - alpha) + colours[strength.argmax(0)] * alpha
    return np.clip(np.rint(tinted), 0, 255).astype(np.uint8)


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[k:k + 2], 16) for k in (1, 3, 5))


def blocks_context(model: Model, blocks: dict | None, pos: int, picture: str) -> dict | None:
    """What the building blocks section of the pos-th explained image shows; None without them.

    Args:
        blocks: `data.read_blocks` of the store.
        pos: the image's place in the explained set.
        picture: the file name of its neuron-groups picture, `{j}` standing for the factorized layer's number.
    """
    if blocks is None or not 0 <= int(blocks["target"][pos]):
        return None
    layers = {layer.name: layer for layer in model.layers}
    logit = float(blocks["logit"][pos])
    names = blocks["attrs"].get("layers", [])
    dictionary = [_layer_row(layers[name], blocks, pos, col, logit) for col, name in enumerate(names)
                  if name in layers]
    groups = [_groups(layers[name], blocks, pos, picture.format(j=j))
              for j, name in enumerate(blocks["attrs"].get("nmf_layers", [])) if name in layers]
    return {"logit": logit, "target": class_name(model, int(blocks["target"][pos])), "layers": dictionary[::-1],
            "groups": groups,
            "k": int(blocks["units"].shape[-1]), "method": blocks["attrs"].get("method", "")}


def _unit(layer, c: int, drawn: np.ndarray) -> dict:
    return {"channel": c, "href": f"../{layer.slug}/{c}.html",
            "src": f"../{layer.slug}/{c}.{img.PICTURE_EXT}" if c < len(drawn) and drawn[c] else None}


def _layer_row(layer, blocks: dict, pos: int, col: int, logit: float) -> dict:
    drawn = blocks["drawn"].get(layer.name, np.zeros(0, bool))
    units = []
    for c, value in zip(blocks["units"][pos, col, :SHOWN], blocks["contribution"][pos, col, :SHOWN]):
        if c < 0 or not np.isfinite(value):
            continue
        share = float(value) / logit if logit else None
        units.append(_unit(layer, int(c), drawn) | {
            "contribution": float(value), "share": share, "positive": value >= 0,
            "width": f"{min(abs(share), 1) * 100:.0f}%" if share is not None else "0%"})
    total = float(blocks["total"][pos, col])
    return {"layer": layer.name, "href": f"../{layer.slug}/index.html", "units": units,
            "total_share": total / logit if logit and np.isfinite(total) else None}


def _groups(layer, blocks: dict, pos: int, src: str) -> dict:
    nmf = blocks["nmf"][layer.name]
    drawn = blocks["drawn"].get(layer.name, np.zeros(0, bool))
    found = []
    for g, (channels, weights) in enumerate(zip(nmf["units"][pos], nmf["weights"][pos])):
        units = [_unit(layer, int(c), drawn) | {"weight": float(w)} for c, w in zip(channels, weights) if c >= 0]
        if units:
            found.append({"colour": PALETTE[g % len(PALETTE)], "number": g + 1, "units": units, "fv": None})
    return {"layer": layer.name, "href": f"../{layer.slug}/index.html", "src": src, "groups": found,
            "shape": f"{layer.height}×{layer.width}"}


def image_blocks(model: Model, blocks: dict | None, pos: int, index: int, photo: np.ndarray, w) -> dict | None:
    """Writes the neuron-groups pictures of the explained image in /dataset row `index` (the pos-th
    explained image) and returns its building blocks section; None without building blocks.

    Args:
        w: the model folder's SiteWriter.
    """
    context = blocks_context(model, blocks, pos, f"{index}-groups-{{j}}.{img.PICTURE_EXT}")
    for j, group in enumerate(context["groups"] if context else []):
        picture = groups_picture(photo, blocks["nmf"][group["layer"]]["maps"][pos])
        w.write(f"images/{group['src']}", img.encode(picture, "heat"), "attributions")
        _direction_pictures(group, blocks.get("directions", {}).get(group["layer"]), pos, f"{index}-groups-{j}", w)
    return context


def _direction_pictures(group: dict, directions: dict | None, pos: int, stem: str, w) -> None:
    """Writes each neuron group's direction visualization where the store has one, and links it."""
    row = directions["rows"].get(pos) if directions else None
    if row is None:
        return
    images, done = directions["images"][row], directions["done"][row]
    for g in group["groups"]:
        if done[g["number"] - 1]:
            g["fv"] = f"{stem}-{g['number']}.{img.PICTURE_EXT}"
            w.write(f"images/{g['fv']}", img.encode(images[g["number"] - 1]), "featurevis")
