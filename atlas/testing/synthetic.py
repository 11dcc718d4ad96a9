"""Synthetic stores: the docs/store.md layout filled with made-up pixels and values.

They let the site renderer be tested and benchmarked without a model: a store
shaped like a full ResNet-50 atlas (53 layers, tens of thousands of channels)
is written in seconds, because every array is generated in bulk with numpy.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Sequence
from pathlib import Path

import h5py
import numpy as np

import atlas
from atlas.store.schema import STORE_FORMAT, VIEWS, view_dataset
from atlas.testing.synthetic_attribution import write_attribution, write_checks, write_unit_attribution
from atlas.testing.synthetic_examples import crop_pool, photo_like, texture, write_examples

LOSS_POINTS = 16  # samples of each synthetic loss curve
DIVERSITY = 4  # images in a diversity set
HIST_EDGES = np.sinh(np.linspace(-8, 8, 49))  # the store's fixed histogram bins
DEAD_FRACTION = 0.05  # units that never fire
_CHUNK = 256  # channels generated at a time, to bound memory for big layers
def write_synthetic_store(
    path: Path,
    layers: list[tuple[str, int, int]],
    n_images: int,
    k: int = 10,
    explained: int | None = None,
    fv_size: int = 64,
    image_size: int = 224,
    methods: Sequence[str] = ("gradient",),
    seed: int = 0,
    *,
    name: str = "synthetic",
    no_featurevis: Collection[str] = (),
    views: Sequence[str] = ("channel",),
    classes: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    unit_attribution: bool = True,
    unit_k: int = 3,
    unit_size: int = 64,
    checks: Sequence[str] | None = None,
    check_images: int = 4,
    check_groups: int = 6,
    check_points: int = 21,
    check_strips: bool = True,
    strip_size: int = 56,
    insensitive: Collection[str] = ("guided_backprop",),
    incomplete: Collection[str] = (),
    tolerance: float = 0.01,
) -> Path:
    """Writes a consolidated store with synthetic contents.

    Args:
        path: the .h5 file to write (replaced if it exists).
        layers: (name, channels, spatial side) of each layer, in forward order.
        n_images: dataset images (the search set); 0 leaves out the dataset stage
            (no /dataset, no topk, bottomk or stats).
        k: dataset examples kept per channel in topk and bottomk.
        explained: images of the search set that get pixels, attributions and
            checks, spread evenly over it; None: every image.
        fv_size: side of each feature visualization.
        image_size: side of each dataset image (the model's input size).
        methods: attribution methods; empty leaves out /attribution.
        seed: seed of every random value, so equal arguments give equal files.
        name: the model name (root attribute `name`).
        no_featurevis: names of layers written without a featurevis group.
        views: feature-visualization views to write, from VIEWS; the default is
            what the quick preset renders, `VIEWS` writes every view.
        classes: class names; default 1000 names "class 0" ... "class 999".
        paths: source paths of the images; default "images/img_00000.jpg" ...
        unit_attribution: write /layers/<layer>/unit_attribution for every
            layer with dataset examples (when `methods` is not empty).
        unit_k: unit attributions per channel (Ku, the first of topk).
        unit_size: side R of each unit-attribution map.
        checks: methods given sanity checks in /checks; None: every method of
            `methods`; empty: no /checks group.
        check_images: dataset images the checks run on (at most n_images).
        check_groups: parameter groups G of the randomization test.
        check_points: points P of each deletion and insertion curve.
        check_strips: write the randomization strips (`maps` of each mode);
            False gives the layout of stores written before strips were kept.
        strip_size: side R of each strip map (at most the image size).
        insensitive: methods whose maps barely change when the weights are
            randomized, or the class is changed: their checks fail.
        incomplete: path methods whose completeness error stays above
            `tolerance` on every other image.
        tolerance: the completeness target of path methods.

    Returns:
        `path`.
    """
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown view {unknown[0]!r}; choose from {', '.join(VIEWS)}")
    rng = np.random.default_rng(seed)
    classes = list(classes) if classes is not None else [f"class {i}" for i in range(1000)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        _write_root(f, name, image_size, fv_size, k, classes)
        crops = crop_pool(image_size, rng) if n_images else None
        for order, (layer, channels, spatial) in enumerate(layers):
            g = _write_layer(f, layer, channels, spatial, order)
            best = None
            if n_images:
                peaks = _peaks(channels, n_images, rng)
                write_examples(g, peaks, k, image_size, spatial, crops, rng)
                _write_stats(g, peaks, rng)
                best = g["topk/value"][:, 0]
            if layer not in no_featurevis and views:
                _write_featurevis(g, channels, fv_size, views, best, rng)
        if n_images:
            shown = n_images if explained is None else min(explained, n_images)
            _write_dataset(f, n_images, shown, image_size, len(classes), paths, rng)
            for method in methods:
                write_attribution(f, method, shown, image_size, method in incomplete, tolerance, rng)
            if methods and unit_attribution:
                for layer, _, _ in layers:
                    write_unit_attribution(f["layers"][layer], min(unit_k, k), unit_size, rng)
            checked = list(methods if checks is None else checks)
            if checked:
                settings = {"images": check_images, "groups": check_groups, "points": check_points,
                            "strip": min(strip_size, image_size) if check_strips else 0}
                write_checks(f, checked, settings, set(insensitive), [n for n, _, _ in layers], rng)
    return path


def add_featurevis(path: Path, layer: str, views: Sequence[str] = ("channel",), seed: int = 1) -> None:
    """Adds synthetic feature visualizations to a layer of a store that lacks them, as a later stage would.

    Args:
        path: a store written by `write_synthetic_store`.
        layer: the layer's name.
        views: views to write.
        seed: seed of the new values.
    """
    with h5py.File(path, "r+") as f:
        g = f["layers"][layer]
        size = int(json.loads(f.attrs["config"])["fv_size"])
        best = g["topk/value"][:, 0] if "topk/value" in g else None
        _write_featurevis(g, int(g.attrs["channels"]), size, views, best, np.random.default_rng(seed))


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=object)


def _write_root(f: h5py.File, name: str, size: int, fv_size: int, k: int, classes: list[str]) -> None:
    config = {"model": f"synthetic:{name}", "fv_size": fv_size, "topk": k, "preset": "synthetic"}
    versions = {"torch": "synthetic", "torchvision": "synthetic", "timm": None, "python": "3", "device": "none"}
    preprocess = {"size": size, "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3}
    f.attrs.update({
        "spec": f"synthetic:{name}", "name": name, "weights_id": "synthetic-weights",
        "input_size": size, "atlas_version": atlas.__version__, "store_format": STORE_FORMAT,
        "created": "2000-01-01T00:00:00+00:00", "config": json.dumps(config),
        "versions": json.dumps(versions), "preprocess": json.dumps(preprocess),
    })
    f.create_dataset("classes", data=_strings(classes), dtype=h5py.string_dtype())


def _write_layer(f: h5py.File, name: str, channels: int, spatial: int, order: int) -> h5py.Group:
    g = f.require_group("layers").create_group(name)
    module, _, call = name.partition("@")
    g.attrs.update({"kind": "Conv2d" if spatial > 1 else "Linear", "module": module,
                    "call": int(call or 0), "channels": channels, "height": spatial,
                    "width": spatial, "order": order})
    return g


_POOL = 256  # distinct textures per picture side; every picture is one of them, shifted and flipped


@functools.lru_cache(maxsize=4)
def _texture_pool(size: int) -> np.ndarray:
    """Textures that compress like real feature visualizations.

    Eight waves of up to 32 periods per image and a little noise: at 128 px they
    take 3.6 KB as AVIF (quality 50) and 8.9 KB as WebP (quality 85), where
    real 128 px renders of EfficientNet-Lite0 take 3.6 KB and 8.6 KB.
    """
    return texture(_POOL, size, np.random.default_rng(size), waves=8, cycles=min(32, size / 4), noise=0.1)


def _patterns(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` feature-visualization-like pictures: textures of the pool, each shifted and flipped its own way."""
    pool = _texture_pool(size)
    out = np.empty((count, size, size, 3), np.uint8)
    picks = rng.integers(0, len(pool), count)
    shifts = rng.integers(0, size, (count, 2))
    flips = rng.random(count) < 0.5
    for i in range(count):
        picture = np.roll(pool[picks[i]], tuple(shifts[i]), axis=(0, 1))
        out[i] = picture[:, ::-1] if flips[i] else picture
    return out


def _write_featurevis(g: h5py.Group, channels: int, size: int, views: Sequence[str],
                      best: np.ndarray | None, rng: np.random.Generator) -> None:
    """Every view in `views`, and `quality` where the dataset stage ran (`best` given)."""
    fv = g.create_group("featurevis")
    for view in views:
        k = DIVERSITY if view == "diversity" else 1
        per = (channels, k) if k > 1 else (channels,)
        images = _patterns(channels * k, size, rng).reshape(*per, size, size, 3)
        ds = fv.create_dataset(view, data=images)
        ds.attrs.update({"view": view, "objective": _OBJECTIVES[view], "size": size, "steps": 48,
                         "lr": 0.08, "optimizer": "adam", "parameterization": "fft, decorrelated colour",
                         "transforms": json.dumps(["jitter 8", "scale 0.9-1.1", "rotate ±10°"]),
                         "redirected_relu_steps": 8})
        final = rng.gamma(2.0, 2.0, per).astype(np.float32)
        steps = np.linspace(0, 1, LOSS_POINTS, dtype=np.float32)
        noise = rng.normal(0, 0.03, (*per, LOSS_POINTS)).astype(np.float32)
        loss = final[..., None] * (1 - np.exp(-5 * steps) + noise)
        loss[..., -1] = final
        fv.create_dataset(view_dataset(view, "objective"), data=final)
        fv.create_dataset(view_dataset(view, "loss"), data=loss.astype(np.float32))
        seeds = np.arange(channels * k, dtype=np.int64).reshape(per) * 7919 + 1 + VIEWS.index(view)
        fv.create_dataset(view_dataset(view, "seed"), data=seeds)
        fv.create_dataset(view_dataset(view, "peak"), data=_view_peak(view, per, best, rng))
        fv.create_dataset(view_dataset(view, "finite"), data=np.ones(channels, bool))
    if best is not None and "channel" in views:
        with np.errstate(divide="ignore", invalid="ignore"):
            quality = np.where(best > 0, fv["channel_peak"][()] / best, np.nan).astype(np.float32)
        fv.create_dataset("quality", data=quality)


_OBJECTIVES = {"channel": "channel mean", "negative": "minus channel mean", "neuron": "centre position",
               "diversity": "channel mean + 10 × style difference"}


def _view_peak(view: str, shape: tuple[int, ...], best: np.ndarray | None,
               rng: np.random.Generator) -> np.ndarray:
    """Peaks around the best dataset image's: about a third of channel views fall short of it."""
    base = np.nan_to_num(best, nan=1.0) if best is not None else rng.gamma(2.0, 2.0, shape[0])
    base = np.maximum(base, 0.1).reshape(-1, *[1] * (len(shape) - 1))
    scale = -0.5 if view == "negative" else 1.0
    return (scale * base * rng.lognormal(0.25, 0.6, shape)).astype(np.float32)


def _peaks(channels: int, n_images: int, rng: np.random.Generator) -> np.ndarray:
    """[C, N] spatial max of each channel on each image; dead channels stay at or below 0."""
    peaks = np.empty((channels, n_images), np.float32)
    dead = rng.random(channels) < DEAD_FRACTION
    for start in range(0, channels, _CHUNK):
        n = min(_CHUNK, channels - start)
        scale = rng.gamma(2.0, 1.0, (n, 1))
        shift = rng.normal(0, 0.5, (n, 1))
        peaks[start:start + n] = rng.gamma(2.0, 1.0, (n, n_images)) * scale + shift
    peaks[dead] = -np.abs(peaks[dead])
    return peaks


def histogram(peaks: np.ndarray) -> np.ndarray:
    """int64 [C, 48] counts of per-image values [C, N] on HIST_EDGES (as the dataset stage bins them)."""
    bins = len(HIST_EDGES) - 1
    scaled = (np.arcsinh(peaks.astype(np.float64)) + 8) / 16 * bins
    index = np.clip(np.floor(scaled), 0, bins - 1).astype(np.int64)
    flat = (np.arange(len(peaks))[:, None] * bins + index).ravel()
    return np.bincount(flat, minlength=len(peaks) * bins).reshape(len(peaks), bins)


def _write_stats(g: h5py.Group, peaks: np.ndarray, rng: np.random.Generator) -> None:
    channels = len(peaks)
    top = peaks.max(axis=1)
    dead = top <= 0
    mean = np.where(dead, 0, rng.gamma(1.0, 0.5, channels))
    spread = np.where(dead, 0, rng.gamma(2.0, 0.5, channels))
    stats = {"mean": mean, "std": spread, "max": top,
             "zero_fraction": np.where(dead, 1, rng.uniform(0.2, 0.9, channels))}
    sub = g.create_group("stats")
    for key, value in stats.items():
        sub.create_dataset(key, data=value.astype(np.float32))
    sub.create_dataset("dead", data=dead)
    hist = sub.create_dataset("hist", data=histogram(peaks))
    hist.attrs["of"] = "spatial max per image"
    sub.create_dataset("hist_edges", data=HIST_EDGES)


def _write_dataset(f: h5py.File, n: int, explained: int, size: int, n_classes: int, paths: Sequence[str] | None,
                   rng: np.random.Generator) -> None:
    d = f.create_group("dataset")
    rows = np.unique(np.linspace(0, n - 1, explained).round().astype(np.int64)) if explained else np.zeros(0, int)
    d.create_dataset("explained", data=rows)
    d["explained"].attrs.update({"rule": "evenly spread (synthetic)", "requested": explained, "search": n})
    images = d.create_dataset("images", shape=(len(rows), size, size, 3), dtype=np.uint8)
    for start in range(0, len(rows), 64):
        images[start:start + 64] = photo_like(min(64, len(rows) - start), size, rng)
    images.attrs.update({"source": "synthetic", "rows": "/dataset/explained"})
    d.attrs.update({"search": n, "skipped": 1, "total": n + 1})
    paths = list(paths) if paths is not None else [f"images/img_{i:05d}.jpg" for i in range(n)]
    d.create_dataset("paths", data=_strings(paths), dtype=h5py.string_dtype())
    search = np.arange(n, dtype=np.int64)
    d.create_dataset("source_index", data=search + (search >= n // 2))  # the skipped file leaves a gap
    labels = rng.integers(0, n_classes, n)
    top5 = np.argsort(rng.random((n, n_classes), dtype=np.float32), axis=1)[:, :5]
    labels[2::4] = top5[2::4, 0]  # some images are classified correctly
    labels[::4] = -1  # some images have no known label
    d.create_dataset("labels", data=labels.astype(np.int64))
    d.create_dataset("top5", data=top5.astype(np.int64))
    prob = np.sort(rng.dirichlet(np.ones(8), n)[:, :5], axis=1)[:, ::-1]
    d.create_dataset("top5_prob", data=prob.astype(np.float32))
    d.create_dataset("skipped_paths", data=_strings(["images/broken.jpg"]), dtype=h5py.string_dtype())
    d.create_dataset("skipped_reasons", data=_strings(["cannot identify image file"]),
                     dtype=h5py.string_dtype())
