"""How alike two attribution maps are: Spearman rank correlation and SSIM, per image.

The sanity checks (Adebayo et al. 2018) compare a method's map with the map it
gives after the model or the explained class changed. Maps are [n, H, W]
(already summed over colour); every score is one number per image, [n].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor

# SSIM as Wang et al. 2004 define it: an 11-tap Gaussian window of sigma 1.5,
# constants (0.01 L)^2 and (0.03 L)^2 for data range L = 1 (maps are scaled to [0, 1]).
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def _numpy(maps: ArrayLike) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().numpy()
    return np.asarray(maps, dtype=np.float64)


def _rows(maps: ArrayLike) -> np.ndarray:
    maps = _numpy(maps)
    return maps.reshape(maps.shape[0], -1)


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..m of a 1-d array, ties given the average of the ranks they span.

    Args:
        values: [m] numbers.

    Returns:
        float64 [m]; equal values share one rank (as scipy's `rankdata`).
    """
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.r_[True, ordered[1:] != ordered[:-1]]
    run = np.cumsum(starts_run) - 1
    bounds = np.r_[np.flatnonzero(starts_run), values.size]
    mean_rank = 0.5 * (bounds[:-1] + bounds[1:] - 1) + 1
    ranks = np.empty(values.size)
    ranks[order] = mean_rank[run]
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def spearman(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Spearman rank correlation of each pair of maps.

    Ties (Grad-CAM maps have many exact zeros) get average ranks, so the result
    equals `scipy.stats.spearmanr` of the flattened maps.

    Args:
        a: maps [n, ...].
        b: maps of the same shape.

    Returns:
        float64 [n] in [-1, 1]. Where either map is constant the correlation
        is undefined; it is reported as 0 (the maps share no ordering), since
        in the checks a constant map means randomization wiped the map out.
    """
    a, b = _rows(a), _rows(b)
    if a.shape != b.shape:
        raise ValueError(f"spearman: maps must have the same shape, got {a.shape} and {b.shape}")
    return np.array([_pearson(rank(x), rank(y)) for x, y in zip(a, b)])


def unit_scale(maps: ArrayLike) -> np.ndarray:
    """Each map scaled to [0, 1] by its own minimum and maximum (a constant map -> 0).

    Args:
        maps: [n, H, W].

    Returns:
        float64 [n, H, W].
    """
    maps = _numpy(maps)
    rows = maps.reshape(maps.shape[0], -1)
    lo, hi = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return ((rows - lo) / span).reshape(maps.shape)


def _gaussian_mean(x: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local means of [n, 1, H, W], only where the window fits."""
    t = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=x.dtype)
    w = torch.exp(-0.5 * (t / SSIM_SIGMA) ** 2)
    w = w / w.sum()
    return F.conv2d(F.conv2d(x, w.view(1, 1, -1, 1)), w.view(1, 1, 1, -1))


def ssim(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Structural similarity of each pair of maps, after scaling each to [0, 1].

    The mean of the SSIM index over every position where the 11 x 11 Gaussian
    window (sigma 1.5) fits inside the map, with population covariances: the
    same number as skimage's `structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)`.

    Args:
        a: maps [n, H, W] with H, W >= 11.
        b: maps of the same shape.

    Returns:
        float64 [n]; 1 for maps equal up to a positive scale and offset.
    """
    a, b = _numpy(a), _numpy(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim: expected two [n, H, W] maps of one shape, got {a.shape} and {b.shape}")
    if min(a.shape[1:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim: maps must be at least {2 * SSIM_RADIUS + 1} pixels wide, got {a.shape[1:]}")
    x = torch.from_numpy(unit_scale(a))[:, None]
    y = torch.from_numpy(unit_scale(b))[:, None]
    mx, my = _gaussian_mean(x), _gaussian_mean(y)
    vx = _gaussian_mean(x * x) - mx * mx
    vy = _gaussian_mean(y * y) - my * my
    cxy = _gaussian_mean(x * y) - mx * my
    index = ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)
             / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2)))
    return index.flatten(1).mean(1).numpy()


def compare(original: ArrayLike, other: ArrayLike) -> dict[str, np.ndarray]:
    """Every similarity score of `other` maps against the `original` maps.

    Args:
        original: maps [n, H, W].
        other: maps of the same shape.

    Returns:
        {"spearman_abs": Spearman of the absolute values (ignores sign),
        "spearman": Spearman of the signed values, "ssim": SSIM of the maps
        scaled to [0, 1]}, each float32 [n].
    """
    a, b = _numpy(original), _numpy(other)
    return {"spearman_abs": spearman(np.abs(a), np.abs(b)).astype(np.float32),
            "spearman": spearman(a, b).astype(np.float32),
            "ssim": ssim(a, b).astype(np.float32)}
