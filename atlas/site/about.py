"""What a model's site says of its store: the about page, the site index's summary, the search index."""

from __future__ import annotations

import json

import h5py

from atlas.site import checks as site_checks
from atlas.site import recipes
from atlas.site.data import Model, pretty_json, store_contents, unit_attribution
from atlas.site.pages import model_crumbs
from atlas.store.schema import LAYERS


def about_context(f: h5py.File, model: Model, dataset: dict | None, checks: dict | None = None,
                  views_note: str | None = None) -> dict:
    """How the store was made: spec, weights, versions, config, parameters, settings, contents.

    Args:
        views_note: how the site sized the secondary views to fit its budget, if it shrank them.
    """
    attrs = model.attrs
    facts = [(k, attrs.get(k)) for k in ("spec", "name", "weights_id", "input_size", "created",
                                         "atlas_version", "store_format") if k in attrs]
    if views_note:
        facts.append(("site", views_note))
    params = view_params(model.layers)
    if dataset is not None:
        params.append(("dataset images", pretty_json(dataset["attrs"])))
    units = [(layer.name, unit_attribution(f[LAYERS][layer.name])[1]) for layer in model.layers]
    units = [(name, params) for name, params in units if params]
    return {"title": f"About {model.name}", "facts": facts,
            "config": pretty_json(attrs.get("config", {})), "versions": pretty_json(attrs.get("versions", {})),
            "preprocess": pretty_json(attrs.get("preprocess", {})), "params": params,
            "settings": site_checks.settings(checks, dataset, units), "run": site_checks.RUN,
            "contents": store_contents(f), "skipped": dataset["skipped"] if dataset else [],
            "crumbs": model_crumbs(model, "about"), "recipes": recipes.rows()}


def view_params(layers) -> list[tuple[str, str]]:
    """Each distinct feature-visualization setting once, with the layers it applies to.

    A deep model's layers share their settings; listing them per layer made the
    about page of ResNet-50 over 400 KB.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for layer in layers:
        for view, p in layer.view_params.items():
            groups.setdefault((view, pretty_json(p)), []).append(layer.name)
    return [(f"featurevis {view}, " + ("every layer" if len(names) == len(layers) else ", ".join(names)), text)
            for (view, text), names in groups.items()]


def summary(model: Model, extra: dict[str, dict]) -> dict:
    """What the site index lists of a model (saved as `<model>/summary.json`)."""
    previews = [e["preview"] for e in extra.values() if e["preview"]]
    preview = previews[len(previews) // 2] if previews else None
    return {"name": model.name, "slug": model.slug, "spec": model.attrs.get("spec", ""),
            "weights_id": model.attrs.get("weights_id", ""), "layers": len(model.layers),
            "units": sum(l.channels for l in model.layers), "images": model.n_images, "explained": len(model.explained),
            "preview": f"{model.slug}/{preview}" if preview else None}


def search_script(model: Model, dataset: dict | None, unit_labels: dict | None = None) -> bytes:
    """The model's search index as a script (fetch() of a local JSON file fails under file://).

    It lists layers and class names, not units: the search box parses unit ids
    such as `layer3.2:17` against the layers' channel counts, so the file stays
    small however many units the model has. Classes link to their unit of the
    output layer (a layer with one channel per class), else to their images.
    `unit_labels` (site/labels.py `search_index`): each label's strongest units
    and its count per layer, so that a label finds its units.
    """
    n = len(model.classes)
    logits = next((l for l in reversed(model.layers) if n and l.channels == n), None)
    rows = model.explained if dataset is not None else []  # only the explained images have pages
    labels = [int(dataset["labels"][i]) for i in rows] if dataset is not None else []
    index = {"name": model.name, "slug": model.slug,
             "layers": [[l.name, l.slug, l.channels] for l in model.layers],
             "classes": list(model.classes), "logits": logits.slug if logits else None, "labels": labels,
             "images": list(rows), "unitLabels": unit_labels or {}}
    # ASCII only, and no "<", so no store string can end the script early
    text = json.dumps(index, ensure_ascii=True, separators=(",", ":")).replace("<", "\\u003c")
    return f"(window.atlasModels = window.atlasModels || []).push({text});\n".encode()
