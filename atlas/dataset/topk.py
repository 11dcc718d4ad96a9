"""Streaming per-channel summaries: running top-k and bottom-k, statistics, histograms.

`LayerSummary.add` runs inside a forward hook, on the activation the moment
the layer produces it, so no feature map outlives its layer. Every number it
needs from a feature map (max, arg-max, sum, sum of squares, zero count) comes
from one fused pass over the map in its own memory layout, so hooking every
layer costs little more than the forward pass itself.
"""

from __future__ import annotations

import numpy as np
import torch

from atlas.fused import Fused

# Histogram of each image's spatial max, on bins fixed before any data is seen (uniform in
# asinh(value), covering |value| up to about 1,500), so shards add up exactly.
HIST_BINS, HIST_REACH = 48, 8.0
HIST_EDGES = np.sinh(np.linspace(-HIST_REACH, HIST_REACH, HIST_BINS + 1))
STATS = ("sum", "sumsq", "count", "max", "zeros", "hist")


def histogram(peak: torch.Tensor) -> torch.Tensor:
    """Counts [C, HIST_BINS] of per-image values peak [B, C] on the fixed bins."""
    b, c = peak.shape
    scaled = (torch.asinh(peak.double()) + HIST_REACH) / (2 * HIST_REACH) * HIST_BINS
    bins = scaled.floor().long().clamp_(0, HIST_BINS - 1)
    flat = (torch.arange(c, device=peak.device) * HIST_BINS + bins).reshape(-1)
    return torch.bincount(flat, minlength=c * HIST_BINS).reshape(c, HIST_BINS)


def _first(x: torch.Tensor, value: torch.Tensor, dim: int) -> torch.Tensor:
    """The first position along `dim` where `x` equals `value` (kept dim): argmax's and argmin's answer.

    A minimum over positions, which a compiled kernel vectorizes, where an arg-reduction runs
    one lane at a time: about twice as fast on a CPU. A map whose extreme is NaN gives its last
    position.
    """
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    positions = torch.arange(n, device=x.device).view(shape)
    return torch.where(x == value, positions, n).amin(dim).clamp_max(n - 1)


