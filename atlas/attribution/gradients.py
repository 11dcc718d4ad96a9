"""Gradient methods: the gradient, gradient x input, SmoothGrad and its variants, Guided Backprop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from atlas.attribution.base import Attribution, Explanation
from atlas.config import PRECISIONS
from atlas.errors import AtlasError


class Gradient(Attribution):
    """The plain gradient of the target logit (Simonyan et al. 2014)."""

    name = "gradient"

    def _attribute(self, inputs, target):
        return self.grad(inputs, target)


class GradientXInput(Attribution):
    """Gradient times input (Shrikumar et al. 2016)."""

    name = "gradient_x_input"

    def _attribute(self, inputs, target):
        return self.grad(inputs, target) * inputs


class SmoothGrad(Attribution):
    """The gradient averaged over noisy copies of the input (Smilkov et al. 2017).

    Args:
        samples: noisy copies per image (paper: 50).
        noise: standard deviation of the Gaussian noise as a fraction of the
            input range of each channel (paper: 0.10-0.20).
        variant: "mean" (SmoothGrad), "squared" (mean of squared gradients,
            Hooker et al. 2019) or "vargrad" (their variance, Adebayo et al. 2018).
        seed: seed of the noise; image i of a call draws from seed + i (the
            attribution stage passes one image at a time with a seed derived
            from the image's place in the dataset, so its maps do not depend
            on batching).
        adaptive: draw noise in antithetic pairs (e and -e), a round at a
            time, and stop each image once its map is as accurate as a map of
            `samples` independent draws would be (see `SmoothGradStop`),
            instead of drawing `samples` exactly.
        max_samples: the most draws per image of the adaptive rule (default
            twice `samples`).
        precision: "float32", or "bfloat16" to run each noisy gradient under
            autocast: the rounding is one more noise the average absorbs
            (a random ResNet-50's 50-draw maps keep their rank correlation
            with a 200-draw float32 map to 3 decimals), and the passes are
            several times cheaper where the device has bfloat16 matrix units
            (CPUs with AMX, CUDA GPUs from Ampere on). The rule's variances
            are measured on the draws as computed, so they include it.
    """

    VARIANTS = {"mean": "smoothgrad", "squared": "smoothgrad_sq", "vargrad": "vargrad"}

    ROUND = 8  # draws per image and round of the adaptive rule (4 antithetic pairs)
    MIN_SAMPLES = 16  # draws before the adaptive rule may stop (fewer if max_samples is): its variances need pairs

    def __init__(self, model, space=None, batch=64, samples: int = 50, noise: float = 0.15,
                 variant: str = "mean", seed: int = 0, adaptive: bool = False, max_samples: int | None = None,
                 precision: str = "float32"):
        super().__init__(model, space, batch)
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if variant not in self.VARIANTS:
            raise ValueError(f"variant: expected one of {', '.join(self.VARIANTS)}, got {variant!r}")
        if samples < 1 or not 0 <= noise:
            raise ValueError(f"samples must be >= 1 and noise >= 0, got {samples} and {noise}")
        max_samples = 2 * samples if max_samples is None else max_samples
        if max_samples < 2 and adaptive:
            raise ValueError(f"max_samples: the adaptive rule draws pairs, at least 2, got {max_samples}")
        self.samples, self.noise, self.variant, self.seed = samples, noise, variant, seed
        self.adaptive, self.max_samples, self.precision = adaptive, max_samples, precision
        self.name = self.VARIANTS[variant]

    @property
    def params(self):
        return {**super().params, "samples": self.samples, "noise_fraction_of_range": self.noise,
                "variant": self.variant, "seed": self.seed,
                **({"adaptive": "antithetic pairs, stop at the accuracy of `samples` independent draws",
                    "max_samples": self.max_samples} if self.adaptive else {}),
                **({"precision": self.precision} if self.precision != "float32" else {})}

    def noise_for(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The `samples` noise draws [n, 3, H, W] of image `i` of the batch `x`."""
        gen = torch.Generator().manual_seed(self.seed + i)
        eps = torch.randn((self.samples, *x.shape[1:]), generator=gen)
        return eps.to(x.device, x.dtype) * (self.noise * self.space.range(x))

    def _explain(self, inputs, target):
        stats, counts = self._statistics(inputs, target)
        return Explanation(stats[self.variant], {"samples": counts})

    def all_variants(self, inputs: torch.Tensor, target: torch.Tensor | int) -> dict[str, torch.Tensor]:
        """Every variant's map from one set of noisy gradients, keyed by method name.

        The three variants differ only in how they reduce the same gradients, so
        computing them together costs one variant's passes.
        """
        inputs, target = self.prepare(inputs, target)
        with torch.no_grad():
            stats, _ = self._statistics(inputs, target)
        return {self.VARIANTS[v]: m for v, m in stats.items()}

    def _statistics(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every variant's maps and the draws each image took [B]."""
        if self.adaptive:
            return self._adaptive_statistics(inputs, target)
        out: dict[str, list[torch.Tensor]] = {v: [] for v in self.VARIANTS}
        for i in range(inputs.shape[0]):
            noisy = inputs[i:i + 1] + self.noise_for(inputs, i)
            g = self.grad(noisy, target[i:i + 1].expand(self.samples))
            mean, squared = g.mean(0), (g * g).mean(0)
            out["mean"].append(mean)
            out["squared"].append(squared)
            out["vargrad"].append((squared - mean * mean).clamp_min(0))
        return {v: torch.stack(maps) for v, maps in out.items()}, torch.full((inputs.shape[0],), self.samples)

    def _adaptive_statistics(self, inputs, target):
        """Rounds of antithetic draws for every image not yet stopped, their rows in shared chunks."""
        b = inputs.shape[0]
        gens = [torch.Generator().manual_seed(self.seed + i) for i in range(b)]
        least = max(4, min(self.MIN_SAMPLES, self.max_samples))
        stops = [SmoothGradStop(self.samples, least, self.max_samples) for _ in range(b)]
        scale = self.noise * self.space.range(inputs)
        todo = list(range(b))
        while todo:
            pairs = min(self.ROUND, self.max_samples - stops[todo[0]].n) // 2
            eps = [torch.randn((pairs, *inputs.shape[1:]), generator=gens[i]).to(inputs) * scale for i in todo]
            rows = torch.cat([inputs[i] + torch.cat([e, -e]) for i, e in zip(todo, eps)])
            grads = self.grad(rows.contiguous(memory_format=torch.channels_last),
                              target[todo].repeat_interleave(2 * pairs))
            for i, g in zip(todo, grads.split(2 * pairs)):
                stops[i].add(g[:pairs], g[pairs:])
            todo = [i for i in todo if not stops[i].done()]
        maps = {v: torch.stack([s.variant(v) for s in stops]) for v in self.VARIANTS}
        return maps, torch.tensor([s.n for s in stops])


class SmoothGradStop:
    """Running sums of one image's antithetic draws and the rule that stops them.

    The map's accuracy is judged where the site shows it, summed over colour.
    Each draw on its own is a draw of plain SmoothGrad, so the spread of the
    single draws gives the variance a map of `samples` independent draws
    would have; the spread of the pair means gives the variance of this map.
    Drawing stops once the second is no larger than the first (pooled over
    pixels): the map is then as close to the infinite-sample map as a plain
    `samples`-draw map is expected to be, whether the pairs' cancellation
    helped (smooth models) or not (the rule then needs about `samples`).

    Args:
        samples: the plain draw count whose accuracy to reach.
        min_samples: draws before the rule may stop.
        max_samples: draws after which it stops regardless.
    """

    def __init__(self, samples: int, min_samples: int, max_samples: int):
        self.samples, self.min_samples, self.max_samples = samples, min_samples, max_samples
        self.n = 0
        self.sum = self.squares = None  # over draws, [3, H, W]: the variants' statistics
        self.single = [0.0, 0.0]  # sums of the colour-summed draws and of their squares, [H, W] once drawn
        self.pair = [0.0, 0.0]  # likewise for the pair means

    def add(self, plus: torch.Tensor, minus: torch.Tensor) -> None:
        """Adds the gradients at x + e [k, 3, H, W] and at x - e (the same e, pairwise)."""
        both = torch.cat([plus, minus])
        self.n += both.shape[0]
        self.sum = both.sum(0) + (0 if self.sum is None else self.sum)
        self.squares = (both * both).sum(0) + (0 if self.squares is None else self.squares)
        single, pair = both.sum(1).double(), ((plus + minus) / 2).sum(1).double()
        self.single = [self.single[0] + single.sum(0), self.single[1] + (single * single).sum(0)]
        self.pair = [self.pair[0] + pair.sum(0), self.pair[1] + (pair * pair).sum(0)]

    def done(self) -> bool:
        if self.n + 2 > self.max_samples:  # no room for another pair
            return True
        if self.n < self.min_samples:
            return False
        pairs = self.n // 2
        plain = _pooled_variance(*self.single, self.n) / self.samples
        ours = _pooled_variance(*self.pair, pairs) / pairs
        return ours <= plain

    def variant(self, name: str) -> torch.Tensor:
        mean, squared = self.sum / self.n, self.squares / self.n
        return {"mean": mean, "squared": squared, "vargrad": (squared - mean * mean).clamp_min(0)}[name]


def _pooled_variance(total: torch.Tensor, squares: torch.Tensor, n: int) -> float:
    """The sample variance of n draws per pixel, averaged over pixels."""
    return float(((squares - total * total / n) / (n - 1)).clamp_min(0).mean())


class GuidedBackprop(Attribution):
    """Guided Backpropagation (Springenberg et al. 2015).

    At every rectifier the backward pass lets a gradient through only where
    the rectifier's input was positive and the gradient itself is positive.
    Rectifiers are found by intercepting the functions every ReLU ends in
    (`nn.ReLU`, `F.relu`, `torch.relu_`, `Tensor.relu`, ReLU6 / hardtanh with a
    floor of 0), so in-place, functional and module ReLUs are all guided.
    """

    name = "guided_backprop"

    def _explain(self, inputs, target):
        with _Guided() as guided:
            maps = self.grad(inputs, target)
        if not guided.count:
            raise AtlasError("guided_backprop: the model has no ReLU (or ReLU6) to guide; "
                             "the method is undefined for it")
        return Explanation(maps)


class _GuidedRectifier(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low, high):
        out = x.clamp(min=low) if high is None else x.clamp(low, high)
        inside = x > low if high is None else (x > low) & (x < high)
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad.clamp(min=0) * inside, None, None


_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_RELUS_INPLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}
_HARDTANH = {F.hardtanh, F.relu6, F.hardtanh_}


class _Guided(TorchFunctionMode):
    """Replaces every rectifier evaluated inside the `with` block by its guided version."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rectified = self._rectify(func, args, kwargs)
        if rectified is not None:
            self.count += 1
            return rectified
        return func(*args, **kwargs)

    def _rectify(self, func, args, kwargs):
        if func in _RELUS or func in _RELUS_INPLACE:
            inplace = func in _RELUS_INPLACE or kwargs.get("inplace", args[1] if len(args) > 1 else False)
            return _apply(args[0], 0.0, None, inplace)
        if func in _HARDTANH:
            if func is F.relu6:
                low, high = 0.0, 6.0
                inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            else:
                low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
                high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
                inplace = func is F.hardtanh_ or kwargs.get("inplace", args[3] if len(args) > 3 else False)
            if low == 0:
                return _apply(args[0], 0.0, high, inplace)
        return None


def _apply(x: torch.Tensor, low: float, high: float | None, inplace: bool) -> torch.Tensor:
    out = _GuidedRectifier.apply(x, low, high)
    if inplace and not (x.is_leaf and x.requires_grad):
        return x.copy_(out)  # in-place semantics, for callers that ignore the return value
    return out
