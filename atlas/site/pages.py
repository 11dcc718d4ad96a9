"""The page model: what each template is given, built from store data.

Every href here is relative to the page it appears on. Values are handed to
templates raw; jinja2's autoescape escapes them there.
"""

from __future__ import annotations

import math

import numpy as np

from atlas.site import checks as site_checks
from atlas.site import pictures as img
from atlas.site import plots
from atlas.site.data import Layer, Model
from atlas.site.labels import grid_labels, unit_label
from atlas.store.schema import VIEWS

STATS = (("mean", "mean"), ("std", "std"), ("max", "max"), ("zero_fraction", "zero fraction"))
VIEW_TEXT = {  # what each view of a unit shows, as its caption says (one per schema.VIEWS)
    "channel": "maximizes the channel's mean activation",
    "negative": "minimizes the channel's mean activation: what turns it off",
    "neuron": "maximizes the channel at the centre position only: one receptive field",
    "diversity": "several images of the channel, pushed apart in style: the different things it responds to",
}
assert tuple(VIEW_TEXT) == VIEWS, "every view needs its caption"


def fmt(value: object, digits: int = 4) -> str:
    """A number for display: `digits` significant digits; missing or NaN as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    x = float(value)  # type: ignore[arg-type]
    return "–" if math.isnan(x) else f"{x:.{digits}g}"


def crumbs(model: Model, up: int, *more: tuple[str, str | None]) -> list[dict]:
    """Breadcrumbs from the site index down; `up` is the page's depth below the model folder."""
    back = "../" * up
    items = [("Atlas", f"{back}../index.html"), (model.name, f"{back}index.html"), *more]
    return [{"label": label, "href": href} for label, href in items]


def model_crumbs(model: Model, label: str) -> list[dict]:
    """Breadcrumbs of a page in the model folder."""
    return crumbs(model, 0)[:-1] + [{"label": model.name, "href": "index.html"}, {"label": label, "href": None}]


def class_name(model: Model, index: int) -> str:
    if 0 <= index < len(model.classes):
        return model.classes[index]
    return f"class {index}" if index >= 0 else "unknown"


def layer_summary(arrays: dict, preview: str | None) -> dict:
    """What the model index shows of a layer beyond its attributes."""
    done = arrays.get("featurevis/channel_done")
    dead = arrays.get("stats/dead")
    quality = arrays.get("featurevis/quality")
    return {"preview": preview, "fv_done": int(done.sum()) if done is not None else None,
            "dead": int(dead.sum()) if dead is not None else None,
            "low": int((quality < 1).sum()) if quality is not None else None}


def _checks_line(model: Model, checks: dict | None) -> dict | None:
    """How many checked methods pass the randomization test, and which do not."""
    if checks is None:
        return None
    verdicts = {m: site_checks.randomization(checks, m) for m in site_checks.ordered(list(checks["methods"]))}
    failing = [m for m, v in verdicts.items() if v is not None and v["verdict"] == "fail"]
    passing = [m for m, v in verdicts.items() if v is not None and v["verdict"] == "pass"]
    return {"passing": len(passing), "checked": len(passing) + len(failing), "failing": failing}


def model_context(model: Model, extra: dict[str, dict], checks: dict | None = None) -> dict:
    """The model's index: every layer in forward order."""
    layers = [{"name": l.name, "href": f"{l.slug}/index.html", "kind": l.kind, "channels": l.channels,
               "shape": f"{l.height}×{l.width}", **extra[l.name]} for l in model.layers]
    notes = []
    if not any(l.has_fv for l in model.layers):
        notes.append("Feature visualization has not run for any layer yet.")
    if not model.n_images:
        notes.append("The dataset stage has not run: there are no dataset examples, statistics or image pages.")
    elif not model.methods:
        notes.append("Attribution has not run: image pages show predictions only.")
    return {"title": model.name, "model": model, "layers": layers, "notes": notes,
            "units": sum(l.channels for l in model.layers), "checks": _checks_line(model, checks),
            "crumbs": crumbs(model, 0)[:-1] + [{"label": model.name, "href": None}]}


def _data(values: np.ndarray | None, c: int, digits: int) -> str | None:
    """A grid cell's sort key, short: `digits` significant digits; None if missing or NaN."""
    if values is None or not np.isfinite(values[c]):
        return None
    return f"{float(values[c]):.{digits}g}"


def _grid(model: Model, layer: Layer, arrays: dict) -> list[dict]:
    """Every cell: unit, CSS classes (its sprite sheet and position, dead or not), sort keys, label."""
    done = arrays.get("featurevis/channel_done")
    dead = arrays.get("stats/dead", np.zeros(layer.channels, bool))
    quality, top = arrays.get("featurevis/quality"), arrays.get("stats/max")
    labels, poly = grid_labels(model, arrays) or (None, None)
    cells = []
    for c in range(layer.channels):
        k = c % img.SHEET_UNITS
        cls = (f"s{c // img.SHEET_UNITS} x{k % img.SHEET_COLUMNS} y{k // img.SHEET_COLUMNS}"
               if layer.has_fv and (done is None or done[c]) else "nofv")
        cells.append({"c": c, "cls": cls + " dead" if dead[c] else cls,
                      "q": _data(quality, c, 3), "m": _data(top, c, 4),
                      "l": labels[c] if labels else None, "poly": bool(poly[c]) if poly is not None else False})
    return cells


