"""What the site shows of unit labels: the label and its evidence on a unit page, captions and
filters in the layer grid, and the search index's entries (search "dog" finds dog units).

Everything comes from /layers/<layer>/labels (dataset/concepts.py says how it is computed).
"""

from __future__ import annotations

import numpy as np

from atlas.site import pictures as img
from atlas.site.data import Model
from atlas.store.schema import FACETS

UNLABELLED = "unlabelled"
EVIDENCE_IMAGES = 24  # top images of the label's concept listed by name on a unit page
SEARCH_UNITS = 8  # units per label in the search index, strongest evidence first


def _name(model: Model, concept: int) -> str:
    return model.concepts[concept] if 0 <= concept < len(model.concepts) else f"concept {concept}"


def _candidates(model: Model, arrays: dict, prefix: str, index: tuple, drawn: int) -> list[dict]:
    out = []
    for concept, count, p, lift in zip(*(arrays[f"labels/{prefix}{k}"][index] for k in ("concept", "count", "p",
                                                                                          "lift"))):
        if concept < 0:
            continue
        out.append({"name": _name(model, int(concept)), "count": int(count), "drawn": drawn,
                    "precision": count / max(drawn, 1), "lift": float(lift), "p": float(p)})
    return out


def _has(model: Model, concept: int, classes: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Which of these image classes count for `concept` (the class itself, or a class of its group)."""
    if concept < len(groups) or not len(groups):
        return classes == concept
    return np.isin(classes, np.nonzero(groups == concept)[0])


def unit_label(model: Model, c: int, arrays: dict, dataset: dict | None) -> dict | None:
    """A unit page's label section: the label or "unlabelled", the strongest concepts with their counts,
    precision, lift and p, the top images that carry the label, and the facets."""
    if "labels/label" not in arrays or dataset is None:
        return None
    label, drawn = int(arrays["labels/label"][c]), int(arrays["labels/drawn"][c])
    examples = arrays["labels/examples"][c]
    examples = examples[examples >= 0]
    classes = dataset["image_class"]
    groups = dataset.get("concept_groups", np.zeros(0, np.int32))
    out = {"text": _name(model, label) if label >= 0 else None, "drawn": drawn,
           "candidates": _candidates(model, arrays, "", (c,), drawn), "images": [], "facets": [],
           "polysemantic": bool(arrays["labels/polysemantic"][c]) if "labels/polysemantic" in arrays else False}
    if label >= 0:
        carrying = examples[_has(model, label, classes[examples], groups)][:EVIDENCE_IMAGES]
        out["images"] = [_image(model, dataset, int(j)) for j in carrying]
    if "labels/facet_member" in arrays and (arrays["labels/facet_member"][c] >= 0).any():
        member = arrays["labels/facet_member"][c][:len(examples)]
        shown = arrays.get("topk/index")
        top_rows = list(shown[c]) if shown is not None else []
        for facet in range(arrays["labels/facet_label"].shape[1]):
            rows = examples[member == facet]
            if not len(rows):
                continue
            held = set(rows.tolist())
            flabel = int(arrays["labels/facet_label"][c, facet])
            out["facets"].append({
                "number": facet, "text": _name(model, flabel) if flabel >= 0 else UNLABELLED, "size": len(rows),
                "candidates": _candidates(model, arrays, "facet_", (c, facet), len(rows))[:1],
                "slots": [k for k, j in enumerate(top_rows) if j in held],
                "images": [_image(model, dataset, int(j)) for j in rows[:EVIDENCE_IMAGES // 2]]})
        out["silhouette"] = float(arrays["labels/silhouette"][c])
        out["separated"] = bool(arrays["labels/separated"][c]) if "labels/separated" in arrays else True
    return out


def _image(model: Model, dataset: dict, row: int) -> dict:
    name = dataset["paths"][row] if row < len(dataset["paths"]) else f"image {row}"
    return {"name": name, "href": f"../images/{row}.html" if row in dataset["position"] else None}


def grid_labels(model: Model, arrays: dict) -> tuple[list[str | None], np.ndarray] | None:
    """Each unit's label text (None: unlabelled) and polysemantic flag, for the layer grid."""
    if "labels/label" not in arrays:
        return None
    labels = [_name(model, int(x)) if x >= 0 else None for x in arrays["labels/label"]]
    poly = arrays.get("labels/polysemantic", np.zeros(len(labels), bool)).astype(bool)
    return labels, poly


def search_entries(model: Model, i: int, arrays: dict) -> dict[str, list]:
    """label -> [p, layer index, unit] of this layer's labelled units: the search index keeps the strongest."""
    if "labels/label" not in arrays:
        return {}
    out: dict[str, list] = {}
    for c in np.nonzero(arrays["labels/label"] >= 0)[0]:
        out.setdefault(_name(model, int(arrays["labels/label"][c])), []).append(
            (float(arrays["labels/p"][c, 0]), i, int(c)))
    return out


def search_index(entries: list[dict[str, list]], layers: int) -> dict[str, dict]:
    """The search index's labels: for each, its strongest units [layer index, unit] and its count per layer."""
    merged: dict[str, list] = {}
    for e in entries:
        for label, units in e.items():
            merged.setdefault(label, []).extend(units)
    out = {}
    for label, units in sorted(merged.items()):
        units.sort()
        per_layer = np.bincount([u[1] for u in units], minlength=layers)
        out[label] = {"units": [[u[1], u[2]] for u in units[:SEARCH_UNITS]],
                      "layers": [[int(k), int(n)] for k, n in enumerate(per_layer) if n]}
    return out


def read_facet_pictures(group) -> dict | None:
    """The layer's faceted feature visualizations (/layers/<layer>/facets), unread, by (channel, facet)."""
    g = group.get(FACETS)
    if g is None or "images" not in g:
        return None
    rows = {(int(c), int(f)): i for i, (c, f, ok) in enumerate(zip(g["channel"][()], g["facet"][()], g["done"][()]))
            if ok}
    return {"images": g["images"], "rows": rows, "alignment": g["alignment"][()]}


def write_facet_pictures(slug: str, c: int, facets: dict | None, w) -> dict[int, dict]:
    """Writes unit c's facet pictures; returns facet -> {src, alignment} for its page."""
    if not facets:
        return {}
    out = {}
    for (channel, facet), row in facets["rows"].items():
        if channel == c:
            name = f"{c}-facet{facet}.{img.PICTURE_EXT}"
            w.write(f"{slug}/{name}", img.encode(facets["images"][row]), "featurevis")
            out[facet] = {"src": name, "alignment": float(facets["alignment"][row])}
    return out
