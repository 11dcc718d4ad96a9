"""The page model of attributions: method families, badges, the checks page, settings.

Which methods are path methods is read from the store (a finite
`completeness`), not from their names; which maps are unsigned, and the
families the image page groups methods in, come from the tables below.
Every href is relative to the page it appears on.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from atlas.site import pictures as img
from atlas.site.data import Model, pretty_json, slug
from atlas.site.plots import line_plot
from atlas.store.schema import FAMILIES, METHODS

WARN_FACTOR = 5  # a completeness error up to this many tolerances is amber, beyond it red
SIMILARITY = (("spearman_abs", "Spearman |·|", "l-sa"), ("spearman", "Spearman", "l-s"), ("ssim", "SSIM", "l-ssim"))
VERDICTS = {"pass": ("ok", "passes randomization"), "fail": ("bad", "insensitive to weights")}
LOGIT_VERDICTS = {"pass": ("ok", "depends on the class"), "fail": ("bad", "ignores the class")}
RUN = "atlas attribute"  # the command that computes attributions and checks
STRIP_MODES = ("cascading", "independent")  # the rows of a method's randomization strips
STRIPS = "checks-strips"  # the checks page's one sprite of every randomization strip (name without extension)


def families(methods: list[str]) -> list[tuple[str, list[str]]]:
    """Methods grouped by family, in display order; methods of no known family last, as "Other"."""
    known = {m for _, members in FAMILIES for m in members}
    out = [(label, [m for m in members if m in methods]) for label, members in FAMILIES]
    out.append(("Other", sorted(m for m in methods if m not in known)))
    return [(label, members) for label, members in out if members]


def ordered(methods: list[str]) -> list[str]:
    """Methods in display order."""
    return [m for _, members in families(methods) for m in members]


def is_signed(method: str, params: dict | None = None) -> bool:
    """Whether a method's maps take both signs: the maps' `signed` attribute if any, else the schema's."""
    if params and "signed" in params:
        return bool(params["signed"])
    return METHODS[method].signed if method in METHODS else True


def _percent(x: float) -> str:
    return f"{x * 100:.2g} %"


def completeness_badge(info: dict, i: int) -> dict | None:
    """A path method's completeness (LRP's conservation) on image i: ok (within tolerance), warn or bad.

    None for methods that report neither.
    """
    values = info.get("completeness")
    if values is None or not math.isfinite(float(values[i])):
        return None
    error = float(values[i])
    tolerance = info["attrs"].get("tolerance")
    steps = info.get("steps")
    method = METHODS.get(info.get("params", {}).get("method"))
    if method is None or method.path:
        word = "completeness"
        title = (f"relative completeness error |sum of the map − (f(x) − f(baseline))| / |f(x) − f(baseline)| "
                 f"= {_percent(error)}")
    else:  # LRP: relevance conserved from the logit down to the pixels
        word = "conservation"
        title = f"relative conservation error |sum of the relevance − f(x)| / |f(x)| = {_percent(error)}"
    if tolerance is None:
        state = "info"
    else:
        tolerance = float(tolerance)
        title += f"; tolerance {_percent(tolerance)}"
        state = "ok" if error <= tolerance else "warn" if error <= WARN_FACTOR * tolerance else "bad"
    if steps is not None and int(steps[i]) > 0:
        title += f"; {int(steps[i])} path steps"
    return {"state": state, "text": f"{word} {_percent(error)}", "title": title}


def mask_note(info: dict, i: int) -> dict | None:
    """What an Extremal Perturbations mask achieved on image i (its area, the logit it kept); None for other methods."""
    area, kept = info.get("area"), info.get("preserved")
    if area is None or kept is None or not math.isfinite(float(area[i])):
        return None
    target = info["params"].get("area")
    title = (f"the mask keeps {_percent(float(area[i]))} of the image"
             + (f" (target {_percent(float(target))})" if target is not None else "")
             + f"; the image blurred outside it keeps {_percent(float(kept[i]))} of the logit")
    return {"text": f"area {_percent(float(area[i]))}, logit kept {_percent(float(kept[i]))}", "title": title}


def randomization(checks: dict | None, method: str) -> dict | None:
    """The randomization verdict of a method: state, text, score, threshold; None if not checked."""
    group = ((checks or {}).get("methods", {}).get(method) or {}).get("randomization")
    if not group:
        return None
    a = group["attrs"]
    verdict = str(a.get("verdict", ""))
    state, text = VERDICTS.get(verdict, ("info", f"randomization: {verdict or 'no verdict'}"))
    return {"state": state, "text": text, "verdict": verdict, "score": a.get("score"),
            "threshold": a.get("threshold", checks.get("threshold"))}