def _stage_notes(layer: Layer, arrays: dict) -> list[str]:
    notes = []
    if not layer.has_fv:
        notes.append("Feature visualization has not run for this layer.")
    elif not arrays.get("featurevis/channel_done", np.ones(1, bool)).all():
        notes.append("Feature visualization is partial: grey units are not rendered yet.")
    if "topk/index" not in arrays:
        notes.append("Dataset examples have not been computed for this layer.")
    if "stats/dead" not in arrays:
        notes.append("Activation statistics have not been computed for this layer.")
    return notes


def _layer_link(model: Model, i: int, prefix: str) -> dict | None:
    if not 0 <= i < len(model.layers):
        return None
    return {"label": model.layers[i].name, "href": f"{prefix}{model.layers[i].slug}/index.html"}


def layer_context(model: Model, i: int, arrays: dict, sheets: list[dict]) -> dict:
    """A layer page: every unit in one grid drawn from sprite sheets."""
    layer = model.layers[i]
    rows = math.ceil(min(img.SHEET_UNITS, layer.channels) / img.SHEET_COLUMNS)
    dead, quality = arrays.get("stats/dead"), arrays.get("featurevis/quality")
    labelled = arrays.get("labels/label")
    return {"title": layer.name, "layer": layer, "cells": _grid(model, layer, arrays), "sheets": sheets,
            "labelled": int((labelled >= 0).sum()) if labelled is not None else None,
            "polysemantic": int(arrays["labels/polysemantic"].sum()) if "labels/polysemantic" in arrays else None,
            "label_params": _label_params(arrays),
            "columns": img.SHEET_COLUMNS, "rows": rows, "cell": img.CELL,
            "dead": int(dead.sum()) if dead is not None else None,
            "low": int((quality < 1).sum()) if quality is not None else None,
            "has_quality": quality is not None, "has_max": "stats/max" in arrays,
            "notes": _stage_notes(layer, arrays),
            "prev": _layer_link(model, i - 1, "../"), "next": _layer_link(model, i + 1, "../"),
            "crumbs": crumbs(model, 1, (layer.name, None))}


def _label_params(arrays: dict) -> dict | None:
    """How the layer's labels were drawn: top images per unit and the search set they are compared with."""
    if "labels/drawn" not in arrays or not len(arrays["labels/drawn"]):
        return None
    return {"drawn": int(arrays["labels/drawn"].max())}


def _examples(group: str, c: int, arrays: dict, dataset: dict | None, strip: dict | None) -> list[dict] | None:
    """A unit's top or bottom examples: each a tile of the unit's example strip, linked to the image's
    page where it has one (explained images only)."""
    if dataset is None or f"{group}/index" not in arrays or strip is None:
        return None
    out = []
    first = strip["first"][group]
    for slot, (j, v) in enumerate(zip(arrays[f"{group}/index"][c], arrays[f"{group}/value"][c])):
        if not 0 <= j < len(dataset["paths"]):
            continue  # -1: fewer than k images were seen
        out.append({"href": f"../images/{j}.html" if int(j) in dataset["position"] else None, "value": v,
                    "style": f"--i:{first + slot}", "label": f"image {j}"})  # its tile: atlas.css .crops.ex
    return out


def _strip_style(strip: dict | None) -> dict | None:
    """The example lists' strip (a URL in the page's own style, so it resolves against the page) and
    its tile count, which each crop's `--i` indexes."""
    return {"src": strip["src"], "style": f"--n:{strip['total']}"} if strip else None


def _unit_link(model: Model, i: int, c: int) -> dict | None:
    """The unit before or after, crossing into the neighbouring layer at the ends."""
    if c < 0:
        if i == 0:
            return None
        i, c = i - 1, model.layers[i - 1].channels - 1
    elif c >= model.layers[i].channels:
        if i + 1 >= len(model.layers):
            return None
        i, c = i + 1, 0
    layer = model.layers[i]
    return {"label": f"{layer.name}:{c}", "href": f"../{layer.slug}/{c}.html"}


def _at(arrays: dict, key: str, c: int) -> np.ndarray | None:
    """Channel c of an optional array."""
    return arrays[key][c] if key in arrays else None


def _views(layer: Layer, c: int, arrays: dict) -> list[dict]:
    """The views other than `channel` that the store holds for this layer, rendered or pending.

    The rendered ones share one strip (`<c>-views`); each view shows its tiles of it.
    """
    out, tiles = [], 0
    for view in layer.views:
        if view == "channel":
            continue
        done = arrays.get(f"featurevis/{view}_done")
        objective = _at(arrays, f"featurevis/{view}_objective", c)
        count = int(objective.size) if objective is not None else 1
        out.append({"name": view, "text": VIEW_TEXT[view], "done": done is None or bool(done[c]),
                    "first": tiles, "count": count,
                    "objective": None if objective is None else float(np.mean(objective))})
        tiles += count if out[-1]["done"] else 0
    for v in out:  # once the strip's length is known
        v["style"] = f"background:url({c}-views.{img.PICTURE_EXT}) {img.window(v['first'], v['count'], tiles)}"
    return out


