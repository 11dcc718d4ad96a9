"""What the site shows, read from a store: model metadata, layers, bulk arrays.

Every array is read per layer in one slice (never element by element), so a
layer of thousands of channels costs a handful of HDF5 reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import h5py
import numpy as np

from atlas.errors import AtlasError
from atlas.store import read_attrs
from atlas.store.schema import (ATTRIBUTION, BLOCKS, BOTTOMK, CHECKS, CLASSES, CONCEPTS, DATASET, DIRECTIONS,
                                 FEATUREVIS, LABELS, LAYERS, RANDOM_CONTROL, STATS, TOPK, UNIT_ATTRIBUTION, VIEWS,
                                 view_dataset)

_SAFE = re.compile(r"[A-Za-z0-9._]")
# Names the site itself uses inside a model folder or at the site root.
RESERVED = frozenset({"images", "static", "index.html", "404.html", "about.html", "summary.json", "compare"})
COMPARISONS = "compare"  # <model>/compare/<other>/: `atlas compare` of the model with another; kept by re-renders


def slug(name: str) -> str:
    """A file-system- and URL-safe folder name for a layer or model name.

    Letters, digits, `.` and `_` are kept; every other byte of the UTF-8 name,
    `-` included, becomes `-XX` (hex). The mapping is one-to-one, never yields
    `.`, `..`, a leading dot or a path separator, and keeps dotted PyTorch
    names readable (`layer1.0.relu@2` -> `layer1.0.relu-402`).

    Raises:
        AtlasError: the name is empty.
    """
    if not name:
        raise AtlasError("empty layer or model name in the store; every layer and the model need a name")
    out = "".join(c if _SAFE.fullmatch(c) else "".join(f"-{b:02X}" for b in c.encode()) for c in name)
    if out.startswith(".") or out.lower() in RESERVED:
        out = f"-{ord(out[0]):02X}{out[1:]}"
    return out


@dataclass
class Layer:
    """One layer as the site lists it."""

    name: str
    slug: str
    kind: str
    channels: int
    height: int
    width: int
    has_fv: bool
    has_examples: bool
    has_stats: bool
    views: list[str] = field(default_factory=list)  # feature-visualization views the store holds
    fv_params: dict = field(default_factory=dict)  # of the channel view
    view_params: dict[str, dict] = field(default_factory=dict)
    example_params: dict = field(default_factory=dict)
    pre: str | None = None  # its pre-activation, where its output is an activation's


@dataclass
class Model:
    """Model-level metadata of one store."""

    name: str
    slug: str
    attrs: dict
    classes: list[str]
    layers: list[Layer]
    n_images: int  # the search set: every image the dataset pass read
    methods: list[str]
    explained: list[int] = field(default_factory=list)  # /dataset rows of the explained images, ascending
    concepts: list[str] = field(default_factory=list)  # what unit labels number: the classes, then their groups

    @property
    def views(self) -> list[str]:
        """Views rendered for at least one layer, in display order."""
        present = {v for layer in self.layers for v in layer.views}
        return [v for v in VIEWS if v in present]


def _strings(ds: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[()]]


def _layer(name: str, g: h5py.Group) -> Layer:
    a = read_attrs(g)
    fv = g.get(FEATUREVIS)
    views = [v for v in VIEWS if fv is not None and v in fv] if fv is not None else []
    params = {v: read_attrs(fv[v]) for v in views}
    return Layer(
        name=name, slug=slug(name), kind=str(a.get("kind", "?")), channels=int(a["channels"]),
        height=int(a.get("height", 1)), width=int(a.get("width", 1)),
        has_fv="channel" in views, has_examples=TOPK in g, has_stats=STATS in g,
        views=views, fv_params=params.get("channel", {}), view_params=params,
        example_params=read_attrs(g[TOPK]) if TOPK in g else {}, pre=str(a.get("pre", "")) or None,
    )


def read_model(f: h5py.File) -> Model:
    """Reads the model's metadata and its layers in forward order.

    Raises:
        AtlasError: the store has no `name` attribute or no layers.
    """
    attrs = read_attrs(f)
    if not attrs.get("name"):
        raise AtlasError(f"{f.filename} has no root attribute 'name'; it is not a consolidated Atlas store")
    groups = f.get(LAYERS)
    if groups is None or not len(groups):
        raise AtlasError(f"{f.filename} has no layers; run `atlas build` to fill the store first")
    ordered = sorted(groups.items(), key=lambda kv: int(kv[1].attrs.get("order", 0)))
    slugs = [slug(n) for n, _ in ordered]
    if len({s.lower() for s in slugs}) != len(slugs):
        raise AtlasError(f"{f.filename} has layer names that differ only in case; "
                         f"the site needs names that stay distinct on case-insensitive disks")
    d = f.get(DATASET)
    n_images = len(d["paths"]) if d is not None and "paths" in d else 0
    explained = [int(i) for i in d["explained"][()]] if n_images and "explained" in d and "images" in d else []
    return Model(
        name=str(attrs["name"]), slug=slug(str(attrs["name"])), attrs=attrs,
        classes=_strings(f[CLASSES]) if CLASSES in f else [],
        layers=[_layer(n, g) for n, g in ordered], n_images=n_images,
        methods=sorted(m for m, g in f[ATTRIBUTION].items() if "maps" in g)
        if ATTRIBUTION in f and explained else [], explained=explained,
        concepts=_strings(f[DATASET][CONCEPTS]) if DATASET in f and CONCEPTS in f[DATASET] else [],
    )


def read_layer_arrays(g: h5py.Group) -> dict[str, np.ndarray]:
    """Every array of one layer but the pictures, each read in one slice; missing stages are absent keys.

    Pictures (`featurevis/<view>`) and example crops can be gigabytes for a wide
    layer: read them in slices with `pictures` and `crops`.
    """
    out: dict[str, np.ndarray] = {}
    for group in (FEATUREVIS, TOPK, BOTTOMK, STATS, LABELS):
        if group in g:
            for key, ds in g[group].items():
                if isinstance(ds, h5py.Dataset) and not (group == FEATUREVIS and key in VIEWS) and key != "crops":
                    out[f"{group}/{key}"] = ds[()]
    return out


def crops(g: h5py.Group) -> dict[str, h5py.Dataset]:
    """The layer's stored example crops by list ("topk", "bottomk"), unread: one JPEG strip per unit."""
    return {name: g[name]["crops"] for name in (TOPK, BOTTOMK)
            if name in g and isinstance(g[name].get("crops"), h5py.Dataset)}


