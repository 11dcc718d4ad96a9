"""How alike two models' layers and units are, from their activations on the same images.

Layers are compared by linear CKA (Kornblith et al. 2019, "Similarity of
Neural Network Representations Revisited", eq. 5): for column-centred
features X [n, p] and Y [n, q] of the same n images,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

which is invariant to orthogonal transforms and isotropic scaling of either
side, and 1 for a layer against itself or against a permutation of its
channels. It is computed from the centred Gram matrices (n x n: <K, L>_F =
||Y^T X||_F^2), each normalized once, so every pair of layers costs one dot
product, in float64.

Units are compared by Pearson correlation over the images. A unit's
counterpart is the unit of the other model's most CKA-similar layer that
correlates best with it (the highest r: a unit that rises where it falls
responds to the opposite, so it is no counterpart), provided that r beats
both a fixed threshold and the chance level: the best r units reach with
the images shuffled, which on few images and wide layers is high.
"""

from __future__ import annotations

import numpy as np

MATCH_THRESHOLD = 0.5  # a best correlation below this (or NaN: a constant unit) is "no counterpart"
NULL_DRAWS = 4  # shuffles of the images the chance level of a best correlation is measured on
CHANCE_QUANTILE = 0.99  # a counterpart must correlate better than this share of best correlations by chance
TIE = 1e-9  # CKA values this close are a tie, broken in favour of the layer of the same name


def centred_gram(x: np.ndarray) -> np.ndarray:
    """The centred Gram matrix of features x [n, p], scaled to unit Frobenius norm, in float64.

    Returns all NaN where every feature is constant (nothing to compare).
    """
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0)
    scale = np.abs(x).max() if x.size else 0.0
    if not scale > 0:
        return np.full((len(x), len(x)), np.nan)
    x = x / scale  # keeps the squares far from overflow and underflow
    gram = x @ x.T
    return gram / np.linalg.norm(gram)


def cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two feature matrices [n, p] and [n, q] of the same n images (NaN: one is constant)."""
    return float(np.sum(centred_gram(x) * centred_gram(y)))


def cka_matrix(xs: list[np.ndarray], ys: list[np.ndarray]) -> np.ndarray:
    """Linear CKA of every layer in `xs` against every layer in `ys`: float64 [len(xs), len(ys)].

    Each Gram matrix is built once; the B side one layer at a time, so memory holds
    len(xs) + 1 matrices of n x n.
    """
    grams = np.stack([centred_gram(x).ravel() for x in xs]) if xs else np.zeros((0, 0))
    out = np.empty((len(xs), len(ys)))
    for j, y in enumerate(ys):
        out[:, j] = grams @ centred_gram(y).ravel()
    return np.clip(out, -1.0, 1.0)  # rounding may step past 1 by an ulp


def standardized(x: np.ndarray) -> np.ndarray:
    """Columns of x [n, p] centred and scaled to unit norm, float64; a constant column is all NaN."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0)
    norm = np.linalg.norm(x, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), np.nan)


def correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of every unit (column) of x [n, p] with every unit of y [n, q]: [p, q].

    NaN in the rows and columns of constant units.
    """
    return np.clip(standardized(x).T @ standardized(y), -1.0, 1.0)


def chance(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """The best correlation a unit of x [n, p] reaches among the units of y [n, q] by chance on these n
    images: the CHANCE_QUANTILE quantile, over x's units, of their best r against y with the images of y
    shuffled (NULL_DRAWS seeded shuffles). With few images and many units it is high (for independent
    Gaussian units, 32 images and 1,000 units: 0.70; 1,000 images: 0.14), and a match below it means
    nothing. NaN where every unit is constant.
    """
    sx, sy = standardized(x), standardized(y)
    rng = np.random.default_rng(seed)
    bests = []
    for _ in range(NULL_DRAWS):
        r = sx.T @ sy[rng.permutation(len(sy))]
        filled = np.where(np.isnan(r), -np.inf, r)
        best = filled.max(axis=1) if r.shape[1] else np.full(len(r), -np.inf)
        bests.append(best[np.isfinite(best)])
    pooled = np.concatenate(bests) if bests else np.zeros(0)
    return float(np.quantile(pooled, CHANCE_QUANTILE)) if pooled.size else float("nan")


def best_layer(row: np.ndarray, name: str, names: list[str]) -> int:
    """The column of the highest CKA in one row of the matrix; a tie goes to the layer called `name`."""
    if np.isnan(row).all():
        return names.index(name) if name in names else 0
    top = np.nanmax(row)
    tied = [j for j, v in enumerate(row) if v >= top - TIE]
    return next((j for j in tied if names[j] == name), tied[0])


def match_units(r: np.ndarray, threshold: float = MATCH_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's (A unit's) best-correlated column (B unit).

    Args:
        r: correlations [p, q] (`correlation`).
        threshold: a best r below it means no counterpart.

    Returns:
        best column [p] (-1 where the row is all NaN), its r [p] (NaN there), and
        matched [p] (False below the threshold or NaN).
    """
    filled = np.where(np.isnan(r), -np.inf, r)
    best = filled.argmax(axis=1) if r.shape[1] else np.zeros(len(r), np.int64)
    value = filled[np.arange(len(r)), best] if r.shape[1] else np.full(len(r), -np.inf)
    constant = ~np.isfinite(value)
    best = np.where(constant, -1, best)
    value = np.where(constant, np.nan, value)
    with np.errstate(invalid="ignore"):
        return best, value, value >= threshold
