"""Synthetic stores: the docs/store.md layout filled with made-up pixels and values.

They let the site renderer be tested and benchmarked without a model: a store
shaped like a full ResNet-50 atlas (53 layers, tens of thousands of channels)
is written in seconds, because every array is generated in bulk with numpy.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path

import h5py
import numpy as np

import atlas

LOSS_POINTS = 16  # samples of each synthetic loss curve
VIEWS = ("channel", "negative", "neuron", "diversity")  # every view a store can hold
DIVERSITY = 4  # images in a diversity set
HIST_EDGES = np.sinh(np.linspace(-8, 8, 49))  # the store's fixed histogram bins
DEAD_FRACTION = 0.05  # units that never fire
_CHUNK = 256  # channels generated at a time, to bound memory for big layers
UNSIGNED = ("smoothgrad_sq", "vargrad", "grad_cam", "occlusion", "extremal_perturbation")  # maps >= 0
CHECKS = ("randomization", "random_logit", "deletion", "insertion", "mass_centre")  # keys of `caveats`


def is_path_method(method: str) -> bool:
    """Integrated Gradients with any baseline, and Expected Gradients: the methods with a completeness error."""
    return method in ("integrated_gradients", "expected_gradients") or method.startswith("ig_")


def write_synthetic_store(
    path: Path,
    layers: list[tuple[str, int, int]],
    n_images: int,
    k: int = 10,
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
        n_images: dataset images; 0 leaves out the dataset stage (no /dataset,
            no topk, bottomk or stats).
        k: dataset examples kept per channel in topk and bottomk.
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
        for order, (layer, channels, spatial) in enumerate(layers):
            g = _write_layer(f, layer, channels, spatial, order)
            best = None
            if n_images:
                peaks = _peaks(channels, n_images, rng)
                _write_examples(g, peaks, k, image_size, spatial, rng)
                _write_stats(g, peaks, rng)
                best = g["topk/value"][:, 0]
            if layer not in no_featurevis and views:
                _write_featurevis(g, channels, fv_size, views, best, rng)
        if n_images:
            _write_dataset(f, n_images, image_size, len(classes), paths, rng)
            for method in methods:
                _write_attribution(f, method, n_images, image_size, method in incomplete, tolerance, rng)
            if methods and unit_attribution:
                for layer, _, _ in layers:
                    _write_unit_attribution(f["layers"][layer], min(unit_k, k), unit_size, rng)
            checked = list(methods if checks is None else checks)
            if checked:
                settings = {"images": check_images, "groups": check_groups, "points": check_points,
                            "strip": min(strip_size, image_size) if check_strips else 0}
                _write_checks(f, checked, settings, set(insensitive), [n for n, _, _ in layers], rng)
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
        "input_size": size, "atlas_version": atlas.__version__, "store_format": atlas.STORE_FORMAT,
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


def _patterns(channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Coloured plane waves, a different frequency, angle and palette per channel."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((channels, size, size, 3), np.uint8)
    for start in range(0, channels, _CHUNK):
        n = min(_CHUNK, channels - start)
        freq = rng.uniform(2, 12, (n, 1, 1)).astype(np.float32)
        angle = rng.uniform(0, np.pi, (n, 1, 1)).astype(np.float32)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * freq * 2 * np.pi
        wave = np.sin(phase) * np.cos(phase * 0.37)
        colour = rng.uniform(0.1, 1.0, (n, 1, 1, 3)).astype(np.float32)
        out[start:start + n] = (127.5 + 127 * wave[..., None] * colour).astype(np.uint8)
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
        fv.create_dataset(f"{view}_objective", data=final)
        fv.create_dataset(f"{view}_loss", data=loss.astype(np.float32))
        seeds = np.arange(channels * k, dtype=np.int64).reshape(per) * 7919 + 1 + VIEWS.index(view)
        fv.create_dataset(f"{view}_seed", data=seeds)
        fv.create_dataset(f"{view}_peak", data=_view_peak(view, per, best, rng))
        fv.create_dataset(f"{view}_done", data=np.ones(channels, bool))
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


def _ranked(peaks: np.ndarray, k: int, top: bool) -> tuple[np.ndarray, np.ndarray]:
    """[C, k] rows of the k highest (or lowest) images and their values, padded with -1 and NaN."""
    channels, n = peaks.shape
    take = min(k, n)
    order = np.argsort(-peaks if top else peaks, axis=1, kind="stable")[:, :take]
    index = np.full((channels, k), -1, np.int64)
    value = np.full((channels, k), np.nan, np.float32)
    index[:, :take] = order
    value[:, :take] = np.take_along_axis(peaks, order, axis=1)
    return index, value


def _boxes(index: np.ndarray, image_size: int, spatial: int, rng: np.random.Generator) -> np.ndarray:
    """Square crop boxes inside the image, bigger for layers with coarser outputs."""
    side = int(np.clip(image_size * 2 / max(spatial, 1), 16, image_size))
    x0 = rng.integers(0, image_size - side + 1, index.shape)
    y0 = rng.integers(0, image_size - side + 1, index.shape)
    box = np.stack([x0, y0, x0 + side, y0 + side], axis=-1).astype(np.int32)
    box[index < 0] = 0
    return box


def _write_examples(g: h5py.Group, peaks: np.ndarray, k: int, image_size: int, spatial: int,
                    rng: np.random.Generator) -> None:
    for group, top in (("topk", True), ("bottomk", False)):
        sub = g.create_group(group)
        index, value = _ranked(peaks, k, top)
        sub.create_dataset("index", data=index)
        sub.create_dataset("value", data=value)
        sub.create_dataset("box", data=_boxes(index, image_size, spatial, rng))
        sub.attrs.update({"k": k, "score": "spatial max", "images": peaks.shape[1]})


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


def _images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour gradients with a bright disc, one per image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        a, b = rng.uniform(0, 1, (2, 3)).astype(np.float32)
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
        base = xx[..., None] * a + yy[..., None] * b
        out[i] = (255 * np.clip(np.where(disc, 1 - base * 0.5, base * 0.8), 0, 1)).astype(np.uint8)
    return out


def _write_dataset(f: h5py.File, n: int, size: int, n_classes: int, paths: Sequence[str] | None,
                   rng: np.random.Generator) -> None:
    d = f.create_group("dataset")
    images = d.create_dataset("images", shape=(n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, 64):
        images[start:start + 64] = _images(min(64, n - start), size, rng)
    images.attrs.update({"source": "synthetic", "count": n, "skipped": 1})
    paths = list(paths) if paths is not None else [f"images/img_{i:05d}.jpg" for i in range(n)]
    d.create_dataset("paths", data=_strings(paths), dtype=h5py.string_dtype())
    rows = np.arange(n, dtype=np.int64)
    d.create_dataset("source_index", data=rows + (rows >= n // 2))  # the skipped file leaves a gap
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


_PARAMS = {  # the parameters each method's `maps` carries, as the attribution stage writes them
    "smoothgrad": {"samples": 50, "noise_fraction_of_range": 0.15, "seed": 0},
    "smoothgrad_sq": {"samples": 50, "noise_fraction_of_range": 0.15, "seed": 0},
    "vargrad": {"samples": 50, "noise_fraction_of_range": 0.15, "seed": 0},
    "grad_cam": {"layer": "layer4"}, "guided_grad_cam": {"layer": "layer4"},
    "integrated_gradients": {"steps": 50, "baseline": "black"},
    "ig_max_distance": {"steps": 50, "baseline": "max distance"},
    "ig_blurred": {"steps": 50, "baseline": "blurred, sigma 20 px"},
    "ig_uniform": {"steps": 50, "baseline": "uniform noise", "draws": 4},
    "ig_gaussian": {"steps": 50, "baseline": "gaussian noise, sigma 0.25", "draws": 4},
    "expected_gradients": {"samples": 50, "baseline": "dataset images"},
    "occlusion": {"window": 16, "stride": 8, "fill": "mean"},
    "extremal_perturbation": {"areas": "[0.05, 0.1, 0.2]", "steps": 800},
}


def _blobs(m: int, size: int, rng: np.random.Generator, noise: float = 0.15) -> np.ndarray:
    """[m, size, size] float32: a Gaussian blob at a random place, a mean offset and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    centre = rng.uniform(0.3, 0.7, (m, 2, 1, 1)).astype(np.float32)
    blob = np.exp(-((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) * 20)
    return blob - 0.3 * blob.mean() + rng.normal(0, noise, (m, size, size)).astype(np.float32)


def _write_attribution(f: h5py.File, method: str, n: int, size: int, incomplete: bool, tolerance: float,
                       rng: np.random.Generator) -> None:
    """Maps for the top-1 class and for the true label, and a path method's completeness and steps."""
    g = f.require_group("attribution").create_group(method)
    target = f["dataset/top5"][:, 0]
    labels = f["dataset/labels"][()]
    maps = g.create_dataset("maps", shape=(n, size, size), dtype=np.float16)
    g.create_dataset("label_maps", shape=(n, size, size), dtype=np.float16)
    scale, label_scale = np.empty(n, np.float32), np.empty(n, np.float32)
    for start in range(0, n, 64):
        m = min(64, n - start)
        factor = rng.lognormal(-6, 1, (m, 1, 1)).astype(np.float32)  # attributions are small numbers
        top, other = _blobs(m, size, rng) * factor, _blobs(m, size, rng) * factor
        if method in UNSIGNED:
            top, other = np.abs(top), np.abs(other)
        label = labels[start:start + m]
        other[label == target[start:start + m]] = top[label == target[start:start + m]]
        other[label < 0] = np.nan
        # as the attribution stage stores them: each map divided by its largest |value|, so float16 keeps it
        for name, values, out in (("maps", top, scale), ("label_maps", other, label_scale)):
            peak = np.abs(values).max(axis=(1, 2))
            out[start:start + m] = peak
            g[name][start:start + m] = (values / peak[:, None, None]).astype(np.float16)
    maps.attrs.update({"method": method, "signed": method not in UNSIGNED,
                       "target_rule": "top-1 prediction", "reduction": "sum over colour",
                       "stored_as": "map / scale: multiply each image's map by `scale` for the attribution",
                       **_PARAMS.get(method, {})})
    g.create_dataset("scale", data=scale)
    g.create_dataset("label_scale", data=label_scale)
    g.create_dataset("target", data=target.astype(np.int64))
    g.create_dataset("score", data=rng.gamma(3.0, 2.0, n).astype(np.float32))
    g.create_dataset("label_target", data=labels.astype(np.int64))
    path = is_path_method(method)
    error = rng.uniform(0.02, 0.8, n) * tolerance if path else np.full(n, np.nan)
    if path and incomplete:
        error[::2] = rng.uniform(1.5, 12, len(error[::2])) * tolerance
    g.create_dataset("completeness", data=error.astype(np.float32))
    steps = np.where(error > tolerance, 400, rng.choice([50, 100, 200], n)) if path else np.zeros(n)
    g.create_dataset("steps", data=steps.astype(np.int32))
    g.attrs.update({"tolerance": tolerance, "completeness_failures": int((error > tolerance).sum())})


def _write_unit_attribution(g: h5py.Group, ku: int, size: int, rng: np.random.Generator) -> None:
    """What made each unit fire on its first `ku` top images; NaN where topk has no image."""
    if "topk/index" not in g or ku < 1:
        return
    index = g["topk/index"][:, :ku]
    channels = len(index)
    sub = g.create_group("unit_attribution")
    maps = sub.create_dataset("maps", shape=(channels, ku, size, size), dtype=np.float16)
    scale = sub.create_dataset("scale", shape=(channels, ku), dtype=np.float32)
    for start in range(0, channels, _CHUNK):
        n = min(_CHUNK, channels - start)
        factor = rng.lognormal(-4, 1, (n, ku, 1, 1)).astype(np.float32)  # attributions are small numbers
        chunk = _blobs(n * ku, size, rng, noise=0.1).reshape(n, ku, size, size) * factor
        chunk[index[start:start + n] < 0] = np.nan
        peak = np.abs(chunk).max(axis=(2, 3))  # NaN where there is no image
        scale[start:start + n] = peak
        # as the attribution stage stores them: each map divided by its largest |value|
        maps[start:start + n] = (chunk / np.where(peak > 0, peak, 1)[..., None, None]).astype(np.float16)
    sub.attrs.update({"method": "gradient_x_input", "target": "channel spatial max", "k": ku, "size": size})


CAVEATS = {
    "randomization": "Maps that stay alike after the weights are randomized do not explain what the model "
                     "learned (Adebayo et al. 2018). A pass is necessary, not sufficient: a map can change "
                     "with the weights and still be unfaithful. Rank correlation of absolute values ignores "
                     "sign flips.",
    "random_logit": "A map for a random other class that looks like the top-1 map does not explain the "
                    "class (Sixt et al. 2020). Classes that share evidence lower this score legitimately.",
    "deletion": "Replacing pixels makes images unlike any the model was trained on: a fast drop can come "
                "from the artefacts, not from the pixels' importance (Hooker et al. 2019). Compare against "
                "the random order, and the two fills against each other.",
    "insertion": "Restoring pixels into a mean or blurred image is just as out of distribution as deletion; "
                 "a blurred start already keeps the coarse shape.",
    "mass_centre": "A coarse test of localization: it rewards maps concentrated in one place, and says "
                   "nothing of maps that are spread out for good reason.",
}


def _groups(layers: list[str], g: int) -> list[list[str]]:
    """G parameter groups from the logits down: the store's layers, padded with made-up names."""
    names = layers[::-1]
    if len(names) >= g:
        return [list(chunk) for chunk in np.array_split(np.array(names, dtype=object), g)]
    return [[n] for n in names] + [[f"stem.{i}"] for i in range(g - len(names))]


def _similarity(level: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """spearman_abs, spearman and ssim scattered around `level` (any shape)."""
    noise = lambda s: rng.normal(0, s, level.shape)  # noqa: E731
    return {"spearman_abs": np.clip(level + noise(0.05), 0, 1).astype(np.float32),
            "spearman": np.clip(level * 0.8 + noise(0.08), -1, 1).astype(np.float32),
            "ssim": np.clip(level * 0.6 + noise(0.05), -1, 1).astype(np.float32)}


def _curves(g: h5py.Group, fractions: np.ndarray, n: int, speed: float, drop: float,
            rng: np.random.Generator) -> None:
    """Deletion and insertion curves (faster for a higher `speed`) and the mass-centre drop."""
    for kind in ("deletion", "insertion"):
        sub = g.create_group(kind)
        for fill, slow in (("mean", 1.0), ("blur", 1.6)):
            rate = speed / slow * rng.lognormal(0, 0.2, (n, 1))
            gone = 1 - np.exp(-rate * fractions)
            curve = 1 - gone if kind == "deletion" else gone / gone[:, -1:]
            curve = np.clip(curve + rng.normal(0, 0.02, curve.shape), 0, 1.2).astype(np.float32)
            sub.create_dataset(fill, data=curve)
            sub.attrs[f"auc_{fill}"] = float(_trapezoid(curve, fractions).mean())
    g.create_group("mass_centre").create_dataset(
        "drop", data=np.clip(drop + rng.normal(0, 0.1, n), 0, 1).astype(np.float32))


def _trapezoid(curves: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Area under each row of `curves` [n, P] sampled at `x` [P]."""
    return ((curves[:, 1:] + curves[:, :-1]) / 2 * np.diff(x)).sum(axis=1)


CHECK_SETTINGS = {  # the settings attributes of /checks, as the attribution stage writes them
    "verdict_step": "cascading, once the top 0.33 of the parameter groups are re-initialized",
    "target": "top-1 prediction", "order": "signed map, descending; all colour channels of a pixel together",
    "mean_replacement": "0 in the model's input space (the normalization mean)",
    "blur_sigma_fraction_of_side": 1 / 20, "mass_centre_box_fraction_of_side": 0.25, "seed": 0,
}


def _strips(groups: int, size: int, insensitive: bool, signed: bool,
            rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """Randomization strips, float16 [G + 1, R, R] per mode: the original map, then one per step.

    An insensitive method keeps its blob whatever is re-initialized; a sensitive
    one turns to noise, step by step when cascading, from the top groups most
    when independent. Each map is scaled to a largest |value| of 1; unsigned
    methods' maps are non-negative. None when `size` is 0 (no strips).
    """
    if size < 1:
        return None
    original = _blobs(1, size, rng, noise=0.05)[0]
    amount = np.linspace(0.1, 1, groups)
    out = {}
    for mode in ("cascading", "independent"):
        keep = 0.9 - 0.1 * amount if insensitive else (1 - amount if mode == "cascading" else amount * 0.8)
        noise = rng.normal(0, 0.5, (groups, size, size)).astype(np.float32)
        steps = keep[:, None, None] * original + (1 - keep[:, None, None]) * noise
        if mode == "independent":
            steps[0] = out["cascading"][1]  # group 0 alone is the first cascading step
        maps = np.concatenate([original[None], steps])
        if not signed:
            maps = np.abs(maps)
        maps /= np.maximum(np.abs(maps).max(axis=(1, 2), keepdims=True), 1e-12)
        out[mode] = maps.astype(np.float16)
    return out


def _write_checks(f: h5py.File, methods: list[str], settings: dict[str, int], insensitive: set[str],
                  layers: list[str], rng: np.random.Generator) -> None:
    """/checks: randomization, random logit, deletion, insertion, mass centre, and the random control."""
    n_images, n_classes = len(f["dataset/images"]), len(f["classes"])
    n = min(settings["images"], n_images)
    rows = np.unique(np.linspace(0, n_images - 1, n).round().astype(np.int64))
    n = len(rows)
    fractions = np.linspace(0, 1, settings["points"]).astype(np.float32)
    threshold = 0.5
    c = f.create_group("checks")
    c.create_dataset("images", data=rows)
    c.create_dataset("fractions", data=fractions)
    c.attrs.update({"caveats": json.dumps(CAVEATS), "threshold": threshold, **CHECK_SETTINGS})
    groups = _groups(layers, settings["groups"])
    steps = np.linspace(0, 1, len(groups))[:, None]
    for method in methods:
        g = c.create_group(method)
        bad = method in insensitive
        r = g.create_group("randomization")
        cascading = 0.9 - 0.1 * steps if bad else 0.55 * np.exp(-4 * steps) + 0.05
        independent = 0.9 - 0.05 * steps if bad else 0.3 + 0.5 * steps
        strips = _strips(len(groups), settings["strip"], bad, method not in UNSIGNED, rng)
        for name, level in (("cascading", cascading), ("independent", independent)):
            sub = r.create_group(name)
            for key, value in _similarity(np.broadcast_to(level, (len(groups), n)), rng).items():
                sub.create_dataset(key, data=value)
            if strips is not None:
                sub.create_dataset("maps", data=strips[name])
        score = float(r["cascading/spearman_abs"][:2].mean())
        labels = [names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}" for names in groups]
        r.attrs.update({"groups": json.dumps(groups), "labels": json.dumps(labels),
                        "verdict": "fail" if score > threshold else "pass", "score": score, "threshold": threshold})
        logit = g.create_group("random_logit")
        for key, value in _similarity(np.full(n, 0.85 if bad else 0.3), rng).items():
            logit.create_dataset(key, data=value)
        top1 = f["dataset/top5"][:, 0][rows]
        logit.create_dataset("target", data=((top1 + rng.integers(1, max(n_classes, 2), n)) % n_classes))
        score = float(logit["spearman_abs"][()].mean())
        logit.attrs.update({"verdict": "fail" if score > threshold else "pass", "score": score,
                            "threshold": threshold})
        _curves(g, fractions, n, 3.0 if bad else 8.0, 0.2 if bad else 0.45, rng)
    _curves(c.create_group("random"), fractions, n, 1.2, 0.12, rng)