class Faded:
    """A view's stored pictures, read faded by their transparency map (MACO's) towards mid grey.

    Sliced like the dataset; `alpha` 255 keeps a pixel, 0 shows the grey under it.
    """

    def __init__(self, images: h5py.Dataset, alpha: h5py.Dataset):
        self.images, self.alpha = images, alpha
        self.shape = images.shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> np.ndarray:
        pixels, alpha = self.images[index].astype(np.float32), self.alpha[index].astype(np.float32)[..., None] / 255
        return (pixels * alpha + 128.0 * (1 - alpha)).round().astype(np.uint8)


def pictures(g: h5py.Group) -> dict[str, h5py.Dataset | Faded]:
    """The layer's feature visualizations by view, unread (faded by their transparency where stored)."""
    fv = g.get(FEATUREVIS)
    out = {}
    for v in VIEWS:
        if fv is not None and isinstance(fv.get(v), h5py.Dataset):
            alpha = fv.get(view_dataset(v, "alpha"))
            out[v] = Faded(fv[v], alpha) if isinstance(alpha, h5py.Dataset) else fv[v]
    return out


def _image_classes(labels: np.ndarray, top5: np.ndarray) -> np.ndarray:
    """Each search image's class as unit labels count it: the true label where known, else the top-1."""
    top1 = top5[:, 0] if top5.ndim == 2 and top5.shape[1] else np.full(len(labels), -1)
    return np.where(labels >= 0, labels, top1)


