"""Synthetic dataset examples: photo-like images, ranked example lists, boxes and stored crop strips."""

from __future__ import annotations

import io

import h5py
import numpy as np
from PIL import Image

from atlas.store.files import write_bytes

_CHUNK = 256  # images generated at a time, to bound memory


def texture(n: int, size: int, rng: np.random.Generator, waves: int, cycles: float, noise: float) -> np.ndarray:
    """[n, size, size, 3] uint8: `waves` coloured plane waves of up to `cycles` periods per image, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    total = np.zeros((n, size, size, 3), np.float32)
    for _ in range(waves):
        freq, angle, shift = (rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)
                              for lo, hi in ((1, cycles), (0, np.pi), (0, 2 * np.pi)))
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq * 2 * np.pi + shift)
        total += wave[..., None] * rng.uniform(-1, 1, (n, 1, 1, 3)).astype(np.float32)
    total = total * (1.2 / np.sqrt(waves)) + rng.normal(0, noise, total.shape).astype(np.float32)
    return (255 / (1 + np.exp(-2 * total))).astype(np.uint8)


def photo_like(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Photo-like images: a colour gradient with a bright disc, under a textured surface.

    At 224 px they take about 16 KB as JPEG (quality 88), as the sample photos do.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        surface = texture(m, size, rng, waves=6, cycles=min(32, size / 4), noise=0.1).astype(np.float32)
        for i in range(m):
            a, b = rng.uniform(0, 1, (2, 3)).astype(np.float32)
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
            base = xx[..., None] * a + yy[..., None] * b
            scene = 255 * np.clip(np.where(disc, 1 - base * 0.5, base * 0.8), 0, 1)
            out[start + i] = np.clip(0.45 * scene + 0.55 * surface[i], 0, 255).astype(np.uint8)
    return out


def _ranked(peaks: np.ndarray, k: int, top: bool) -> tuple[np.ndarray, np.ndarray]:
    """[C, k] rows of the k highest (or lowest) images and their values, padded with -1 and NaN."""
    channels, n = peaks.shape
    take = min(k, n)
    key = -peaks if top else peaks
    if n > 4 * k:  # the k best of many: partition first, then sort those few (ties by index)
        best = np.sort(np.argpartition(key, take - 1, axis=1)[:, :take], axis=1)
        order = np.take_along_axis(best, np.argsort(np.take_along_axis(key, best, 1), axis=1, kind="stable"), 1)
    else:
        order = np.argsort(key, axis=1, kind="stable")[:, :take]
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


CROP_SIDE = 96  # side of a stored example crop, as the full preset stores them
_CROPS = 256  # distinct photos the synthetic crops are cut from


def crop_pool(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Photo-like images to cut example crops from (`_images`)."""
    return photo_like(_CROPS, image_size, rng)


def _crop_strips(index: np.ndarray, boxes: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One JPEG strip of k crops per channel, as the dataset stage stores them: each box of a photo
    of the pool resized to CROP_SIDE, grey where there is no example."""
    channels, k = index.shape
    out = np.empty(channels, object)
    picks = rng.integers(0, len(pool), index.shape)
    for c in range(channels):
        strip = np.full((CROP_SIDE, k * CROP_SIDE, 3), 235, np.uint8)
        for j in np.flatnonzero(index[c] >= 0):
            x0, y0, x1, y1 = boxes[c, j]
            region = Image.fromarray(pool[picks[c, j], y0:y1, x0:x1]).resize((CROP_SIDE, CROP_SIDE))
            strip[:, j * CROP_SIDE:(j + 1) * CROP_SIDE] = np.asarray(region)
        buffer = io.BytesIO()
        Image.fromarray(strip).save(buffer, "JPEG", quality=92, subsampling=0)
        out[c] = np.frombuffer(buffer.getvalue(), np.uint8)
    return out


def write_examples(g: h5py.Group, peaks: np.ndarray, k: int, image_size: int, spatial: int,
                    pool: np.ndarray, rng: np.random.Generator) -> None:
    for group, top in (("topk", True), ("bottomk", False)):
        sub = g.create_group(group)
        index, value = _ranked(peaks, k, top)
        boxes = _boxes(index, image_size, spatial, rng)
        sub.create_dataset("index", data=index)
        sub.create_dataset("value", data=value)
        sub.create_dataset("box", data=boxes)
        sub.attrs.update({"k": k, "score": "spatial max", "images": peaks.shape[1]})
        crops = sub.create_dataset("crops", (len(index),), h5py.vlen_dtype(np.uint8))
        write_bytes(crops, _crop_strips(index, boxes, pool, rng))
        crops.attrs.update({"side": CROP_SIDE, "k": k, "quality": 92})