def views_line(model: Model, note: str | None) -> str | None:
    """Which views the atlas renders, so a missing one reads as a choice rather than a fault.

    Args:
        note: how the site sized the secondary views to fit its budget, if it shrank them.
    """
    rendered = model.views
    if not rendered:
        return None
    missing = [v for v in VIEWS if v not in rendered]
    return (f"Views in this atlas: {', '.join(rendered)}"
            + (f"; not rendered: {', '.join(missing)}" if missing else "")
            + (f"; {note}." if note else "."))


def _quality(c: int, arrays: dict) -> dict | None:
    """The quality number with the two activations it divides."""
    if "featurevis/quality" not in arrays:
        return None
    value = float(arrays["featurevis/quality"][c])
    best = arrays["topk/value"][c, 0] if "topk/value" in arrays else None
    return {"value": value, "peak": _at(arrays, "featurevis/channel_peak", c), "best": best,
            "low": value < 1, "known": math.isfinite(value)}


def _histogram(c: int, arrays: dict) -> dict | None:
    if "stats/hist" not in arrays or "stats/hist_edges" not in arrays:
        return None
    peak = _at(arrays, "featurevis/channel_peak", c)
    marks = {"visualization": float(peak)} if peak is not None else {}
    return plots.histogram_plot(arrays["stats/hist"][c], arrays["stats/hist_edges"], marks)


def _fired(c: int, arrays: dict, dataset: dict | None, fired: dict | None, strip: dict | None) -> list[dict]:
    """The first Ku top images of unit c: the unit's attribution map over the greyed crop."""
    if fired is None or dataset is None or strip is None or "topk/index" not in arrays:
        return []
    count = len(fired["finite"])
    out = []
    for j, ok in enumerate(fired["finite"]):
        index = int(arrays["topk/index"][c, j]) if j < arrays["topk/index"].shape[1] else -1
        if not ok or not 0 <= index < len(dataset["paths"]):
            continue
        photo_at = f"{img.tile_position(strip['first']['topk'] + j, strip['total'])} 0"
        overlay = img.overlay_background(fired["src"], f"{img.tile_position(j, count)} 0", f"{count * 100}% 100%",
                                         strip["src"], photo_at, f"{strip['total'] * 100}% 100%")
        out.append({"href": f"../images/{index}.html" if index in dataset["position"] else None, "index": index,
                    "value": arrays["topk/value"][c, j], "overlay": overlay})
    return out


def unit_context(model: Model, i: int, c: int, arrays: dict, dataset: dict | None, views_line: str | None,
                 fired: dict | None = None, has_unit_attribution: bool = False, strip: dict | None = None) -> dict:
    """A unit page: every view, quality, loss curve, dataset examples, statistics, histogram,
    and what made the unit fire on its top images.

    Args:
        views_line: which views the atlas renders (`views_line`), the same on every unit page.
        strip: the unit's example strip: file, tiles in all, first tile of each list ("topk", "bottomk").
    """
    layer = model.layers[i]
    done = arrays.get("featurevis/channel_done")
    fv = None
    if layer.has_fv and (done is None or done[c]):
        loss = _at(arrays, "featurevis/channel_loss", c)
        fv = {"src": f"{c}.{img.PICTURE_EXT}", "objective": _at(arrays, "featurevis/channel_objective", c),
              "seed": _at(arrays, "featurevis/channel_seed", c), "steps": _at(arrays, "featurevis/channel_steps", c),
              "text": VIEW_TEXT["channel"],
              "loss": plots.loss_points(loss) if loss is not None else ""}
    stats = [(label, arrays[f"stats/{key}"][c]) for key, label in STATS if f"stats/{key}" in arrays]
    top = _examples("topk", c, arrays, dataset, strip)
    return {"title": f"{layer.name}:{c}", "layer": layer, "channel": c, "fv": fv,
            "fv_pending": layer.has_fv and fv is None, "stats": stats,
            "views": _views(layer, c, arrays), "views_line": views_line,
            "quality": _quality(c, arrays), "hist": _histogram(c, arrays),
            "dead": bool(arrays["stats/dead"][c]) if "stats/dead" in arrays else None,
            "top": top, "bottom": _examples("bottomk", c, arrays, dataset, strip), "strip": _strip_style(strip),
            "label": unit_label(model, c, arrays, dataset),
            "fired": _fired(c, arrays, dataset, fired, strip), "fired_scale": fired["scale"] if fired else None,
            "fired_params": fired["params"] if fired else {},
            "fired_missing": bool(top) and not has_unit_attribution, "run": site_checks.RUN,
            "prev": _unit_link(model, i, c - 1), "next": _unit_link(model, i, c + 1),
            "prev_layer": _layer_link(model, i - 1, "../"), "next_layer": _layer_link(model, i + 1, "../"),
            "crumbs": crumbs(model, 1, (layer.name, "index.html"), (f"unit {c}", None))}
