"""Path methods: Integrated Gradients and Expected Gradients.

Both integrate the gradient along straight lines from a baseline x' to the
input x, so their maps sum to f(x) - f(x') (completeness). Each image's
relative completeness error is reported, and an image whose error is above
the tolerance is redone with twice the path points, the IG paper's own
convergence check; or, with the adaptive rule, refined only where its path's
integrand needs more points (`adaptive`).

All path points of all images of a call go through the model together, in
chunks of `batch` rows built only when their chunk is evaluated, so memory
stays at one chunk of rows however many steps and draws there are.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from atlas.attribution.adaptive import RefinedPath, refine
from atlas.attribution.base import Attribution, Explanation, layout
from atlas.attribution.baselines import BASELINES, RANDOM_BASELINES

RULES = ("gauss_legendre", "riemann_trapezoid", "riemann_middle")
ADAPTIVE = "adaptive"  # Integrated Gradients' nested rule refined per path, see `adaptive`


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n-point Gauss-Legendre rule on (0, 1).

    Exact for polynomials of degree 2n - 1, so it needs far fewer points than
    a Riemann sum for the smooth integrands of path methods.

    Args:
        n: number of points, >= 1.

    Returns:
        (alphas, weights): float64 tensors [n]; alphas in (0, 1), weights sum to 1.
    """
    if n < 1:
        raise ValueError(f"n: expected at least 1 point, got {n}")
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * weights)