def read_dataset(f: h5py.File) -> dict:
    """The dataset's per-image metadata (not the pixels): every search image's, and which are explained.

    Per-image vectors of the attribution methods are aligned with the explained
    set: `position[row]` is a /dataset row's place in it.
    """
    d = f[DATASET]
    n = len(d["paths"])
    explained = d["explained"][()] if "explained" in d and "images" in d else np.zeros(0, np.int64)

    def get(key: str, default: np.ndarray) -> np.ndarray:
        return d[key][()] if key in d else default
    return {
        "paths": _strings(d["paths"]) if "paths" in d else [""] * n,
        "labels": get("labels", np.full(n, -1)),
        "concept_groups": get("concept_groups", np.zeros(0, np.int32)),
        "image_class": _image_classes(get("labels", np.full(n, -1)), get("top5", np.zeros((n, 0), np.int64))),
        "top5": get("top5", np.zeros((n, 0), np.int64)),
        "top5_prob": get("top5_prob", np.zeros((n, 0), np.float32)),
        "skipped": list(zip(_strings(d["skipped_paths"]), _strings(d["skipped_reasons"])))
        if "skipped_paths" in d and "skipped_reasons" in d else [],
        "attrs": {**read_attrs(d), **(read_attrs(d["explained"]) if "explained" in d else {})},
        "explained": explained, "position": {int(row): pos for pos, row in enumerate(explained)},
        "attribution": {m: _attribution(g) for m, g in f.get(ATTRIBUTION, {}).items() if "maps" in g},
        "skipped_methods": skipped_methods(f),
    }


def skipped_methods(f: h5py.File) -> dict[str, str]:
    """Methods that do not apply to the model, with the reason (attribute `skipped` of /attribution)."""
    g = f.get(ATTRIBUTION)
    skipped = read_attrs(g).get("skipped", {}) if isinstance(g, h5py.Group) else {}
    return {str(k): str(v) for k, v in skipped.items()} if isinstance(skipped, dict) else {}


def _attribution(g: h5py.Group) -> dict:
    """One method's per-image vectors (not its maps), its parameters and the group's attributes."""
    def get(key: str) -> np.ndarray | None:
        return g[key][()] if isinstance(g.get(key), h5py.Dataset) else None
    return {"target": get("target"), "score": get("score"), "label_target": get("label_target"),
            "completeness": get("completeness"), "steps": get("steps"), "area": get("area"),
            "preserved": get("preserved"),
            "scale": get("scale"), "label_scale": get("label_scale"),  # maps stored divided by these
            "finite": get("finite"),
            "has_label_maps": isinstance(g.get("label_maps"), h5py.Dataset),
            "params": read_attrs(g["maps"]), "attrs": read_attrs(g)}


def _tree(g: h5py.Group) -> dict:
    """A group's datasets (read) and subgroups, recursively, with its attributes under "attrs"."""
    out: dict = {"attrs": read_attrs(g)}
    for key, item in g.items():
        out[key] = _tree(item) if isinstance(item, h5py.Group) else item[()]
    return out


def read_checks(f: h5py.File) -> dict | None:
    """The sanity checks: images, fractions, attributes, and per method (and `random`) its check groups.

    Returns None when the store has no /checks group. Every array is small
    ([G, n] scores, [n, P] curves), so the whole group is read at once.
    """
    c = f.get(CHECKS)
    if not isinstance(c, h5py.Group):
        return None
    tree = _tree(c)
    attrs = tree.pop("attrs")
    images, fractions = tree.pop("images", np.zeros(0, np.int64)), tree.pop("fractions", None)
    methods = {k: v for k, v in tree.items() if isinstance(v, dict)}
    random = methods.pop(RANDOM_CONTROL, None)
    caveats = attrs.get("caveats", {})
    return {"images": np.asarray(images, np.int64), "fractions": fractions, "attrs": attrs,
            "caveats": caveats if isinstance(caveats, dict) else {}, "threshold": attrs.get("threshold"),
            "methods": methods, "random": random}


