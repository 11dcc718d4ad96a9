"""Synthetic photos: procedural JPEGs that compress like real photos, in ImageNet-style class folders.

No image here is a real photo. Each is a scene made of what makes photos hard to
compress: a colour field with a natural 1/f spectrum (smooth at every scale),
a few objects with sharp edges, each with its own texture and shading, and
sensor noise. At 224 px and JPEG quality 90 they take about 20 KB, as the
embedded sample photos do (6-33 KB, mean 18 KB), so a benchmark over
thousands of them reads, decodes and stores what a real image folder would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

QUALITY = 90  # JPEG quality of the written files (ImageNet's own JPEGs: about 90)
SLOPES = (1.0, 1.6)  # range of a picture's spectral slope: amplitude falls as 1 / f ** slope (photos: about 1-1.5)
NOISE = 2.5  # sensor noise, standard deviation in grey levels


def _field(size: int, rng: np.random.Generator, slope: float) -> np.ndarray:
    """[size, size] noise with amplitude spectrum 1 / f ** slope, scaled to unit standard deviation."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amplitude = 1 / np.maximum(np.hypot(fx, fy), 1 / size) ** slope
    spectrum = amplitude * (rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape))
    field = np.fft.irfft2(spectrum, s=(size, size))
    return (field / field.std()).astype(np.float32)


def _colour_field(size: int, rng: np.random.Generator, slope: float) -> np.ndarray:
    """[size, size, 3] in about 0-1: a 1/f luminance field and two smoother chroma fields, in a random palette."""
    light, chroma_a, chroma_b = _field(size, rng, slope), _field(size, rng, slope + 0.5), _field(size, rng, slope + 0.5)
    base = rng.uniform(0.25, 0.75, 3)
    tint_a, tint_b = rng.normal(0, 0.08, (2, 3))
    contrast = rng.uniform(0.08, 0.18)
    return base + contrast * light[..., None] + chroma_a[..., None] * tint_a + chroma_b[..., None] * tint_b


def _object_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size] bool: a rotated ellipse or rectangle somewhere in the frame."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.15, 0.85, 2)
    rx, ry = rng.uniform(0.06, 0.3, 2)
    angle = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / rx
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ry
    return (u * u + v * v < 1) if rng.random() < 0.6 else (np.abs(u) < 1) & (np.abs(v) < 1)


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size] in about -1..1: an oriented grating (fabric, fur, bricks) or fine 1/f grain."""
    if rng.random() < 0.5:
        return _field(size, rng, rng.uniform(0.6, 1.0))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 12)
    return np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period).astype(np.float32)


def photo(size: int, seed: int) -> np.ndarray:
    """One synthetic photo, [size, size, 3] uint8; the same seed gives the same picture.

    Args:
        size: side in pixels.
        seed: the picture's seed.

    Returns:
        The picture: a 1/f colour field under two to five textured, shaded
        objects, with sensor noise.
    """
    rng = np.random.default_rng(seed)
    scene = _colour_field(size, rng, rng.uniform(*SLOPES))
    shade = _field(size, rng, 2.0)[..., None]  # broad light and shadow across each object
    for _ in range(rng.integers(2, 6)):
        mask = _object_mask(size, rng)[..., None]
        colour = rng.uniform(0, 1, 3)
        surface = colour * (1 + 0.15 * shade) + rng.uniform(0.03, 0.12) * _texture(size, rng)[..., None]
        scene = np.where(mask, surface, scene)
    pixels = scene * 255 + rng.normal(0, NOISE, scene.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _write_one(job: tuple[str, int, int, int]) -> int:
    path, size, seed, quality = job
    Image.fromarray(photo(size, seed)).save(path, "JPEG", quality=quality)
    return os.path.getsize(path)


def write_photos(folder: Path, n: int, classes: Sequence[str], size: int = 256, seed: int = 0,
                 quality: int = QUALITY, workers: int = 1) -> list[Path]:
    """Writes `n` synthetic photos as JPEGs in one folder per class, ImageNet style.

    Image i goes to `folder/<classes[i % len(classes)]>/synthetic_<i>.JPEG`, so
    with WordNet ids as classes (n01440764, ...) a folder source gives every
    image its ImageNet label. The first m of n images are the m images a call
    with n=m writes.

    Args:
        folder: where to write; created if missing.
        n: number of images.
        classes: class-folder names, such as WordNet ids.
        size: side of each square image in pixels.
        seed: seed of the first image; image i uses seed + i.
        quality: JPEG quality.
        workers: processes that draw and encode the images.

    Returns:
        The paths written, in image order.
    """
    if not classes:
        raise ValueError("classes: need at least one class-folder name")
    paths = [Path(folder) / classes[i % len(classes)] / f"synthetic_{i:06d}.JPEG" for i in range(n)]
    for parent in sorted({p.parent for p in paths}):
        parent.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), size, seed + i, quality) for i, p in enumerate(paths)]
    if workers <= 1:
        list(map(_write_one, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=16))
    return paths