def points(n: int, rule: str = "gauss_legendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Points and weights of a quadrature rule on [0, 1].

    Args:
        n: number of points (>= 2 for the trapezoid rule, which includes both ends).
        rule: "gauss_legendre", "riemann_trapezoid" or "riemann_middle".

    Returns:
        (alphas, weights): float64 tensors [n]; weights sum to 1.
    """
    if rule == "gauss_legendre":
        return gauss_legendre(n)
    if rule == "riemann_middle":
        if n < 1:
            raise ValueError(f"n: expected at least 1 point, got {n}")
        return (torch.arange(n, dtype=torch.float64) + 0.5) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError(f"n: the trapezoid rule needs at least 2 points, got {n}")
        weights = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return torch.linspace(0, 1, n, dtype=torch.float64), weights
    raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")


def completeness_error(total: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Relative completeness error |total - delta| / |delta| per image.

    Where delta is exactly 0 the error is 0 if the total is 0 too, else inf.

    Args:
        total: sum of each map [B].
        delta: f(x) - f(x') per image [B].

    Returns:
        float64 tensor [B].
    """
    total, delta = total.double(), delta.double()
    gap = (total - delta).abs()
    err = gap / delta.abs()
    at_zero = torch.where(gap == 0, torch.zeros_like(gap), torch.full_like(gap, float("inf")))
    return torch.where(delta == 0, at_zero, err)


@dataclass
class _Path:
    """Path rows of one image: row m is s + alpha_m (x - s), s = starts[which[m]].

    Its contribution is sum_m weight_m * (x - s) * grad f(row m).
    """

    image: int
    starts: torch.Tensor   # [S, 3, H, W]
    which: torch.Tensor    # [M] long, index into starts
    alphas: torch.Tensor   # [M]
    weights: torch.Tensor  # [M]

    def __len__(self) -> int:
        return self.which.numel()


class _PathMethod(Attribution):
    """What IG and EG share: evaluating many paths' rows in chunks."""

    def _path_sums(self, inputs: torch.Tensor, target: torch.Tensor, paths: list[_Path]) -> torch.Tensor:
        """sum_m weight_m (x - s_m) grad f(s_m + alpha_m (x - s_m)) for each path: [P, 3, H, W]."""
        offsets = np.cumsum([0] + [len(p) for p in paths]).tolist()
        sums = inputs.new_zeros((len(paths), *inputs.shape[1:]))

        def run(a: int, b: int) -> None:
            pieces = list(self._pieces(offsets, a, b))
            built = [self._rows(inputs, paths[j], lo, hi) for j, lo, hi in pieces]
            targets = torch.cat([target[paths[j].image].expand(hi - lo) for j, lo, hi in pieces])
            grads = self._grad(torch.cat([row for row, _ in built]), targets)[0]
            grads = grads.split([hi - lo for _, lo, hi in pieces])
            parts = [(g * scaled).sum(0) for g, (_, scaled) in zip(grads, built)]
            # Added only once the whole chunk succeeded: a chunk retried after
            # out-of-memory must not count twice.
            for (j, _, _), part in zip(pieces, parts):
                sums[j] += part

        self.chunked(run, offsets[-1])
        return sums

    @staticmethod
    def _pieces(offsets: list[int], a: int, b: int):
        """(path, first row, end row) of each path overlapping global rows [a, b)."""
        j = bisect.bisect_right(offsets, a) - 1
        while j < len(offsets) - 1 and offsets[j] < b:
            lo, hi = max(a, offsets[j]) - offsets[j], min(b, offsets[j + 1]) - offsets[j]
            if hi > lo:
                yield j, lo, hi
            j += 1

    @staticmethod
    def _rows(inputs: torch.Tensor, path: _Path, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [lo, hi) of a path and their weighted directions w_m (x - s_m)."""
        s = path.starts[path.which[lo:hi]]
        direction = inputs[path.image] - s
        alphas = path.alphas[lo:hi].view(-1, 1, 1, 1)
        # Rows keep the inputs' memory layout: convolutions run much faster on
        # channels-last rows on CPUs, and references may come in either layout.
        rows = (s + alphas * direction).contiguous(memory_format=layout(inputs))
        return rows, direction * path.weights[lo:hi].view(-1, 1, 1, 1)

    def _check_tolerance(self, tolerance: float) -> None:
        if not tolerance >= 0:
            raise ValueError(f"tolerance: expected a relative error >= 0, got {tolerance}")


class IntegratedGradients(_PathMethod):
    """Integrated Gradients (Sundararajan et al. 2017), with the Distill baselines.

    map = (x - x') * sum_k w_k grad f(x' + a_k (x - x')), averaged over the
    draws of a random baseline.

    Args:
        model: the classifier, in eval mode.
        space: its input normalization.
        batch: path points per forward pass (halved on out-of-memory).
        steps: path points per baseline (paper: 20-300; 50 is the common default).
        baseline: a key of `baselines.BASELINES`.
        draws: baselines drawn and averaged per image, for random baselines
            only (deterministic ones use 1).
        rule: quadrature rule, see `points`; or "adaptive": a nested trapezoid
            rule refined per path where the integrand changes fastest until
            the path's completeness error is within the tolerance (see
            `adaptive`; `steps` is then unused).
        tolerance: relative completeness error above which an image is redone
            with twice the steps (adaptive: refined further).
        max_steps: the most steps an image is redone with; past it the map with
            the smallest error is kept and its error reported (adaptive: the
            most points per path).
        start: equal intervals an adaptive path begins with.
        seed: image i of a batch draws its baselines from seed + i, so a map
            does not depend on how images were batched.
    """

    def __init__(self, model, space=None, batch: int = 64, steps: int = 50, baseline: str = "black",
                 draws: int = 4, rule: str = "gauss_legendre", tolerance: float = 0.01,
                 max_steps: int = 400, seed: int = 0, start: int = 2):
        super().__init__(model, space, batch)
        if baseline not in BASELINES:
            raise ValueError(f"baseline: expected one of {', '.join(BASELINES)}, got {baseline!r}")
        if steps < 1 or draws < 1:
            raise ValueError(f"steps and draws: expected >= 1, got {steps} and {draws}")
        if max_steps < steps and rule != ADAPTIVE:
            raise ValueError(f"max_steps: expected at least steps ({steps}), got {max_steps}")
        self._check_tolerance(tolerance)
        if rule == ADAPTIVE:
            if not 1 <= start < max_steps:
                raise ValueError(f"start: expected 1 <= start < max_steps ({max_steps}), got {start}")
        else:
            points(steps, rule)  # rejects an unknown rule or too few points now, not mid-run
        self.steps, self.baseline, self.rule, self.start = steps, baseline, rule, start
        self.draws = draws if baseline in RANDOM_BASELINES else 1
        self.tolerance, self.max_steps, self.seed = tolerance, max_steps, seed
        self.name = "integrated_gradients" if baseline == "black" else f"ig_{baseline}"

    @property
    def params(self):
        return {**super().params, "steps": self.steps, "rule": self.rule, "baseline": self.baseline,
                "draws": self.draws, "tolerance": self.tolerance, "max_steps": self.max_steps,
                "seed": self.seed, **({"start": self.start} if self.rule == ADAPTIVE else {})}

    def baselines_for(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The `draws` baselines [D, 3, H, W] of image `i` of the batch `x`."""
        gen = torch.Generator().manual_seed(self.seed + i)
        return BASELINES[self.baseline](x[i:i + 1].expand(self.draws, *x.shape[1:]), self.space, gen)

    def _explain(self, inputs, target):
        if self.rule == ADAPTIVE:
            return self._adaptive(inputs, target)
        starts = [self.baselines_for(inputs, i) for i in range(inputs.shape[0])]
        best = _Best(inputs, self._delta(inputs, target, starts))
        todo, steps = list(range(inputs.shape[0])), self.steps
        while todo:
            maps = self._integrate(inputs, target, starts, todo, steps)
            best.update(todo, maps, steps)
            steps *= 2
            todo = [] if steps > self.max_steps else best.above(self.tolerance, todo)
        return best.explanation()

    def _adaptive(self, inputs: torch.Tensor, target: torch.Tensor) -> Explanation:
        """Each baseline's path refined on its own; an image's map is the mean over its paths."""
        b, shape = inputs.shape[0], inputs.shape[1:]
        paths = [RefinedPath(i, s) for i in range(b) for s in self.baselines_for(inputs, i)]
        refine(self, inputs, target, paths, self.start, self.tolerance, self.max_steps)
        maps = torch.stack([p.integral() for p in paths]).view(b, self.draws, *shape).mean(1)
        delta = torch.tensor([p.delta for p in paths], dtype=torch.float64).view(b, self.draws).mean(1)
        evaluations = torch.tensor([len(p.alphas) for p in paths]).view(b, self.draws).sum(1)
        err = completeness_error(maps.flatten(1).sum(1).cpu(), delta)
        return Explanation(maps, {"completeness": err.float(), "steps": -(-evaluations // self.draws),
                                  "evaluations": evaluations, "delta": delta.float()})

    def _delta(self, inputs: torch.Tensor, target: torch.Tensor, starts: list[torch.Tensor]) -> torch.Tensor:
        """f(x) - mean_d f(x'_d) per image, from one chunked pass over inputs and baselines: [B]."""
        targets = torch.cat([target, target.repeat_interleave(self.draws)])
        out = self.output(torch.cat([inputs, *starts]), targets)
        f_x, f_baselines = out.split([inputs.shape[0], out.numel() - inputs.shape[0]])
        return f_x - f_baselines.view(-1, self.draws).mean(1)

    def _integrate(self, inputs, target, starts, images: list[int], steps: int) -> torch.Tensor:
        """The maps of `images` with `steps` points per baseline: [len(images), 3, H, W]."""
        alphas, weights = points(steps, self.rule)
        alphas = alphas.to(inputs.device, inputs.dtype).repeat(self.draws)
        weights = (weights / self.draws).to(inputs.device, inputs.dtype).repeat(self.draws)
        which = torch.arange(self.draws, device=inputs.device).repeat_interleave(steps)
        paths = [_Path(i, starts[i], which, alphas, weights) for i in images]
        return self._path_sums(inputs, target, paths)


class ExpectedGradients(_PathMethod):
    """Expected Gradients (Erion et al. 2021): IG averaged over dataset baselines.

    map = mean_k (x - r_k) * grad f(r_k + a_k (x - r_k)), with r_k drawn
    uniformly from `references` and a_k ~ U(0, 1).

    Args:
        model: the classifier, in eval mode.
        space: its input normalization.
        batch: path points per forward pass (halved on out-of-memory).
        samples: (reference, alpha) draws per image.
        references: normalized dataset images [R, 3, H, W]; or call `set_references`.
        seed: image i of a batch draws from its own generator seeded seed + i:
            each round n reference indices, then n alphas, so doubling keeps the
            first samples and a map does not depend on how images were batched.
        tolerance: relative completeness error, against mean_k f(x) - f(r_k)
            over the same draws, above which an image gets twice the samples.
        max_samples: the most samples per image. More samples reduce variance
            as well as the completeness error, so the last estimate is kept.
    """

    name = "expected_gradients"

    def __init__(self, model, space=None, batch: int = 64, samples: int = 50,
                 references: torch.Tensor | None = None, seed: int = 0, tolerance: float = 0.01,
                 max_samples: int = 400):
        super().__init__(model, space, batch)
        if samples < 1 or max_samples < samples:
            raise ValueError(f"samples: expected 1 <= samples <= max_samples, got {samples} and {max_samples}")
        self._check_tolerance(tolerance)
        self.samples, self.seed, self.tolerance, self.max_samples = samples, seed, tolerance, max_samples
        self.references: torch.Tensor | None = None
        if references is not None:
            self.set_references(references)

    @property
    def params(self):
        return {**super().params, "samples": self.samples, "seed": self.seed,
                "tolerance": self.tolerance, "max_samples": self.max_samples,
                "references": 0 if self.references is None else self.references.shape[0]}

    def set_references(self, references: torch.Tensor) -> None:
        """Sets the dataset images baselines are drawn from.

        Args:
            references: normalized images [R, 3, H, W], R >= 1.
        """
        if (not isinstance(references, torch.Tensor) or references.dim() != 4 or references.shape[0] < 1
                or not references.is_floating_point()):
            raise ValueError(f"references: expected a float tensor [R, 3, H, W] of normalized images, got "
                             f"{getattr(references, 'shape', type(references).__name__)}")
        self.references = references.detach()

    def _explain(self, inputs, target):
        refs = self._references_like(inputs)
        gens = [torch.Generator().manual_seed(self.seed + i) for i in range(inputs.shape[0])]
        f_x = self.output(inputs, target)
        sums = torch.zeros_like(inputs)
        f_refs = torch.zeros(inputs.shape[0], dtype=torch.float64, device=inputs.device)
        counts = torch.zeros(inputs.shape[0], dtype=torch.long)
        todo, new = list(range(inputs.shape[0])), self.samples
        while todo:
            paths = [self._draw(gens[i], i, refs, new) for i in todo]
            sums[todo] += self._path_sums(inputs, target, paths)
            f_refs[todo] += self._reference_outputs(refs, paths, target)
            counts[todo] += new
            new = int(counts[todo[0]])  # doubling: as many new samples as the image already has
            todo = self._above(sums, f_x, f_refs, counts, todo) if 2 * new <= self.max_samples else []
        return self._explanation(sums, f_x, f_refs, counts)

    def _references_like(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.references is None:
            raise ValueError("references: expected_gradients needs dataset images to draw baselines from; "
                             "pass references=[R, 3, H, W] or call set_references first")
        if self.references.shape[1:] != inputs.shape[1:]:
            raise ValueError(f"references: expected images shaped like the inputs {tuple(inputs.shape[1:])}, "
                             f"got {tuple(self.references.shape[1:])}")
        return self.references.to(inputs.device, inputs.dtype)

    def _draw(self, gen: torch.Generator, image: int, refs: torch.Tensor, n: int) -> _Path:
        """The next `n` samples of an image; continuing the generator keeps earlier draws a prefix."""
        which = torch.randint(refs.shape[0], (n,), generator=gen).to(refs.device)
        alphas = torch.rand(n, generator=gen, dtype=torch.float64).to(refs.device, refs.dtype)
        return _Path(image, refs, which, alphas, torch.ones_like(alphas))

    def _reference_outputs(self, refs: torch.Tensor, paths: list[_Path], target: torch.Tensor) -> torch.Tensor:
        """sum_k f(r_k) per path, evaluating each distinct reference once: [P] float64."""
        used, where = torch.unique(torch.cat([p.which for p in paths]), return_inverse=True)
        logits = torch.cat(self.chunked(lambda a, b: self.model(refs[used[a:b]]).double(), used.numel()))
        where = where.split([len(p) for p in paths])
        return torch.stack([logits[w, target[p.image]].sum() for p, w in zip(paths, where)])

    def _above(self, sums, f_x, f_refs, counts, todo: list[int]) -> list[int]:
        err = completeness_error(sums[todo].flatten(1).sum(1) / counts[todo].to(sums),
                                 f_x[todo].double() - f_refs[todo] / counts[todo].to(f_refs))
        return [i for i, e in zip(todo, err.tolist()) if e > self.tolerance]

    def _explanation(self, sums, f_x, f_refs, counts) -> Explanation:
        maps = sums / counts.to(sums).view(-1, 1, 1, 1)
        delta = f_x.double() - f_refs / counts.to(f_refs)
        err = completeness_error(maps.flatten(1).sum(1), delta)
        info = {"completeness": err.float().cpu(), "steps": counts, "delta": delta.float().cpu()}
        return Explanation(maps, info)


class _Best:
    """The map with the smallest completeness error found so far for each image."""

    def __init__(self, inputs: torch.Tensor, delta: torch.Tensor):
        self.delta = delta
        self.maps = torch.zeros_like(inputs)
        self.err = torch.full((inputs.shape[0],), float("inf"), dtype=torch.float64)
        self.steps = torch.zeros(inputs.shape[0], dtype=torch.long)

    def update(self, images: list[int], maps: torch.Tensor, steps: int) -> None:
        err = completeness_error(maps.flatten(1).sum(1), self.delta[images]).cpu()
        for k, i in enumerate(images):
            if err[k] < self.err[i] or self.steps[i] == 0:
                self.maps[i], self.err[i], self.steps[i] = maps[k], err[k], steps

    def above(self, tolerance: float, images: list[int]) -> list[int]:
        return [i for i in images if self.err[i] > tolerance]

    def explanation(self) -> Explanation:
        return Explanation(self.maps, {"completeness": self.err.float(), "steps": self.steps.clone(),
                                       "delta": self.delta.float().cpu()})
