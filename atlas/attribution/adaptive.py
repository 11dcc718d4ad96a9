"""Adaptive path integration: a nested trapezoid rule refined where the integrand changes fastest.

Every point evaluated on a path x' + alpha (x - x') gives two things from the
same forward and backward pass: the gradient, the integrand of the map, and
the logit f. The logit makes the integral of the summed map over any stretch
[a, b] of the path known exactly, f(b) - f(a), so each interval of the rule
has an exact error for the summed map, not an estimate:

    e = (b - a) / 2 * (g(a) + g(b)) - (f(b) - f(a)),   g = sum of (x - x') * grad f,

and the path's completeness error is the sum of e over its intervals. A path
starts with a few equal intervals (both ends included: f(x) and f(x') come
with them); while its relative completeness error is above the tolerance, the
intervals with the largest |e| are halved, just enough of them for their
errors to cover the excess. Halving keeps every point already evaluated (the
rule is nested, where Gauss-Legendre starts over when its count changes), so
refinement goes where the integrand turns or jumps (on ReLU networks, the
stretch just off the baseline) and nowhere else. The new points of every path
still refining go through the model together, in shared chunks.

The rule's first point is not the baseline itself but a point just off it,
alpha = EDGE. A flat baseline such as black is the one input on the path
where every max-pool window and many rectifiers sit on ties, and the gradient
autograd picks there is one of many: on ResNet-50 it differs from its limit
just off the baseline by a third, and the trapezoid would weigh that single
point by half an interval. The stretch [0, EDGE] is taken as a rectangle at
EDGE, and f(x') comes from a forward pass (one per distinct baseline; a black
baseline is the same for every image), so every error above stays exact.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from atlas.attribution.base import layout

MIN_WIDTH = 2.0 ** -24  # intervals narrower than this are not halved (float32 alphas stop being distinct)
EDGE = 2.0 ** -10  # the first point, just off the baseline (see above)


@dataclass
class RefinedPath:
    """The evaluated points of one path, in order along it.

    Attributes:
        image: the path's image in the batch.
        start: its baseline [3, H, W].
        origin: f(x'), from a forward pass.
        alphas: the points, sorted, from EDGE to 1.
        values: f at each point.
        slopes: g at each point, the summed integrand sum((x - x') * grad f).
        grads: (x - x') * grad f at each point [3, H, W].
    """

    image: int
    start: torch.Tensor
    origin: float = float("nan")
    alphas: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    slopes: list[float] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)

    def add(self, alpha: float, value: float, slope: float, grad: torch.Tensor) -> None:
        k = bisect.bisect(self.alphas, alpha)
        for items, item in ((self.alphas, alpha), (self.values, value), (self.slopes, slope),
                            (self.grads, grad)):
            items.insert(k, item)

    @property
    def delta(self) -> float:
        """f(x) - f(x')."""
        return self.values[-1] - self.origin

    def errors(self) -> np.ndarray:
        """The signed error of the summed map on each interval between points [n - 1]."""
        a, f, g = (np.asarray(v, np.float64) for v in (self.alphas, self.values, self.slopes))
        return np.diff(a) / 2 * (g[:-1] + g[1:]) - np.diff(f)

    def edge_error(self) -> float:
        """The signed error of the summed map on [0, first point], a rectangle at the first point."""
        return self.alphas[0] * self.slopes[0] - (self.values[0] - self.origin)

    def midpoints(self, tolerance: float, budget: int) -> list[float]:
        """The midpoints of the intervals to halve next; none once the error is within tolerance.

        Intervals go in order of |error| until their errors cover the excess over
        the tolerance, at most `budget` of them.
        """
        e = self.errors()
        excess = abs(e.sum() + self.edge_error()) - tolerance * abs(self.delta)
        picked, covered = [], 0.0
        for k in np.argsort(-np.abs(e), kind="stable"):
            if excess <= covered or len(picked) >= budget:
                break
            a, b = self.alphas[k], self.alphas[k + 1]
            if b - a > MIN_WIDTH:
                picked.append((a + b) / 2)
                covered += abs(e[k])
        return picked

    def integral(self) -> torch.Tensor:
        """The trapezoid rule over the points, and the rectangle before them: the path's map [3, H, W]."""
        a = np.asarray(self.alphas, np.float64)
        weights = np.zeros_like(a)
        weights[0] += a[0]
        weights[:-1] += np.diff(a) / 2
        weights[1:] += np.diff(a) / 2
        total = torch.zeros_like(self.grads[0])
        for w, grad in zip(weights.tolist(), self.grads):
            total += w * grad
        return total


def refine(method, inputs: torch.Tensor, target: torch.Tensor, paths: list[RefinedPath], start: int,
           tolerance: float, max_points: int) -> int:
    """Evaluates the paths' points until each is within tolerance or has `max_points`.

    Args:
        method: the attribution method whose model and chunking evaluate the rows.
        inputs: the batch [B, 3, H, W].
        target: one class per image [B].
        paths: fresh paths (no points yet), each with its image and baseline.
        start: equal intervals every path begins with (start + 1 points, the first at EDGE).
        tolerance: relative completeness error each path stops at.
        max_points: the most points a path may have.

    Returns:
        The number of rounds of points evaluated.
    """
    _origins(method, inputs, target, paths)
    first = np.linspace(0, 1, min(start, max_points - 1) + 1)
    first[0] = EDGE
    todo = [(p, a) for p in paths for a in first.tolist()]
    rounds = 0
    while todo:
        _evaluate(method, inputs, target, todo)
        rounds += 1
        todo = [(p, a) for p in paths for a in p.midpoints(tolerance, max_points - len(p.alphas))]
    return rounds


def _origins(method, inputs: torch.Tensor, target: torch.Tensor, paths: list[RefinedPath]) -> None:
    """Sets f(x') of every path, one forward row per distinct baseline, in the rows' own precision."""
    distinct: list[torch.Tensor] = []
    which = []
    for p in paths:
        k = next((k for k, s in enumerate(distinct) if s is p.start or torch.equal(s, p.start)), len(distinct))
        if k == len(distinct):
            distinct.append(p.start)
        which.append(k)
    rows = torch.stack(distinct).contiguous(memory_format=layout(inputs))

    def run(a: int, b: int) -> torch.Tensor:
        with torch.no_grad():
            return method.model(rows[a:b])
    logits = torch.cat(method.chunked(run, rows.shape[0]))
    for p, k in zip(paths, which):
        p.origin = float(logits[k, target[p.image]])


def _evaluate(method, inputs: torch.Tensor, target: torch.Tensor, todo: list[tuple[RefinedPath, float]]) -> None:
    """Adds the points `todo` (path, alpha) to their paths, in chunks of the method's batch."""
    def run(a: int, b: int) -> list[tuple]:
        part = todo[a:b]
        x = inputs[[p.image for p, _ in part]]
        s = torch.stack([p.start for p, _ in part])
        alphas = x.new_tensor([alpha for _, alpha in part]).view(-1, 1, 1, 1)
        direction = x - s
        rows = (s + alphas * direction).contiguous(memory_format=layout(inputs))
        grads, values = _grad_and_value(method.model, rows, target[[p.image for p, _ in part]])
        grads = grads * direction
        slopes = grads.flatten(1).double().sum(1)
        return list(zip(grads, values.tolist(), slopes.tolist()))

    found = [row for rows in method.chunked(run, len(todo)) for row in rows]
    # Added only once every chunk succeeded: a chunk retried after out-of-memory must not count twice.
    for (path, alpha), (grad, value, slope) in zip(todo, found):
        path.add(alpha, value, slope, grad)


def _grad_and_value(model, rows: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of each row's target logit and the logit itself, in the rows' own precision
    (the intervals' errors are differences of nearby logits)."""
    rows = rows.detach().requires_grad_(True)
    with torch.enable_grad():
        picked = model(rows).gather(1, target[:, None])[:, 0]
        (grads,) = torch.autograd.grad(picked.sum(), rows)
    return grads, picked.detach()