def _reduce_all(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """Max, its position, min, its position, sum, sum of squares and count of values <= 0 along `dim`."""
    x = x.float()
    top, low = x.amax(dim, keepdim=True), x.amin(dim, keepdim=True)
    return (top.squeeze(dim), _first(x, top, dim), low.squeeze(dim), _first(x, low, dim), x.sum(dim),
            (x * x).sum(dim), (x <= 0).sum(dim))


def _reduce_extremes(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """Max, its position, min and its position along `dim`: what a pre-activation ranks by."""
    x = x.float()
    top, low = x.amax(dim, keepdim=True), x.amin(dim, keepdim=True)
    return top.squeeze(dim), _first(x, top, dim), low.squeeze(dim), _first(x, low, dim)


def _reduce_stats(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """Max, sum, sum of squares and count of values <= 0 along `dim`: an activation ranked by its pre."""
    x = x.float()
    return x.amax(dim), x.sum(dim), (x * x).sum(dim), (x <= 0).sum(dim)


# what each kind of reduction returns, in order
KINDS = {
    "all": (_reduce_all, ("max", "pos", "min", "min_pos", "sum", "sumsq", "zeros")),
    "extremes": (_reduce_extremes, ("max", "pos", "min", "min_pos")),
    "stats": (_reduce_stats, ("max", "sum", "sumsq", "zeros")),
}


# each kind fused into one pass over the map where it can be; a unit ranked by its pre-activation
# needs no positions from the activation, so no output costs a pass for nothing
_FUSED = {kind: Fused(fn, "reductions", threads=1) for kind, (fn, _) in KINDS.items()}


def reduce_positions(act: torch.Tensor, fuse: bool = True, kind: str = "all") -> dict[str, torch.Tensor]:
    """Per image and channel of [B, C, H, W], the reductions over positions that `kind` names
    (KINDS): max and its flat position, min and its position, sum, sum of squares, count of
    values <= 0.

    Works in the tensor's own memory layout (channels-last is what convolutions
    produce fastest on CPUs), so no feature map is copied.
    """
    b, c = act.shape[:2]
    if act.is_contiguous():
        x, dim = act.reshape(b, c, -1), 2
    else:
        x, dim = act.permute(0, 2, 3, 1).reshape(b, -1, c), 1  # a view when channels-last
    return dict(zip(KINDS[kind][1], _FUSED[kind](x, dim, fuse=fuse)))


class TopK:
    """Running k best (largest or smallest) keys per channel with their image, position and value.

    The key ranks; the value is what is shown (the same as the key unless given:
    a post-activation unit ranks by its pre-activation and shows its activation).
    Ties are broken in favour of the lower image index, so any order of
    updates, and any split of the images into shards merged in any order,
    gives the single-pass result. While updates come in ascending image order
    (a stream) one stable sort does it; otherwise the candidates are first
    ordered by image index.
    """

    def __init__(self, channels: int, k: int, largest: bool, device: torch.device | str = "cpu"):
        self.k, self.largest = k, largest
        self.key = torch.zeros((channels, 0), device=device)
        self.value = torch.zeros((channels, 0), device=device)
        self.index = torch.zeros((channels, 0), dtype=torch.long, device=device)
        self.pos = torch.zeros((channels, 0), dtype=torch.long, device=device)
        self.last = -1  # the largest image index held (-1: none yet)

    def update(self, key: torch.Tensor, index: torch.Tensor, pos: torch.Tensor,
               span: tuple[int, int] | None = None, value: torch.Tensor | None = None) -> None:
        """Merges candidates shaped [C, n]; index may be [n].

        Args:
            span: the smallest and largest image index among the candidates, when the
                caller knows them: candidates all after the held ones need only one sort.
            value: what each candidate shows, [C, n]; default its key.
        """
        if index.dim() == 1:
            index = index.expand(key.shape[0], -1)
        key = key.float()
        value = torch.cat([self.value, key if value is None else value.float()], 1)
        key = torch.cat([self.key, key], 1)
        index = torch.cat([self.index, index], 1)
        pos = torch.cat([self.pos, pos], 1)
        streaming = span is not None and span[0] > self.last
        if not streaming:  # ties must favour the lower image index wherever it sits
            by_index = torch.argsort(index, dim=1, stable=True)
            key, value, index, pos = (t.gather(1, by_index) for t in (key, value, index, pos))
        order = torch.argsort(key, dim=1, descending=self.largest, stable=True)[:, :self.k]
        self.key, self.value, self.index, self.pos = (t.gather(1, order) for t in (key, value, index, pos))
        self.last = max(self.last, span[1]) if streaming else int(self.index.max()) if self.index.numel() else -1


FOLD_IMAGES = 256  # images whose per-channel reductions a summary holds before folding them in


class LayerSummary:
    """What the dataset stage keeps of one layer over a stream of batches.

    Top examples rank by the spatial max, bottom examples by the spatial min,
    each with its position. A layer whose output is an activation's (a ReLU
    after a BatchNorm) also gets its pre-activation (`add_pre`, called first
    in the same forward pass): then both rank by the pre-activation, so the
    images a ReLU ties at 0 (most of them, for the bottom) or a ReLU6 ties at
    its cap are told apart by what lies beneath; the top examples show the
    activation, the bottom ones the pre-activation (what suppressed the unit).

    A batch's feature map is reduced the moment it comes (`add`); what the
    reductions give, a few numbers per image and channel, is held and folded
    into the running lists, statistics and histogram every FOLD_IMAGES images
    and whenever the summary is read. Folding many batches at once costs the
    small sorts and sums once instead of once a batch: on a CPU whose cores the
    image decoders share, each small parallel operation costs far more than
    its arithmetic.
    """

    def __init__(self, channels: int, k: int, device: torch.device | str = "cpu", fuse: bool = True,
                 pool: int = 0):
        self.fuse = fuse
        self._top = TopK(channels, k, True, device)
        self._bottom = TopK(channels, k, False, device)
        # the longer list the labels and facets are drawn from, ranked as the top examples are (0: none)
        self._pool = TopK(channels, pool, True, device) if pool else None
        self._stats = {key: torch.zeros(channels, dtype=torch.float64, device=device) for key in STATS[:5]}
        self._stats["max"].fill_(-np.inf)
        self._stats["hist"] = torch.zeros((channels, HIST_BINS), dtype=torch.float64, device=device)
        self.pending: dict[str, torch.Tensor] | None = None  # the pre-activation's reductions of this batch
        self.held: list[dict] = []  # reduced batches not folded in yet

    @property
    def top(self) -> TopK:
        self.fold()
        return self._top

    @property
    def bottom(self) -> TopK:
        self.fold()
        return self._bottom

    @property
    def pool(self) -> TopK | None:
        self.fold()
        return self._pool

    def fresh(self) -> LayerSummary:
        """An empty summary of the same shape: channels, k, device, fusion and pool."""
        return LayerSummary(self._top.value.shape[0], self._top.k, self._top.value.device, self.fuse,
                            self._pool.k if self._pool is not None else 0)

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        self.fold()
        return self._stats

    def add_pre(self, pre: torch.Tensor) -> None:
        """The pre-activation [B, C, H, W] of the batch `add` folds in next."""
        self.pending = reduce_positions(pre.detach(), self.fuse, "extremes")

    def add(self, act: torch.Tensor, index: torch.Tensor, span: tuple[int, int] | None = None) -> None:
        """Takes in one batch: activation [B, C, H, W] of the images with global ids `index` [B]
        (ascending), whose smallest and largest are `span`."""
        b, c, h, w = act.shape
        pre, self.pending = self.pending, None
        r = reduce_positions(act.detach(), self.fuse, "all" if pre is None else "stats")
        held = {"index": index.to(r["max"].device), "span": span, "count": b * h * w, "peak": r["max"],
                **{key: r[key] for key in ("sum", "sumsq", "zeros")}}
        if pre is None:
            held.update(top_key=r["max"], top_pos=r["pos"], top_value=r["max"],
                        bottom_key=r["min"], bottom_pos=r["min_pos"])
        else:
            # the activation where the pre-activation peaks: for a monotone activation, the activation's own max
            shown = act.detach().flatten(2).float().gather(2, pre["pos"][..., None])[..., 0] if act.is_contiguous() \
                else act.detach().permute(0, 2, 3, 1).reshape(b, h * w, c).float().gather(1, pre["pos"][:, None])[:, 0]
            held.update(top_key=pre["max"], top_pos=pre["pos"], top_value=shown,
                        bottom_key=pre["min"], bottom_pos=pre["min_pos"])
        self.held.append(held)
        if sum(len(x["index"]) for x in self.held) >= FOLD_IMAGES:
            self.fold()

    def fold(self) -> None:
        """Folds the held batches into the running lists, statistics and histogram."""
        if not self.held:
            return
        held, self.held = self.held, []
        cat = {key: torch.cat([x[key] for x in held]) for key in held[0] if key not in ("span", "count")}
        spans = [x["span"] for x in held]
        span = None if None in spans else (min(s[0] for s in spans), max(s[1] for s in spans))
        for key in ("sum", "sumsq", "zeros"):
            self._stats[key] += cat[key].double().sum(0)
        self._stats["count"] += sum(x["count"] for x in held)
        self._stats["max"] = torch.maximum(self._stats["max"], cat["peak"].amax(0).double())
        self._stats["hist"] += histogram(cat["peak"])
        self._top.update(cat["top_key"].T, cat["index"], cat["top_pos"].T, span, value=cat["top_value"].T)
        if self._pool is not None:
            self._pool.update(cat["top_key"].T, cat["index"], cat["top_pos"].T, span, value=cat["top_value"].T)
        self._bottom.update(cat["bottom_key"].T, cat["index"], cat["bottom_pos"].T, span)

    def merge(self, arrays: dict[str, np.ndarray]) -> None:
        """Folds in another summary's `arrays()` (another shard of the images, in any order)."""
        self.fold()
        for prefix, t in self._lists():
            if f"{prefix}_key" not in arrays:
                continue  # a summary written without a pool
            key, value, index, pos = (torch.from_numpy(np.asarray(arrays[f"{prefix}_{x}"])).to(t.value.device)
                                      for x in ("key", "value", "index", "pos"))
            t.update(key, index, pos, value=value)
        for key in STATS:
            other = torch.from_numpy(np.asarray(arrays[key], np.float64)).to(self._stats[key].device)
            self._stats[key] = torch.maximum(self._stats[key], other) if key == "max" else self._stats[key] + other

    def _lists(self) -> list[tuple[str, TopK]]:
        lists = [("top", self._top), ("bottom", self._bottom)]
        return lists + [("pool", self._pool)] if self._pool is not None else lists

    def arrays(self) -> dict[str, np.ndarray]:
        self.fold()
        out = {f"{p}_{k}": getattr(t, k).cpu().numpy() for p, t in self._lists()
               for k in ("key", "value", "index", "pos")}
        out.update({k: v.cpu().numpy() for k, v in self.stats.items()})
        return out
