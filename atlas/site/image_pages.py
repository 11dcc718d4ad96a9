"""The page model of the dataset images: each explained image with its maps, and the image index.

An image is named by its /dataset row (its number in the search set) on every
page; the attribution methods' per-image vectors are read at its place in the
explained set (`dataset["position"][row]`).
"""

from __future__ import annotations

import math

import numpy as np

from atlas.site import checks as site_checks
from atlas.site import pictures as img
from atlas.site.data import Model
from atlas.site.pages import class_name, crumbs

IMAGES_PER_INDEX = 500  # thumbnails on one page of the dataset image index


def label_methods(dataset: dict, methods: list[str], i: int, label_maps: dict) -> list[str]:
    """Methods whose true-label map of the i-th explained image is worth showing: the label is known
    and is not the top-1."""
    out = []
    for m in methods:
        info = dataset["attribution"][m]
        label, target = info["label_target"], info["target"]
        if m in label_maps and label is not None and target is not None and 0 <= label[i] != target[i]:
            out.append(m)
    return out


def _unscaled(value: float | None, factors: np.ndarray | None, i: int) -> float | None:
    """A value read off a stored map, in attribution units: stores may keep maps divided by a per-image scale."""
    if value is None or factors is None or not np.isfinite(factors[i]):
        return value
    return value * float(factors[i])


def _map_item(dataset: dict, checks: dict | None, i: int, column: int, method: str, sprite: dict) -> dict:
    """One method's cell of an image page: where its maps lie in the sprite, scales, badges."""
    info = dataset["attribution"][method]
    columns, rows = len(sprite["scales"][0]), sprite["rows"]
    at = lambda r: f"{img.tile_position(column, columns)} {img.tile_position(r, rows)},0 0,0 0,0 0"  # noqa: E731
    label_scale = _unscaled(sprite["scales"][1][column] if rows > 1 else None, info["label_scale"], i)
    return {"method": method, "parts": method.split("_"), "at": at(0),
            "scale": _unscaled(sprite["scales"][0][column], info["scale"], i),
            "signed": site_checks.is_signed(method, info["params"]),
            "label_at": at(1) if label_scale is not None else None, "label_scale": label_scale,
            "score": info["score"][i] if info["score"] is not None else None,
            "completeness": site_checks.completeness_badge(info, i), "mask": site_checks.mask_note(info, i),
            "non_finite": info["finite"] is not None and not bool(info["finite"][i]),
            "verdict": site_checks.verdict_badge(checks, method, "../checks.html")}


def image_context(model: Model, dataset: dict, checks: dict | None, i: int, methods: list[str],
                  sprite: dict | None, blocks: dict | None = None) -> dict:
    """The page of the explained image in /dataset row i: the image, label, top-5 predictions, every
    attribution map, grouped by family, and its building blocks (`site.blocks.blocks_context`)."""
    label = int(dataset["labels"][i])
    pos = dataset["position"][i]
    predictions = [{"name": class_name(model, int(k)), "prob": float(p), "correct": int(k) == label}
                   for k, p in zip(dataset["top5"][i], dataset["top5_prob"][i])]
    families = []
    target = label_target = None
    if sprite is not None:
        items = {m: _map_item(dataset, checks, pos, k, m, sprite) for k, m in enumerate(methods)}
        families = [(name, [items[m] for m in members]) for name, members in site_checks.families(methods)]
        first = dataset["attribution"][methods[0]]["target"]
        top1 = first[pos] if first is not None else dataset["top5"][i][0] if len(dataset["top5"][i]) else -1
        target = class_name(model, int(top1))
        if sprite["rows"] > 1:
            label_target = class_name(model, label)
        sprite = sprite | {"size": f"{len(methods) * 100}% {sprite['rows'] * 100}%"}
    rows = model.explained
    before, after = (rows[pos - 1] if pos > 0 else None), (rows[pos + 1] if pos + 1 < len(rows) else None)
    return {"title": f"image {i}", "index": i, "path": dataset["paths"][i],
            "label": class_name(model, label) if label >= 0 else None, "predictions": predictions,
            "families": families, "sprite": sprite, "target": target, "label_target": label_target,
            "blocks": blocks,
            "colorbar": img.colorbar_css(True), "colorbar_unsigned": img.colorbar_css(False), "under": img.UNDER,
            "methods_missing": not model.methods, "has_checks": checks is not None,
            "skipped_methods": sorted(dataset["skipped_methods"].items()),
            "prev": {"href": f"{before}.html", "label": f"image {before}"} if before is not None else None,
            "next": {"href": f"{after}.html", "label": f"image {after}"} if after is not None else None,
            "crumbs": crumbs(model, 1, ("images", image_index_name(pos // IMAGES_PER_INDEX)[7:]),
                              (f"image {i}", None))}


def image_index_name(number: int) -> str:
    """The file of the number-th page of the dataset image index, relative to the model folder."""
    return "images/index.html" if number == 0 else f"images/index-{number + 1}.html"


def image_index_count(n_images: int) -> int:
    return math.ceil(n_images / IMAGES_PER_INDEX)


def image_index_contexts(model: Model, dataset: dict) -> list[dict]:
    """One context per page of the index of the explained images (the ones with a page)."""
    rows = model.explained
    count = max(image_index_count(len(rows)), 1)
    attrs = dataset["attrs"]
    out = []
    for number in range(count):
        start = number * IMAGES_PER_INDEX
        stop = min(start + IMAGES_PER_INDEX, len(rows))
        images = [{"index": i, "path": dataset["paths"][i]} for i in rows[start:stop]]
        link = lambda k: {"href": image_index_name(k)[7:], "label": f"page {k + 1}"}  # noqa: E731
        out.append({"title": f"{model.name} images", "images": images, "start": start, "stop": stop,
                    "explained": len(rows), "total": model.n_images, "rule": attrs.get("rule"),
                    "skipped": dataset["skipped"] if number == 0 else [],
                    "pages": [link(k) | {"current": k == number} for k in range(count)] if count > 1 else [],
                    "crumbs": crumbs(model, 1, ("images", None))})
    return out