def verdict_badge(checks: dict | None, method: str, href: str) -> dict | None:
    """The small randomization badge of an image page, linking to the method on the checks page."""
    r = randomization(checks, method)
    if r is None:
        return None
    title = f"cascading randomization score {float(r['score']):.3g}" if r["score"] is not None else ""
    if r["threshold"] is not None and title:
        title += f" (insensitive above {float(r['threshold']):.3g})"
    return {"state": r["state"], "text": r["text"], "title": title, "href": f"{href}#{slug(method)}"}


def _short(text: str, n: int = 16) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def group_labels(attrs: dict, count: int) -> list[str]:
    """A label per randomized parameter group (top first): the `labels` attribute, else from `groups`."""
    given = attrs.get("labels")
    if isinstance(given, list) and len(given) == count:
        return [str(label) for label in given]
    groups = attrs.get("groups")
    labels = []
    for g in groups if isinstance(groups, list) else []:
        if isinstance(g, list):
            labels.append(str(g[0]) + (f" +{len(g) - 1}" if len(g) > 1 else "") if g else "?")
        else:
            labels.append(str(g))
    labels += [f"group {k + 1}" for k in range(len(labels), count)]
    return labels[:count]


def tick_labels(labels: list[str], n: int = 16) -> list[str]:
    """Short axis labels that tell groups apart: each group's top module, less the dotted prefix all share.

    ("features.denseblock3.denselayer16.conv2 .. features.denseblock3.denselayer1.norm1" and its
    siblings -> "denseblock3.den…"), shortened to `n` characters.
    """
    heads = [_group_head(label).split(".") for label in labels]
    shared = 0
    while len(heads) > 1 and all(len(h) > shared + 1 and h[shared] == heads[0][shared] for h in heads):
        shared += 1
    return [_short(".".join(h[shared:]), n) for h in heads]


def page_groups(methods: dict[str, dict]) -> list[str]:
    """The randomized groups the page lists once: those most methods share (usually all of them)."""
    seen = [tuple(m["randomization"]["groups"]) for m in methods.values()
            if m.get("randomization") and m["randomization"]["groups"]]
    return list(max(set(seen), key=seen.count)) if seen else []


def _mean(values: object, axis: int | None = None) -> np.ndarray | float | None:
    """The mean over images, ignoring NaN (an image a check could not score); NaN if none is left."""
    if values is None:
        return None
    values = np.asarray(values, np.float64)
    if axis is not None and values.ndim <= 1:
        return values  # already one value per step or point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: NaN, shown as a dash
        out = np.nanmean(values, axis=axis) if values.size else np.nan
    return out if axis is not None else float(out)


def _randomization_plots(group: dict, threshold: object) -> dict:
    """Similarity per cascading and independent step, averaged over the checked images."""
    plots = {}
    labels = None
    for kind in ("cascading", "independent"):
        scores = group.get(kind) or {}
        present = [(label, cls, _mean(scores[key], axis=1)) for key, label, cls in SIMILARITY if key in scores]
        if not present:
            continue
        count = len(present[0][2])
        labels = group_labels(group["attrs"], count)
        plots[kind] = line_plot(present, np.arange(count), (0.0, 1.0), tick_labels(labels),
                                    float(threshold) if threshold is not None else None)
    return {"plots": plots, "groups": labels or []}


def _curve_plot(method: dict, random: dict | None, kind: str, fractions: np.ndarray | None) -> dict | None:
    """A deletion or insertion plot: the method's mean and blur curves against the random control's."""
    own = method.get(kind)
    if not own:
        return None
    series = []
    for source, prefix, tag in ((own, "", ""), ((random or {}).get(kind) or {}, "random, ", "r")):
        for fill in ("mean", "blur"):
            if fill in source:
                series.append((f"{prefix}{fill} fill", f"l-{tag}{fill}", _mean(source[fill], axis=0)))
    if not series:
        return None
    count = len(series[0][2])
    xs = fractions if fractions is not None and len(fractions) == count else np.linspace(0, 1, count)
    control = (random or {}).get(kind) or {}
    return {"plot": line_plot(series, xs, (0.0, 1.0)),
            "auc": {fill: own["attrs"].get(f"auc_{fill}") for fill in ("mean", "blur")},
            "random": {fill: control.get("attrs", {}).get(f"auc_{fill}") for fill in ("mean", "blur")}}


def _class_names(model: Model, targets: object) -> list[str]:
    names = model.classes
    return [names[t] if 0 <= t < len(names) else f"class {t}" for t in np.asarray(targets, np.int64).tolist()]


def _strip_maps(checks: dict, method: str, mode: str) -> np.ndarray | None:
    """A method's stored randomization strip [G + 1, R, R] of one mode; None in stores without it."""
    group = (checks["methods"].get(method) or {}).get("randomization") or {}
    maps = (group.get(mode) or {}).get("maps")
    if not isinstance(maps, np.ndarray) or maps.ndim != 3 or not len(maps) or not maps.shape[-1]:
        return None
    return maps


