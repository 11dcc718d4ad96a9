"""What a unit is about, read from its top images: a label with its evidence, facets, polysemanticity.

Labels. A unit's top images (the `label_pool` best of the search set, fewer on a
small set: `draws`) are counted by class: the true label where the source has
one, the model's top-1 prediction otherwise. A class is over-represented when
drawing that many images at random from the search set would rarely give so
many of it: the hypergeometric tail P(X >= count), multiplied by the number of
concepts tested (Bonferroni), must fall below ALPHA, with at least MIN_COUNT
images. On ImageNet-1k the coarse groups of its class list (all 118 dog breeds
are "dog") are tested beside the classes, so a unit for dogs of every breed is
labelled "dog" though no single breed stands out. The label is the significant
concept with the strongest evidence (smallest p); none clears the bar:
unlabelled. Precision is count / draws, lift is precision over the concept's
share of the search set.

Facets. The same top images are clustered by the model's own penultimate
embedding (the classifier's input, randomly projected to EMBED_DIMS dimensions,
which keeps angles to within a few percent: Johnson-Lindenstrauss), with
spherical k-means for k = 2 and 3, the k of the higher silhouette kept when it
reaches SEPARATED (below it the clusters are kept and shown, as a spread
rather than facets). Each cluster of at least MIN_COUNT images is labelled like
a unit, with its own images as the draws. A unit whose facets carry two or more
different significant labels, neither a group holding the other, is flagged
polysemantic. scikit-learn clusters one set at a time (60 ms a unit here); the
batched k-means and silhouette below treat thousands of units' small sets in one
tensor operation, which is what 41,664 units need.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import hypergeom

EMBED_DIMS = 64  # the stored embedding's dimensions per search image (float16: 128 bytes)
ALPHA = 0.01  # the family-wise error rate of one unit's labelling (Bonferroni over the concepts tested)
MIN_COUNT = 3  # fewest images of a concept among the draws for it to be a label
CANDIDATES = 3  # concepts kept per unit as evidence, strongest first
SEPARATED = 0.2  # mean silhouette from which a unit's clusters count as facets
FACET_K = (2, 3)  # cluster counts tried
KMEANS_ITER = 20
CHUNK = 2048  # units clustered together

# Coarse groups of ImageNet-1k's class list, as ranges of its class indices (inclusive).
IMAGENET_GROUPS = {
    "fish": ((0, 6), (389, 397)), "bird": ((7, 24), (80, 100), (127, 146)), "amphibian": ((25, 32),),
    "reptile": ((33, 68),), "spider": ((72, 77),), "dog": ((151, 268),), "wolf or fox": ((269, 280),),
    "cat": ((281, 293),), "bear": ((294, 297),), "insect": ((300, 326),), "hoofed mammal": ((339, 355),),
    "primate": ((365, 384),), "food": ((924, 957), (959, 967), (969, 969)), "landscape": ((970, 970), (972, 980)),
    "fungus": ((991, 997),),
}


def project(act: torch.Tensor) -> torch.Tensor:
    """float16 [B, EMBED_DIMS]: the embeddings `act` [B, D, H, W] (spatial mean), randomly projected.

    The projection is a fixed Gaussian matrix (seed 0) scaled by 1/sqrt(EMBED_DIMS), the same in
    every run and on every rank, so embeddings of any pass can be compared.
    """
    x = act.detach().float().mean((2, 3))
    return (x @ _projection(x.shape[1], str(x.device))).half()


def projection(dim: int) -> np.ndarray:
    """The fixed projection [dim, EMBED_DIMS] of a `dim`-dimensional embedding (float32)."""
    return _projection(dim, "cpu").numpy()


@functools.lru_cache(maxsize=4)
def _projection(dim: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(dim, EMBED_DIMS, generator=gen) / EMBED_DIMS ** 0.5).to(device)


def concepts_of(classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Every concept a unit can be labelled with: the classes, then (on ImageNet-1k) its coarse groups.

    Returns:
        (names, group_of [n_classes]: the group concept of each class, -1 for none).
    """
    names, group_of = list(classes), np.full(len(classes), -1, np.int64)
    if len(classes) == 1000 and classes[0].lower() == "tench":
        for name, spans in IMAGENET_GROUPS.items():
            for a, b in spans:
                group_of[a:b + 1] = len(names)
            names.append(name)
    return names, group_of


