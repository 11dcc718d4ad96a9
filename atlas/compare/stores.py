"""What a comparison reads of each store: the model, its layers' activation summaries, its images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from atlas.errors import AtlasError
from atlas.site.data import slug
from atlas.store import open_store, read_attrs
from atlas.store.schema import DATASET, FEATUREVIS, LAYERS, MEANS, view_dataset

RANDOM = "random initialization"  # how a store's weights_id starts for the architecture's own initialization


@dataclass
class Side:
    """One of the two stores compared."""

    path: Path
    name: str
    slug: str
    spec: str
    weights_id: str
    layers: list[str]  # forward order
    means: dict[str, np.ndarray]  # layer -> float16 [E, C], rows of /dataset/explained
    images: list[str]  # the explained images' paths, relative to the source
    source: str  # the source folder's name
    search: list[str]  # every image of the search set, relative to the source


def read_side(path: str | Path) -> Side:
    """Reads a store's model, activation summaries and explained images.

    Raises:
        AtlasError: not a consolidated store, or one without activation summaries.
    """
    path = Path(path)
    with open_store(path) as f:
        attrs = read_attrs(f)
        if not attrs.get("name") or LAYERS not in f:
            raise AtlasError(f"{path} is not a consolidated Atlas store (no model name or layers)")
        ordered = sorted(f[LAYERS].items(), key=lambda kv: int(kv[1].attrs.get("order", 0)))
        layers = [name for name, g in ordered if MEANS in g]
        if not layers or DATASET not in f or "explained" not in f[DATASET]:
            raise AtlasError(f"{path} holds no activation summaries of its explained images (a store built "
                             f"before they existed): rerun `atlas dataset` on it (or `make atlas`), then compare")
        d = f[DATASET]
        rows = d["explained"][...]
        paths = d["paths"].asstr()[...]
        source = str(d["images"].attrs.get("source", "")) if "images" in d else ""
        return Side(path=path, name=str(attrs["name"]), slug=slug(str(attrs["name"])),
                    spec=str(attrs.get("spec", "")), weights_id=str(attrs.get("weights_id", "")), layers=layers,
                    means={name: f[LAYERS][name][MEANS][...] for name in layers},
                    images=[str(paths[i]) for i in rows], source=source, search=[str(p) for p in paths])


MIN_SHARED = 8  # explained images two stores must share to be compared


def shared_images(a: Side, b: Side) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the explained images both stores hold, in A's order: (rows of A, rows of B).

    Two stores are built on the same images when their search sets are the same images of the same
    source folder. Each chooses its explained set by its own units' top examples, so on a source
    larger than `--explain` two models explain different images; they are compared on those both
    explain.

    Raises:
        AtlasError: one line naming the first difference, or too few shared images.
    """
    if a.source != b.source or a.search != b.search:
        if a.source != b.source:
            why = f"source folders {a.source!r} and {b.source!r}"
        elif len(a.search) != len(b.search):
            why = f"{len(a.search)} and {len(b.search)} images searched"
        else:
            i = next(i for i, (x, y) in enumerate(zip(a.search, b.search)) if x != y)
            why = f"image {i} is {a.search[i]!r} in one and {b.search[i]!r} in the other"
        raise AtlasError(f"{a.path.name} and {b.path.name} were built on different images ({why}); build both "
                         f"with the same --data to compare them")
    where = {name: row for row, name in enumerate(b.images)}
    rows = [(i, where[name]) for i, name in enumerate(a.images) if name in where]
    if len(rows) < MIN_SHARED:
        raise AtlasError(f"{a.path.name} and {b.path.name} explain only {len(rows)} of the same images (at least "
                         f"{MIN_SHARED} needed); build both with a larger --explain")
    ia, ib = (np.array(r, np.int64) for r in zip(*rows))
    return ia, ib


def restrict(side: Side, rows: np.ndarray) -> Side:
    """The side with its activation summaries and explained images cut to `rows`."""
    if len(rows) == len(side.images) and np.array_equal(rows, np.arange(len(rows))):
        return side
    return Side(**{**side.__dict__, "means": {k: v[rows] for k, v in side.means.items()},
                   "images": [side.images[i] for i in rows]})


def featurevis(path: Path, layer: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A layer's channel feature visualizations uint8 [C, S, S, 3] and which are done [C]; None if none."""
    with h5py.File(path, "r") as f:
        g = f[LAYERS][layer].get(FEATUREVIS)
        if g is None or "channel" not in g:
            return None
        images = g["channel"][...]
        done_name = view_dataset("channel", "finite")
        done = g[done_name][...].astype(bool) if done_name in g else np.ones(len(images), bool)
        return images, done


def weights_tag(weights_id: str) -> str:
    """A short name for a store's weights: `random`, a weights file's stem, or a torchvision weights name."""
    if weights_id.startswith(RANDOM):
        return "random"
    if " (sha256 " in weights_id:
        return Path(weights_id.split(" (sha256 ")[0]).stem
    words = weights_id.split()
    return words[-1].rsplit(".", 1)[-1] if words else "weights"  # "torchvision X_Weights.IMAGENET1K_V2"


def pair_slug(a: Side, b: Side) -> str:
    """The folder of B's comparison under A's: B's model slug, tagged by its weights when A has the same name."""
    if b.name != a.name:
        return b.slug
    tag = weights_tag(b.weights_id)
    if tag == weights_tag(a.weights_id):
        tag = "self" if a.path.resolve() == b.path.resolve() else b.path.stem
    return f"{b.slug}.{slug(tag)}"