def _signed(method: str, dataset: dict | None) -> bool:
    info = ((dataset or {}).get("attribution") or {}).get(method)
    return is_signed(method, info["params"] if info else None)


def strip_sprite(checks: dict | None, dataset: dict | None) -> tuple[np.ndarray, dict] | None:
    """Every randomization strip of the checks page in one sheet: a row per method and mode, a column per step.

    Each map is coloured on its own scale, with the method's palette (diverging
    for signed maps, sequential for unsigned ones). Returns the RGB sheet and
    its layout (file name, row of each (method, mode), rows, columns); None
    when the store holds no strip (stores written before strips were kept).
    """
    if checks is None:
        return None
    rows = [(m, mode, maps, _signed(m, dataset)) for m in ordered(list(checks["methods"]))
            for mode in STRIP_MODES if (maps := _strip_maps(checks, m, mode)) is not None]
    if not rows:
        return None
    side = min(img.STRIP_SIDE, max(maps.shape[-1] for _, _, maps, _ in rows))
    sheet, _ = img.heat_grid([[(v, signed) for v in maps] for _, _, maps, signed in rows], side)
    layout = {"src": f"{STRIPS}.{img.PICTURE_EXT}", "rows": {(m, mode): r for r, (m, mode, _, _) in enumerate(rows)},
              "count": len(rows), "columns": max(len(maps) for _, _, maps, _ in rows)}
    return sheet, layout


def _group_head(label: str) -> str:
    """The top module of a group label ("layer4.2.conv3 .. layer4.0.conv1" -> "layer4.2.conv3")."""
    return label.split(" .. ")[0]


def _strips(checks: dict, method: str, layout: dict | None, image: int | None, signed: bool) -> dict | None:
    """A method's randomization strips on the checks page: column headings and each row's tiles of the sprite."""
    if layout is None:
        return None
    modes = [(mode, maps) for mode in STRIP_MODES
             if (method, mode) in layout["rows"] and (maps := _strip_maps(checks, method, mode)) is not None]
    if not modes:
        return None
    steps = max(len(maps) for _, maps in modes) - 1
    labels = group_labels(checks["methods"][method]["randomization"]["attrs"], steps)
    of = f" of image {image}" if image is not None else ""
    rows = []
    for mode, maps in modes:
        r = layout["rows"][(method, mode)]
        cells = []
        for k in range(len(maps)):
            if k == 0:
                what = "trained model"
            elif mode == "cascading":
                what = f"groups re-initialized down to {labels[k - 1]}"
            else:
                what = f"{labels[k - 1]} re-initialized alone"
            cells.append({"cls": f"x{k} y{r}", "label": f"{method} map{of}, {what}"})
        rows.append({"mode": mode, "cells": cells, "missing": steps + 1 - len(cells)})
    heads = [{"parts": ["original"], "title": "the map of the trained model"}]
    heads += [{"parts": _group_head(label).split("."), "title": label} for label in labels]  # break at dots
    return {"heads": heads, "rows": rows, "signed": signed}


def method_checks(model: Model, checks: dict, method: str, strips: dict | None = None,
                  dataset: dict | None = None) -> dict:
    """Everything the checks page shows of one method; `strips` is the layout of `strip_sprite`."""
    data = checks["methods"].get(method) or {}
    random = checks.get("random")
    out: dict = {"name": method, "id": slug(method), "verdict": randomization(checks, method)}
    group = data.get("randomization")
    out["randomization"] = _randomization_plots(group, out["verdict"]["threshold"]) if group else None
    first = checks["images"]
    out["strips"] = _strips(checks, method, strips, int(first[0]) if len(first) else None,
                            _signed(method, dataset)) if group else None
    logit = data.get("random_logit")
    out["random_logit"] = None
    if logit:
        verdict = str(logit["attrs"].get("verdict", ""))
        state, text = LOGIT_VERDICTS.get(verdict, ("info", verdict or "no verdict"))
        out["random_logit"] = {"state": state, "text": text, "verdict": verdict, "score": logit["attrs"].get("score"),
                               "means": [(label, _mean(logit[k])) for k, label, _ in SIMILARITY if k in logit],
                               "targets": list(dict.fromkeys(_class_names(model, logit["target"])))
                               if "target" in logit else []}
    for kind in ("deletion", "insertion"):
        out[kind] = _curve_plot(data, random, kind, checks["fractions"])
    drop = (data.get("mass_centre") or {}).get("drop")
    control = ((random or {}).get("mass_centre") or {}).get("drop")
    out["mass_centre"] = {"drop": _mean(drop), "random": _mean(control)} if drop is not None else None
    return out