def draws(pool: int, search: int, k: int) -> int:
    """Top images a unit's label is drawn from: the pool, but at most a tenth of the search set (and
    at least the k shown): a unit's top images must be a small part of the set to say anything."""
    return max(1, min(pool, search, max(k, search // 10)))


@dataclass
class Labels:
    """Per unit: its strongest concepts as evidence, and its label (the first, when significant)."""

    concept: np.ndarray  # int32 [U, CANDIDATES], -1: none
    count: np.ndarray  # int32 [U, CANDIDATES]: images of the concept among the draws
    p: np.ndarray  # float32 [U, CANDIDATES]: Bonferroni-adjusted hypergeometric tail
    lift: np.ndarray  # float32 [U, CANDIDATES]: precision over the concept's share of the search set
    drawn: np.ndarray  # int32 [U]: images the counts are out of

    @property
    def label(self) -> np.ndarray:
        """int32 [U]: the unit's label, -1 for unlabelled."""
        ok = (self.concept[:, 0] >= 0) & (self.p[:, 0] < ALPHA) & (self.count[:, 0] >= MIN_COUNT)
        return np.where(ok, self.concept[:, 0], -1).astype(np.int32)


def label_sets(members: np.ndarray, valid: np.ndarray, image_class: np.ndarray, group_of: np.ndarray,
               n_concepts: int) -> Labels:
    """Labels sets of images: one set per row of `members`.

    Args:
        members: int [U, n] rows into the search set (`image_class`'s positions).
        valid: bool [U, n], which entries of `members` belong to the set.
        image_class: int [N] each search image's class (label where known, else prediction).
        group_of: int [n_classes] each class's group concept, -1 for none (`concepts_of`).
        n_concepts: classes plus groups.
    """
    u = members.shape[0]
    concept_of_image = np.stack([image_class, np.where(image_class >= 0, group_of[np.maximum(image_class, 0)], -1)])
    base = np.bincount(concept_of_image[concept_of_image >= 0], minlength=n_concepts)
    search = len(image_class)
    tested = max(1, int((base > 0).sum()))
    drawn = valid.sum(1)
    out = Labels(np.full((u, CANDIDATES), -1, np.int32), np.zeros((u, CANDIDATES), np.int32),
                 np.ones((u, CANDIDATES), np.float32), np.zeros((u, CANDIDATES), np.float32), drawn.astype(np.int32))
    for a in range(0, u, CHUNK):
        rows = slice(a, min(u, a + CHUNK))
        hits = concept_of_image[:, members[rows]]  # [2, chunk, n]: class and group of each member
        ok = valid[rows][None] & (hits >= 0)
        unit = np.broadcast_to(np.arange(rows.stop - rows.start)[None, :, None], hits.shape)
        counts = np.zeros((rows.stop - rows.start, n_concepts), np.int32)
        np.add.at(counts, (unit[ok], hits[ok]), 1)
        which_unit, which = np.nonzero(counts)
        c = counts[which_unit, which]
        n = drawn[rows][which_unit]
        p = np.minimum(1.0, _tail(c, base[which], n, search) * tested)
        # strongest evidence first: smallest p, then the larger count, then the concept's number
        order = np.lexsort((which, -c, p, which_unit))
        which_unit, which, c, p, n = which_unit[order], which[order], c[order], p[order], n[order]
        first = np.r_[0, np.nonzero(np.diff(which_unit))[0] + 1]
        rank = np.arange(len(which_unit)) - np.repeat(first, np.diff(np.r_[first, len(which_unit)]))
        keep = rank < CANDIDATES
        uu, rr = which_unit[keep] + a, rank[keep]
        out.concept[uu, rr] = which[keep]
        out.count[uu, rr] = c[keep]
        out.p[uu, rr] = p[keep]
        share = base[which[keep]] / search
        out.lift[uu, rr] = (c[keep] / np.maximum(n[keep], 1)) / np.maximum(share, 1e-12)
    return out


def _tail(count: np.ndarray, successes: np.ndarray, drawn: np.ndarray, population: int) -> np.ndarray:
    """P(X >= count) for X hypergeometric (population, successes, drawn), elementwise.

    scipy evaluates the tail one element at a time (about 50 us each); the triples repeat a lot
    (counts up to the draws, class sizes alike), so each distinct one is evaluated once.
    """
    triples, inverse = np.unique(np.stack([count, successes, drawn]), axis=1, return_inverse=True)
    return hypergeom.sf(triples[0] - 1, population, triples[1], triples[2])[inverse.reshape(-1)]


def kmeans(x: torch.Tensor, k: int, iters: int = KMEANS_ITER) -> torch.Tensor:
    """Spherical k-means of many small sets at once: x [U, n, d] (rows of unit norm) -> labels [U, n].

    Seeded by farthest points: the first member (a unit's top image), then each time the member
    least similar to the centres chosen so far; deterministic, so every run clusters alike.
    """
    u, n, _ = x.shape
    seeds = [torch.zeros(u, dtype=torch.long, device=x.device)]
    nearest = torch.full((u, n), -2.0, device=x.device)
    for _ in range(1, k):
        last = x[torch.arange(u), seeds[-1]]
        nearest = torch.maximum(nearest, torch.einsum("und,ud->un", x, last))
        seeds.append(nearest.argmin(1))
    centres = torch.stack([x[torch.arange(u), s] for s in seeds], 1)  # [U, k, d]
    labels = torch.full((u, n), -1, dtype=torch.long, device=x.device)
    for _ in range(iters):
        before, labels = labels, torch.einsum("und,ukd->unk", x, centres).argmax(2)
        if torch.equal(before, labels):
            break  # every set has settled
        onehot = _onehot(labels, k, x.dtype)  # [U, n, k]
        sums = torch.einsum("unk,und->ukd", onehot, x)
        norms = sums.norm(dim=2, keepdim=True)
        centres = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centres)  # an empty cluster stays
    return labels


def _onehot(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((*labels.shape, k), dtype=dtype, device=labels.device).scatter_(-1, labels[..., None], 1.0)


def silhouette(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean silhouette per set [U] of x [U, n, d] clustered by labels [U, n] (Euclidean, as
    scikit-learn's `silhouette_score`; a member alone in its cluster scores 0; one cluster: -1)."""
    dist = torch.cdist(x, x)  # [U, n, n]
    onehot = _onehot(labels, k, x.dtype)  # [U, n, k]
    sizes = onehot.sum(1)  # [U, k]
    per_cluster = torch.einsum("unm,umk->unk", dist, onehot)  # summed distance of each member to each cluster
    own = onehot.bool()
    own_size = (onehot * sizes[:, None, :]).sum(2)  # [U, n]
    a = (per_cluster * onehot).sum(2) / (own_size - 1).clamp_min(1)
    mean_other = per_cluster / sizes[:, None, :].clamp_min(1)
    mean_other = torch.where(own | (sizes[:, None, :] == 0), torch.full_like(mean_other, float("inf")), mean_other)
    b = mean_other.amin(2)
    s = torch.where(own_size > 1, (b - a) / torch.maximum(a, b).clamp_min(1e-12), torch.zeros_like(a))
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    score = s.mean(1)
    return torch.where((sizes > 0).sum(1) > 1, score, torch.full_like(score, -1.0))


@dataclass
class Facets:
    """Per unit: its top images' best clustering and each cluster's labelling; facets proper only where
    the clusters are well separated (`separated`)."""

    member: np.ndarray  # int8 [U, n]: each top image's cluster in the best clustering tried
    silhouette: np.ndarray  # float32 [U]: of that clustering
    labels: Labels  # of the facets: rows unit * max(FACET_K) + facet (empty facets drawn from nothing)
    polysemantic: np.ndarray  # bool [U]


def facet_sets(embedding: np.ndarray, members: np.ndarray, image_class: np.ndarray, group_of: np.ndarray,
               n_concepts: int) -> Facets:
    """Clusters each unit's top images (`members` [U, n], rows into `embedding` [N, d]) and labels the facets."""
    u, n = members.shape
    kmax = max(FACET_K)
    member = np.full((u, n), -1, np.int8)
    best = np.full(u, -1.0, np.float32)
    for a in range(0, u, CHUNK):
        rows = slice(a, min(u, a + CHUNK))
        x = torch.from_numpy(embedding[members[rows]].astype(np.float32))
        x = x / x.norm(dim=2, keepdim=True).clamp_min(1e-12)
        for k in FACET_K:
            if k > n:
                continue
            labels = kmeans(x, k)
            score = silhouette(x, labels, k).numpy()
            better = score > best[rows]
            best[rows] = np.where(better, score, best[rows])
            member[rows] = np.where(better[:, None], labels.numpy().astype(np.int8), member[rows])
    facet_members = np.repeat(members, kmax, axis=0)
    facet_valid = (np.repeat(member, kmax, axis=0) == np.tile(np.arange(kmax), u)[:, None])
    facet_labels = label_sets(facet_members, facet_valid, image_class, group_of, n_concepts)
    label = facet_labels.label.reshape(u, kmax)
    size = facet_valid.sum(1).reshape(u, kmax)
    polysemantic = np.array([best[i] >= SEPARATED and _distinct(label[i][(size[i] >= MIN_COUNT) & (label[i] >= 0)],
                                                                group_of) for i in range(u)], bool)
    return Facets(member, best, facet_labels, polysemantic)


def _distinct(labels: np.ndarray, group_of: np.ndarray) -> bool:
    """Two or more labels, of which some pair is unrelated: different, and neither a class of the other's group."""
    n_classes = len(group_of)
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b = int(labels[i]), int(labels[j])
            if a == b:
                continue
            if a < n_classes and group_of[a] == b or b < n_classes and group_of[b] == a:
                continue
            return True
    return False
