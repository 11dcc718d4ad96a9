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
_CHUNK = 256  # channels generated at a time, to bound memory for big layers


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
    classes: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
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
        classes: class names; default 1000 names "class 0" ... "class 999".
        paths: source paths of the images; default "images/img_00000.jpg" ...

    Returns:
        `path`.
    """
    rng = np.random.default_rng(seed)
    classes = list(classes) if classes is not None else [f"class {i}" for i in range(1000)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        _write_root(f, name, image_size, fv_size, k, classes)
        for order, (layer, channels, spatial) in enumerate(layers):
            g = _write_layer(f, layer, channels, spatial, order)
            if layer not in no_featurevis:
                _write_featurevis(g, channels, fv_size, rng)
            if n_images:
                _write_examples(g, channels, n_images, k, image_size, spatial, rng)
                _write_stats(g, channels, rng)
        if n_images:
            _write_dataset(f, n_images, image_size, len(classes), paths, rng)
            for method in methods:
                _write_attribution(f, method, n_images, image_size, len(classes), rng)
    return path


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


def _write_featurevis(g: h5py.Group, channels: int, size: int, rng: np.random.Generator) -> None:
    fv = g.create_group("featurevis")
    image = fv.create_dataset("channel", data=_patterns(channels, size, rng))
    image.attrs.update({"objective": "channel mean", "size": size, "steps": 48, "lr": 0.08,
                        "parameterization": "fft, decorrelated colour",
                        "transforms": json.dumps(["jitter 8", "scale 0.9-1.1", "rotate ±10°"]),
                        "optimizer": "adam"})
    final = rng.gamma(2.0, 2.0, channels).astype(np.float32)
    steps = np.linspace(0, 1, LOSS_POINTS, dtype=np.float32)
    noise = rng.normal(0, 0.03, (channels, LOSS_POINTS)).astype(np.float32)
    loss = final[:, None] * (1 - np.exp(-5 * steps)[None, :] + noise)
    loss[:, -1] = final
    fv.create_dataset("channel_objective", data=final)
    fv.create_dataset("channel_loss", data=loss.astype(np.float32))
    fv.create_dataset("channel_seed", data=np.arange(channels, dtype=np.int64) * 7919 + 1)
    fv.create_dataset("channel_done", data=np.ones(channels, bool))


def _ranked(channels: int, n_images: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[C, k] distinct image rows per channel, padded with -1 when there are fewer than k."""
    take = min(k, n_images)
    order = np.argsort(rng.random((channels, n_images), dtype=np.float32), axis=1)[:, :take]
    index = np.full((channels, k), -1, np.int64)
    index[:, :take] = order
    return index


def _boxes(index: np.ndarray, image_size: int, spatial: int, rng: np.random.Generator) -> np.ndarray:
    """Square crop boxes inside the image, bigger for layers with coarser outputs."""
    side = int(np.clip(image_size * 2 / max(spatial, 1), 16, image_size))
    x0 = rng.integers(0, image_size - side + 1, index.shape)
    y0 = rng.integers(0, image_size - side + 1, index.shape)
    box = np.stack([x0, y0, x0 + side, y0 + side], axis=-1).astype(np.int32)
    box[index < 0] = 0
    return box


def _write_examples(g: h5py.Group, channels: int, n_images: int, k: int, image_size: int,
                    spatial: int, rng: np.random.Generator) -> None:
    high = np.sort(rng.gamma(2.0, 2.0, (channels, k)).astype(np.float32), axis=1)[:, ::-1]
    low = np.sort(rng.normal(-0.5, 0.3, (channels, k)).astype(np.float32), axis=1)
    for group, values in (("topk", high), ("bottomk", low)):
        sub = g.create_group(group)
        index = _ranked(channels, n_images, k, rng)
        values = np.where(index >= 0, values, np.float32(np.nan))
        sub.create_dataset("index", data=index)
        sub.create_dataset("value", data=values.astype(np.float32))
        sub.create_dataset("box", data=_boxes(index, image_size, spatial, rng))
        sub.attrs.update({"k": k, "score": "spatial max", "images": n_images})


def _write_stats(g: h5py.Group, channels: int, rng: np.random.Generator) -> None:
    dead = rng.random(channels) < 0.05
    mean = np.where(dead, 0, rng.gamma(1.0, 0.5, channels))
    spread = np.where(dead, 0, rng.gamma(2.0, 0.5, channels))
    stats = {"mean": mean, "std": spread, "max": np.where(dead, 0, mean + 4 * spread),
             "min": np.where(dead, 0, -spread), "zero_fraction": np.where(dead, 1, rng.uniform(0.2, 0.9, channels))}
    sub = g.create_group("stats")
    for key, value in stats.items():
        sub.create_dataset(key, data=value.astype(np.float32))
    sub.create_dataset("dead", data=dead)


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
    labels = rng.integers(0, n_classes, n)
    labels[::4] = -1  # some images have no known label
    d.create_dataset("labels", data=labels.astype(np.int64))
    top5 = np.argsort(rng.random((n, n_classes), dtype=np.float32), axis=1)[:, :5]
    d.create_dataset("top5", data=top5.astype(np.int64))
    prob = np.sort(rng.dirichlet(np.ones(8), n)[:, :5], axis=1)[:, ::-1]
    d.create_dataset("top5_prob", data=prob.astype(np.float32))
    d.create_dataset("skipped_paths", data=_strings(["images/broken.jpg"]), dtype=h5py.string_dtype())
    d.create_dataset("skipped_reasons", data=_strings(["cannot identify image file"]),
                     dtype=h5py.string_dtype())


def _write_attribution(f: h5py.File, method: str, n: int, size: int, n_classes: int,
                       rng: np.random.Generator) -> None:
    g = f.require_group("attribution").create_group(method)
    maps = g.create_dataset("maps", shape=(n, size, size), dtype=np.float16)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for start in range(0, n, 64):
        m = min(64, n - start)
        centre = rng.uniform(0.3, 0.7, (m, 2, 1, 1)).astype(np.float32)
        blob = np.exp(-((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) * 20)
        noise = rng.normal(0, 0.15, (m, size, size)).astype(np.float32)
        maps[start:start + m] = (blob - 0.3 * blob.mean() + noise).astype(np.float16)
    maps.attrs.update({"method": method, "target_rule": "top-1 prediction", "reduction": "sum over colour"})
    g.create_dataset("target", data=rng.integers(0, n_classes, n).astype(np.int64))
    g.create_dataset("score", data=rng.gamma(3.0, 2.0, n).astype(np.float32))