def read_blocks(f: h5py.File) -> dict | None:
    """The building blocks of the explained images (every array of /blocks is small, so all of it is
    read), with `drawn`: per layer of theirs, which channels have a `channel` visualization (the
    picture the site shows for a unit). None when the store has no building blocks.
    """
    g = f.get(BLOCKS)
    if not isinstance(g, h5py.Group) or not isinstance(g.get("units"), h5py.Dataset):
        return None
    tree = _tree(g)
    drawn = {}
    for name in tree["attrs"].get("layers", []):
        layer = f[LAYERS].get(name) if LAYERS in f else None
        fv = layer.get(FEATUREVIS) if layer is not None else None
        channels = int(layer.attrs.get("channels", 0)) if layer is not None else 0
        rendered = fv is not None and isinstance(fv.get("channel"), h5py.Dataset)
        done = fv.get(view_dataset("channel", "finite")) if rendered else None
        drawn[name] = done[()].astype(bool) if done is not None else np.full(channels, rendered)
    return {**tree, "drawn": drawn, "directions": _directions(f)}


def _directions(f: h5py.File) -> dict[str, dict]:
    """Per factorized layer, the feature visualizations of its neuron groups' directions (unread) and
    the row of each explained image (by its position in the explained set) among them."""
    g = f.get(DIRECTIONS)
    if not isinstance(g, h5py.Group) or DATASET not in f or "explained" not in f[DATASET]:
        return {}
    explained = f[DATASET]["source_index"][...][f[DATASET]["explained"][...]]
    position = {int(s): pos for pos, s in enumerate(explained)}
    out = {}
    for layer, d in g.items():
        rows = {position[int(s)]: row for row, s in enumerate(d["index"][...]) if int(s) in position}
        out[layer] = {"images": d["images"], "done": d["done"][...], "rows": rows}
    return out


def unit_attribution(g: h5py.Group) -> tuple[h5py.Dataset | None, dict]:
    """A layer's unit-attribution maps (unread) and their attributes; (None, {}) if not computed."""
    u = g.get(UNIT_ATTRIBUTION)
    if not isinstance(u, h5py.Group) or not isinstance(u.get("maps"), h5py.Dataset):
        return None, {}
    return u["maps"], {**read_attrs(u), **read_attrs(u["maps"])}


def store_contents(f: h5py.File) -> list[dict]:
    """One row per dataset: path, shape, dtype (what `h5ls -r` shows).

    The datasets of every layer are listed once, under `/layers/<layer>/`, with C
    for the layer's channel count and how many layers hold them: a deep model's
    rows would otherwise fill hundreds of kilobytes with the same names.
    """
    rows: dict[str, dict] = {}

    def visit(name: str, obj: h5py.HLObject) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        parts = name.split("/")
        channels = -1
        if parts[0] == LAYERS and len(parts) > 2:
            channels = int(f[LAYERS][parts[1]].attrs.get("channels", -1))
            name = f"{LAYERS}/<layer>/" + "/".join(parts[2:])
        row = rows.setdefault("/" + name, {"path": "/" + name, "shapes": [], "layers": 0,
                                           "dtype": "str" if h5py.check_string_dtype(obj.dtype) else str(obj.dtype)})
        shape = "×".join("C" if d == channels else str(d) for d in obj.shape) or "scalar"
        if shape not in row["shapes"]:
            row["shapes"].append(shape)
        row["layers"] += channels >= 0
    f.visititems(visit)
    for row in rows.values():
        shapes = row.pop("shapes")
        row["shape"] = ", ".join(shapes[:3]) + (", …" if len(shapes) > 3 else "")
        if row["layers"]:
            row["shape"] += f" (in {row['layers']} layers)"
    return list(rows.values())


def pretty_json(value: object) -> str:
    """Indented JSON for display; non-JSON values become strings."""
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)