def checks_context(model: Model, checks: dict | None, dataset: dict | None, crumbs: list[dict],
                   strips: dict | None = None) -> dict:
    """The checks page: a summary table of every method, then each method's strips, scores and plots.

    `strips` is the layout `strip_sprite` returned, for the sprite written beside the page.
    """
    base = {"title": f"Sanity checks · {model.name}", "crumbs": crumbs, "run": RUN, "checks": checks is not None,
            "strips": None}
    if checks is None:
        return base | {"families": [], "images": [], "caveats": {}, "attrs": [], "groups": []}
    names = ordered(list(checks["methods"]))
    methods = {m: method_checks(model, checks, m, strips, dataset) for m in names}
    images = []
    for i in checks["images"].tolist():
        known = dataset is not None and 0 <= i < len(dataset["paths"])
        top = int(dataset["top5"][i][0]) if known and len(dataset["top5"][i]) else -1
        images.append({"index": i, "known": known, "path": dataset["paths"][i] if known else "",
                       "top1": _class_names(model, [top])[0] if top >= 0 else None})
    attrs = [(k, v) for k, v in sorted(checks["attrs"].items()) if k != "caveats"]
    random = checks.get("random") or {}
    control = {kind: {fill: ((random.get(kind) or {}).get("attrs") or {}).get(f"auc_{fill}")
                      for fill in ("mean", "blur")} for kind in ("deletion", "insertion")}
    control["mass_centre"] = _mean((random.get("mass_centre") or {}).get("drop"))
    return base | {"families": [(label, [methods[m] for m in members]) for label, members in families(names)],
                   "groups": page_groups(methods),
                   "images": images, "caveats": checks["caveats"], "attrs": attrs, "control": control,
                   "fractions": len(checks["fractions"]) if checks["fractions"] is not None else None,
                   "has_random": bool(random), "strips": _strips_context(strips, images),
                   "colorbar": img.colorbar_css(True), "colorbar_unsigned": img.colorbar_css(False)}


def _strips_context(strips: dict | None, images: list[dict]) -> dict | None:
    """What the page's head and legend need of the strip sprite: its file, CSS size, the image it explains."""
    if strips is None:
        return None
    first = images[0] if images else None
    at = img.tile_position
    return {"src": strips["src"], "size": f"{strips['columns'] * 100}% {strips['count'] * 100}%",
            "x": [at(k, strips["columns"]) for k in range(strips["columns"])],  # classes x<k>: the column's tile
            "y": [at(r, strips["count"]) for r in range(strips["count"])],  # classes y<r>: the row's
            "side": img.STRIP_SIDE, "image": first if first and first["known"] else None,
            "index": first["index"] if first else None}


RESULTS = frozenset({"verdict", "score", "auc_mean", "auc_blur"})  # attributes that are results, not settings


def _check_settings(data: dict) -> dict:
    """The attributes of one method's check groups that are settings (groups, threshold, ...), by check."""
    out = {}
    for kind, group in data.items():
        if isinstance(group, dict):
            params = {k: v for k, v in group.get("attrs", {}).items() if k not in RESULTS}
            if params:
                out[kind] = params
    return out


def settings(checks: dict | None, dataset: dict | None, unit_params: list[tuple[str, dict]]) -> dict:
    """The about page's attribution, unit-attribution and check settings."""
    methods = []
    if dataset is not None:
        for m in ordered(list(dataset["attribution"])):
            info = dataset["attribution"][m]
            methods.append({"name": m, "params": pretty_json(info["params"]),
                            "group": pretty_json(info["attrs"]) if info["attrs"] else None})
    shown = None
    if checks is not None:
        per_method = {m: _check_settings(data) for m, data in checks["methods"].items()}
        per_method = {m: v for m, v in per_method.items() if v}
        if len({pretty_json(v) for v in per_method.values()}) == 1:  # the usual case: the same for every method
            per_method = {"every method": next(iter(per_method.values()))}
        shared = {k: v for k, v in checks["attrs"].items() if k != "caveats"}
        shared["images"] = ", ".join(map(str, checks["images"].tolist()))  # dataset rows, one line
        fractions = checks["fractions"]
        if fractions is not None and len(fractions):
            shared["fractions"] = f"{len(fractions)} points from {float(fractions[0]):.3g} to {float(fractions[-1]):.3g}"
        control = _check_settings(checks.get("random") or {})
        if control:
            per_method["random control"] = control
        shown = {"shared": pretty_json(shared), "caveats": checks["caveats"],
                 "per_method": pretty_json(per_method) if per_method else None}
    by_text: dict[str, list[str]] = {}
    for layer, params in unit_params:
        by_text.setdefault(pretty_json(params), []).append(layer)
    units = [("every layer with dataset examples" if len(by_text) == 1 else ", ".join(layers), text)
             for text, layers in by_text.items()]
    skipped = sorted(dataset["skipped_methods"].items()) if dataset is not None else []
    return {"methods": methods, "checks": shown, "units": units, "skipped": skipped}
