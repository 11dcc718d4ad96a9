"""Adaptive Integrated Gradients (nested rule refined per path) and SmoothGrad's stopping rule."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atlas.attribution.base import InputSpace
from atlas.attribution.gradients import SmoothGrad
from atlas.attribution.paths import IntegratedGradients

# black is -1 and white +1 in this space, so the straight path from black crosses 0 inside (0, 1)
SPACE = InputSpace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
SHARPNESS = 40.0


class SoftplusSum(nn.Module):
    """logit 0 = sum_i w_i softplus(k x_i) / k, logit 1 its negative: hand-set, with a closed-form IG.

    Along the path x' + a (x - x') coordinate i contributes w_i sigmoid(k (x'_i + a d_i)) d_i, so its
    exact attribution is w_i (softplus(k x_i) - softplus(k x'_i)) / k. With every pixel crossing 0 near
    the same place the summed integrand is a steep step there: hard for equally spaced or Gauss points.
    """

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("w", weights)

    def forward(self, x):
        score = (self.w * F.softplus(SHARPNESS * x) / SHARPNESS).flatten(1).sum(1)
        return torch.stack([score, -score], 1)

    def exact(self, x: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        return self.w * (F.softplus(SHARPNESS * x) - F.softplus(SHARPNESS * baseline)) / SHARPNESS


class RowCounter:
    """Counts the rows every forward pass of a model sees."""

    def __init__(self, model: nn.Module):
        self.rows = 0
        model.register_forward_hook(self._count)

    def _count(self, module, args, out):
        self.rows += args[0].shape[0]


@pytest.fixture
def case():
    gen = torch.Generator().manual_seed(0)
    weights = (1 + torch.rand(1, 3, 6, 6, generator=gen, dtype=torch.float64))
    model = SoftplusSum(weights).eval()
    # pixels around 0.7 (inputs around 0.4) cross the model's kink at alpha of about 0.7 on the path from black
    x = SPACE.from_pixels(0.68 + 0.04 * torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64))
    return model, x


def _relative(maps: torch.Tensor, exact: torch.Tensor) -> float:
    return float((maps - exact).flatten(1).sum(1).abs().max() / exact.flatten(1).sum(1).abs().min())


def test_adaptive_ig_reaches_the_tolerance_on_a_closed_form_integral(case):
    model, x = case
    exact = model.exact(x, SPACE.lo(x))
    ig = IntegratedGradients(model, SPACE, batch=16, rule="adaptive", tolerance=1e-4, max_steps=400)
    found = ig.explain(x, 0)
    assert found.info["completeness"].max() <= 1e-4
    assert _relative(found.maps, exact) <= 1e-4  # the true error of the summed map
    # pixel by pixel the map is close too (completeness bounds only the sum: errors may cancel)
    assert float((found.maps - exact).abs().max() / exact.abs().max()) < 5e-3
    assert (found.info["evaluations"] == found.info["steps"]).all()  # one baseline per image


def test_adaptive_ig_needs_fewer_evaluations_than_a_fixed_rule(case):
    model, x = case
    exact = model.exact(x, SPACE.lo(x))
    adaptive = IntegratedGradients(model, SPACE, batch=16, rule="adaptive", tolerance=1e-3).explain(x, 0)
    used = int(adaptive.info["evaluations"].max())
    fixed_needs = next(n for n in range(2, 400) if _relative(
        IntegratedGradients(model, SPACE, batch=64, steps=n, tolerance=float("inf")).attribute(x, 0), exact) <= 1e-3)
    assert used < fixed_needs / 2, (used, fixed_needs)


def test_adaptive_ig_reuses_every_point(case):
    model, x = case
    counter = RowCounter(model)
    ig = IntegratedGradients(model, SPACE, batch=7, rule="adaptive", tolerance=1e-4, start=4)
    found = ig.explain(x, 0)
    # nothing evaluated twice; f(x') takes one forward row, shared by both images' black baseline
    assert counter.rows == int(found.info["evaluations"].sum()) + 1
    assert (found.info["evaluations"] > 5).all()


def test_adaptive_ig_stops_at_its_first_points_where_they_are_exact():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double().eval()
    x = SPACE.from_pixels(torch.rand(3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    found = IntegratedGradients(linear, SPACE, rule="adaptive", tolerance=1e-9, start=2).explain(x, 1)
    assert found.info["evaluations"].tolist() == [3, 3, 3]
    expected = (x - SPACE.lo(x)) * linear[1].weight[1].view(1, 3, 4, 4)
    torch.testing.assert_close(found.maps, expected, rtol=1e-9, atol=1e-12)


def test_adaptive_ig_does_not_weigh_the_tie_at_a_flat_baseline():
    # On the black image every max-pool window is a tie and autograd sends the gradient to its first pixel;
    # anywhere else on the path the window's brightest pixel wins. The rule starts just off the baseline.
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 2)).double().eval()
    x = SPACE.from_pixels(torch.rand(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    found = IntegratedGradients(model, SPACE, rule="adaptive", tolerance=1e-9, start=2).explain(x, 0)
    d = x - SPACE.lo(x)
    winner = F.max_unpool2d(*F.max_pool2d(d, 2, return_indices=True), 2) != 0
    expected = winner * d * F.interpolate(model[2].weight[0].view(1, 3, 2, 2), scale_factor=2)
    assert found.info["evaluations"].tolist() == [3, 3]  # f is linear on (0, 1]: the first points are exact
    torch.testing.assert_close(found.maps, expected, rtol=1e-6, atol=1e-9)  # the rectangle at EDGE is exact too
    assert found.info["completeness"].max() < 1e-9


def test_adaptive_ig_keeps_its_point_limit(case):
    model, x = case
    found = IntegratedGradients(model, SPACE, rule="adaptive", tolerance=0.0, max_steps=12).explain(x, 0)
    assert found.info["evaluations"].tolist() == [12, 12]
    assert (found.info["completeness"] > 0).all()


def test_adaptive_ig_random_baselines_average_their_paths(case):
    model, x = case
    ig = IntegratedGradients(model, SPACE, batch=16, baseline="uniform", draws=3, rule="adaptive", tolerance=1e-3)
    found = ig.explain(x, 0)
    exact = torch.stack([model.exact(x[i], ig.baselines_for(x, i)).mean(0) for i in range(2)])
    assert _relative(found.maps, exact) <= 2e-3
    assert (found.info["evaluations"] >= 3 * 3).all()


class Cubic(nn.Module):
    """logit 0 = sum x^3 / 3: its gradient x^2 under noise e has the even part e^2 that antithetic pairs keep."""

    def forward(self, x):
        score = (x ** 3 / 3).flatten(1).sum(1)
        return torch.stack([score, -score], 1)


class Square(nn.Module):
    """logit 0 = sum x^2 / 2: its gradient x + e is odd in the noise, so each antithetic pair is exact."""

    def forward(self, x):
        score = (x ** 2 / 2).flatten(1).sum(1)
        return torch.stack([score, -score], 1)


def test_smoothgrad_stops_early_on_a_smooth_model():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    found = SmoothGrad(Square(), batch=32, samples=50, adaptive=True).explain(x, 0)
    assert found.info["samples"].tolist() == [SmoothGrad.MIN_SAMPLES] * 2
    torch.testing.assert_close(found.maps, x, rtol=1e-5, atol=1e-5)  # the pairs cancel the noise exactly


def test_smoothgrad_keeps_drawing_on_a_noisy_model():
    x = torch.zeros(2, 3, 8, 8)
    found = SmoothGrad(Cubic(), batch=32, samples=24, adaptive=True, max_samples=200).explain(x, 0)
    # pair means of e^2 vary like single draws: a pair is worth one plain draw, so about 2 x 24 draws
    assert (found.info["samples"] >= 40).all() and (found.info["samples"] <= 64).all()


def test_smoothgrad_adaptive_stops_at_its_limit_and_keeps_the_fixed_rule():
    x = torch.zeros(1, 3, 8, 8)
    capped = SmoothGrad(Cubic(), samples=50, adaptive=True, max_samples=20).explain(x, 0)
    assert capped.info["samples"].tolist() == [20]
    fixed = SmoothGrad(Cubic(), samples=7).explain(x, 0)
    assert fixed.info["samples"].tolist() == [7]
