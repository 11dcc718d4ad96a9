"""Path methods (Integrated Gradients, Expected Gradients) and the Distill baselines."""

import pytest
import torch
from torch import nn

from atlas.attribution import baselines as B
from atlas.attribution.base import InputSpace
from atlas.attribution.paths import ExpectedGradients, IntegratedGradients, completeness_error, gauss_legendre, points

# ImageNet normalization: black and white differ per channel, so a baseline
# computed in pixels instead of inputs would be caught.
SPACE = InputSpace(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
NO_STEPS_ADDED = 1e9  # a tolerance no map exceeds


def pixels(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def linear_model(size: int = 4) -> nn.Module:
    """logit c = sum_i w[c, i] x_i + b_c, with weights set by hand."""
    d = 3 * size * size
    linear = nn.Linear(d, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.linspace(-1, 1, 3 * d).view(3, d))
        linear.bias.copy_(torch.tensor([0.5, -0.25, 0.0]))
    return nn.Sequential(nn.Flatten(), linear).eval()


@pytest.fixture(scope="module")
def case(convnet):
    """The tiny convnet, its input space, three images and the classes it predicts for them."""
    from atlas import models
    space = InputSpace.of(models.load("atlas:tiny_convnet").preprocess)
    x = space.from_pixels(pixels(3, size=32, seed=1))
    model = convnet.eval()
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, space, x, target


# --- quadrature ---

@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_gauss_legendre_is_exact_to_degree_2n_minus_1(n):
    alphas, weights = gauss_legendre(n)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-14)
    assert ((alphas > 0) & (alphas < 1)).all()
    for degree in range(2 * n):
        assert (weights * alphas ** degree).sum().item() == pytest.approx(1 / (degree + 1), abs=1e-13)
    if n <= 5:  # degree 2n is not exact (for larger n the error is below float precision)
        assert (weights * alphas ** (2 * n)).sum().item() != pytest.approx(1 / (2 * n + 1), abs=1e-13)


def test_riemann_rules():
    alphas, weights = points(5, "riemann_trapezoid")
    assert alphas.tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert weights.tolist() == [0.125, 0.25, 0.25, 0.25, 0.125]
    alphas, weights = points(4, "riemann_middle")
    assert alphas.tolist() == [0.125, 0.375, 0.625, 0.875]
    assert weights.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rule"):
        points(4, "simpson")


def test_completeness_error_at_zero_delta():
    err = completeness_error(torch.tensor([0.0, 1.0, 1.1]), torch.tensor([0.0, 0.0, 1.0]))
    assert err[0] == 0 and err[1] == float("inf") and err[2].item() == pytest.approx(0.1)


# --- baselines ---

def baseline(name: str, x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    return B.BASELINES[name](x, SPACE, torch.Generator().manual_seed(seed))


def in_range(b: torch.Tensor) -> bool:
    eps = 1e-6
    return bool(((b >= SPACE.lo(b) - eps) & (b <= SPACE.hi(b) + eps)).all())


def test_black_is_pixel_zero():
    x = SPACE.from_pixels(pixels(2))
    assert torch.equal(baseline("black", x), SPACE.lo(x).expand_as(x))
    assert torch.allclose(SPACE.to_pixels(baseline("black", x)), torch.zeros_like(x), atol=1e-6)


def test_max_distance_is_farthest_valid_image():
    x = SPACE.from_pixels(pixels(2))
    far = baseline("max_distance", x)
    assert in_range(far)

    def l1(b):
        return (x - b).abs().flatten(1).sum(1)

    lo, hi = SPACE.lo(x), SPACE.hi(x)
    assert torch.allclose(l1(far), torch.maximum(x - lo, hi - x).flatten(1).sum(1))
    others = [lo.expand_as(x), hi.expand_as(x), baseline("uniform", x)]
    others += [SPACE.from_pixels(pixels(2, seed=s)) for s in range(100, 200)]
    for other in others:
        assert (l1(far) >= l1(other) - 1e-4).all()


def test_blurred_keeps_means_and_removes_detail():
    x = SPACE.from_pixels(pixels(2, size=32))
    blur = baseline("blurred", x)
    assert blur.shape == x.shape and in_range(blur)
    assert torch.allclose(blur.mean((2, 3)), x.mean((2, 3)), atol=0.02 * SPACE.range(x).max().item())

    def tv(img):
        return (img.diff(dim=2).abs().sum() + img.diff(dim=3).abs().sum()).item()

    assert tv(blur) < 0.2 * tv(x)
    constant = SPACE.from_pixels(torch.full((1, 3, 32, 32), 0.3))
    assert torch.allclose(baseline("blurred", constant), constant, atol=1e-5)


def test_blur_sigma_scales_with_the_image():
    assert B.blur_sigma(torch.zeros(1, 3, 224, 224)) == B.BLUR_SIGMA_PX
    assert B.blur_sigma(torch.zeros(1, 3, 112, 300)) == B.BLUR_SIGMA_PX / 2


def test_uniform_covers_the_range():
    x = SPACE.from_pixels(pixels(4, size=32))
    u = baseline("uniform", x)
    assert in_range(u)
    midpoint = (SPACE.lo(x) + SPACE.hi(x)) / 2
    assert torch.allclose(u.mean((0, 2, 3), keepdim=True), midpoint, atol=0.02 * SPACE.range(x).max().item())


def test_gaussian_stays_near_the_image():
    x = SPACE.from_pixels(pixels(4, size=32))
    noisy = baseline("gaussian", x)
    assert in_range(noisy) and not torch.equal(noisy, x)
    assert (noisy - x).abs().mean() < (baseline("uniform", x) - x).abs().mean()


@pytest.mark.parametrize("name", sorted(B.RANDOM_BASELINES))
def test_random_baselines_follow_the_generator(name):
    x = SPACE.from_pixels(pixels(2))
    assert torch.equal(baseline(name, x, seed=3), baseline(name, x, seed=3))
    assert not torch.equal(baseline(name, x, seed=3), baseline(name, x, seed=4))


# --- Integrated Gradients ---

@pytest.mark.parametrize("rule", ["gauss_legendre", "riemann_trapezoid", "riemann_middle"])
def test_ig_of_a_linear_model_is_exact(rule):
    model, x = linear_model(), SPACE.from_pixels(pixels(2, size=4))
    target = torch.tensor([0, 2])
    explained = IntegratedGradients(model, SPACE, steps=3, rule=rule).explain(x, target)
    w = model[1].weight[target].view_as(x)
    assert torch.allclose(explained.maps, (x - SPACE.lo(x)) * w, atol=1e-6)
    assert (explained.info["completeness"] < 1e-5).all() and explained.info["steps"].tolist() == [3, 3]


def test_ig_averages_random_baselines_on_a_linear_model():
    model, x = linear_model(), SPACE.from_pixels(pixels(2, size=4))
    method = IntegratedGradients(model, SPACE, steps=2, baseline="uniform", draws=4)
    maps = method.attribute(x, 1)
    for i in range(2):
        draws = method.baselines_for(x, i)
        assert draws.shape == (4, *x.shape[1:]) and not torch.equal(draws[0], draws[1])
        assert torch.allclose(maps[i], (x[i] - draws.mean(0)) * model[1].weight[1].view_as(x[i]), atol=1e-6)


def reference_ig(model, x, t, start, steps):
    """IG from one baseline by hand, with autograd: the sum over Gauss-Legendre points."""
    alphas, weights = gauss_legendre(steps)
    rows = (start + alphas.float().view(-1, 1, 1, 1) * (x - start)).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(rows)[:, t].sum(), rows)
    return (x - start) * (weights.float().view(-1, 1, 1, 1) * grad).sum(0)


def test_ig_map_is_the_mean_over_draws(case):
    model, space, x, target = case
    method = IntegratedGradients(model, space, steps=8, baseline="gaussian", draws=4, tolerance=NO_STEPS_ADDED)
    maps = method.attribute(x[:1], target[:1])
    draws = method.baselines_for(x[:1], 0)
    expected = torch.stack([reference_ig(model, x[0], target[0], d, 8) for d in draws]).mean(0)
    assert torch.allclose(maps[0], expected, atol=1e-6)


def test_ig_completeness_on_tiny_convnet(case):
    model, space, x, target = case
    explained = IntegratedGradients(model, space, steps=50).explain(x, target)
    assert (explained.info["completeness"] < 0.01).all()
    delta = explained.info["delta"]
    assert torch.allclose(explained.maps.flatten(1).sum(1), delta, rtol=0.01)
    with torch.no_grad():
        expected = model(x)[range(3), target] - model(space.lo(x).expand_as(x))[range(3), target]
    assert torch.allclose(delta, expected, atol=1e-5)


def test_ig_adds_steps_until_complete(case):
    model, space, x, target = case
    explained = IntegratedGradients(model, space, steps=2, tolerance=0.01).explain(x, target)
    assert explained.info["steps"].max() > 2
    assert (explained.info["completeness"] <= 0.01).all()


def test_ig_keeps_the_best_map_when_steps_run_out(case):
    model, space, x, target = case
    explained = IntegratedGradients(model, space, steps=1, tolerance=0.0, max_steps=4).explain(x, target)
    fixed = {n: IntegratedGradients(model, space, steps=n, tolerance=NO_STEPS_ADDED).explain(x, target)
             for n in (1, 2, 4)}
    for i in range(3):
        best = min(fixed, key=lambda n: fixed[n].info["completeness"][i].item())
        assert explained.info["steps"][i].item() == best
        assert torch.allclose(explained.maps[i], fixed[best].maps[i], atol=1e-6)
        error = fixed[best].info["completeness"][i].item()
        assert explained.info["completeness"][i].item() == pytest.approx(error)


def test_ig_does_not_depend_on_batching(case):
    model, space, x, target = case
    method = IntegratedGradients(model, space, steps=10, tolerance=NO_STEPS_ADDED)
    together = method.attribute(x[:2], target[:2])
    for i in range(2):
        alone = method.attribute(x[i:i + 1], target[i:i + 1])
        assert torch.allclose(together[i], alone[0], atol=1e-6)
    # Random baselines: image i of a batch draws from seed + i.
    settings = dict(steps=6, baseline="uniform", draws=2, tolerance=NO_STEPS_ADDED)
    pair = IntegratedGradients(model, space, **settings).attribute(x[:2], target[:2])
    second = IntegratedGradients(model, space, seed=1, **settings).attribute(x[1:2], target[1:2])
    assert torch.allclose(pair[1], second[0], atol=1e-6)


def test_ig_small_batches_give_the_same_maps(case):
    model, space, x, target = case
    settings = dict(steps=5, baseline="uniform", draws=3, tolerance=NO_STEPS_ADDED)
    large = IntegratedGradients(model, space, batch=64, **settings).attribute(x, target)
    small = IntegratedGradients(model, space, batch=3, **settings).attribute(x, target)
    assert torch.allclose(large, small, atol=1e-6)


class MemoryLimited(nn.Module):
    """Raises out-of-memory for a pass of more than `rows` rows, as a small GPU would."""

    def __init__(self, model: nn.Module, rows: int):
        super().__init__()
        self.model, self.rows, self.refused = model, rows, 0

    def forward(self, x):
        if x.shape[0] > self.rows:
            self.refused += 1
            raise torch.OutOfMemoryError(f"out of memory: {x.shape[0]} rows")
        return self.model(x)


def test_ig_halves_its_batch_on_out_of_memory(case):
    model, space, x, target = case
    expected = IntegratedGradients(model, space, steps=12, tolerance=NO_STEPS_ADDED).attribute(x, target)
    limited = MemoryLimited(model, rows=5)
    method = IntegratedGradients(limited, space, batch=64, steps=12, tolerance=NO_STEPS_ADDED)
    assert torch.allclose(method.attribute(x, target), expected, atol=1e-6)
    assert limited.refused > 0 and method.batch <= 5


def test_ig_names_and_checks_its_settings(case):
    model, space, _, _ = case
    assert IntegratedGradients(model, space).name == "integrated_gradients"
    blurred = IntegratedGradients(model, space, baseline="blurred", draws=8)
    assert blurred.name == "ig_blurred" and blurred.draws == 1
    assert blurred.params["baseline"] == "blurred" and blurred.params["steps"] == 50
    assert IntegratedGradients(model, space, baseline="uniform", draws=8).params["draws"] == 8
    with pytest.raises(ValueError, match="baseline"):
        IntegratedGradients(model, space, baseline="white noise")
    with pytest.raises(ValueError, match="rule"):
        IntegratedGradients(model, space, rule="simpson")
    with pytest.raises(ValueError, match="max_steps"):
        IntegratedGradients(model, space, steps=50, max_steps=10)


def test_ig_agrees_with_captum(case):
    captum_attr = pytest.importorskip("captum.attr")
    model, space, x, target = case
    black = space.lo(x).expand_as(x).contiguous()
    theirs = captum_attr.IntegratedGradients(model).attribute(x, baselines=black, target=target, n_steps=50,
                                                               method="gausslegendre")
    ours = IntegratedGradients(model, space, steps=50, tolerance=NO_STEPS_ADDED).attribute(x, target)
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4


# --- Expected Gradients ---

def dark_references(space: InputSpace, n: int = 4) -> torch.Tensor:
    """Flat dark images: far from the inputs, so f(x) - f(r) is large and the error well defined."""
    colours = 0.2 * torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(5))
    return space.from_pixels(colours.expand(n, 3, 32, 32))


def test_eg_needs_references(case):
    model, space, x, target = case
    with pytest.raises(ValueError, match="references"):
        ExpectedGradients(model, space).attribute(x, target)
    with pytest.raises(ValueError, match="references"):
        ExpectedGradients(model, space, references=x[:, :, :16]).attribute(x, target)
    with pytest.raises(ValueError, match="references"):
        ExpectedGradients(model, space).set_references(x[0])


def test_eg_of_a_linear_model_with_one_reference_is_exact():
    model, x = linear_model(), SPACE.from_pixels(pixels(2, size=4))
    reference = SPACE.from_pixels(pixels(1, size=4, seed=9))
    explained = ExpectedGradients(model, SPACE, samples=3, references=reference).explain(x, 2)
    assert torch.allclose(explained.maps, (x - reference) * model[1].weight[2].view_as(x[0]), atol=1e-6)
    assert (explained.info["completeness"] < 1e-5).all() and explained.info["steps"].tolist() == [3, 3]


def test_eg_completeness_with_enough_samples(case):
    model, space, x, target = case
    method = ExpectedGradients(model, space, samples=50, references=dark_references(space),
                               tolerance=0.05, max_samples=800)
    explained = method.explain(x, target)
    assert explained.maps.shape == x.shape and method.name == "expected_gradients"
    assert explained.info["steps"].shape == (3,) and explained.info["delta"].shape == (3,)
    assert (explained.info["completeness"] <= 0.05).all()
    recomputed = completeness_error(explained.maps.flatten(1).sum(1), explained.info["delta"])
    assert torch.allclose(explained.info["completeness"], recomputed.float(), rtol=1e-3, atol=1e-6)


def test_eg_does_not_depend_on_batching(case):
    model, space, x, target = case
    settings = dict(samples=10, references=dark_references(space), tolerance=NO_STEPS_ADDED)
    large = ExpectedGradients(model, space, batch=64, **settings).attribute(x, target)
    small = ExpectedGradients(model, space, batch=3, **settings).attribute(x, target)
    assert torch.allclose(large, small, atol=1e-6)
    second = ExpectedGradients(model, space, seed=1, **settings).attribute(x[1:2], target[1:2])
    assert torch.allclose(large[1], second[0], atol=1e-6)


def reference_eg(model, x, t, refs, which, alphas):
    """EG of one image by hand: mean_k (x - r_k) grad f(r_k + a_k (x - r_k))."""
    starts = refs[which]
    rows = (starts + alphas.float().view(-1, 1, 1, 1) * (x - starts)).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(rows)[:, t].sum(), rows)
    with torch.no_grad():
        delta = model(x[None])[0, t] - model(starts)[:, t].mean()
    return ((x - starts) * grad).mean(0), delta


def test_eg_doubling_keeps_the_first_samples(case):
    """Each round draws n reference indices, then n alphas, from the image's generator."""
    model, space, x, target = case
    refs = dark_references(space)
    settings = dict(references=refs, samples=10, max_samples=20, seed=4)
    x, t = x[:1], target[:1]
    once = ExpectedGradients(model, space, tolerance=NO_STEPS_ADDED, **settings).explain(x, t)
    twice = ExpectedGradients(model, space, tolerance=0.0, **settings).explain(x, t)
    assert once.info["steps"].tolist() == [10] and twice.info["steps"].tolist() == [20]
    gen = torch.Generator().manual_seed(4)
    rounds = [(torch.randint(4, (10,), generator=gen), torch.rand(10, generator=gen, dtype=torch.float64))
              for _ in range(2)]
    for explained, drawn in [(once, rounds[:1]), (twice, rounds)]:
        which, alphas = torch.cat([w for w, _ in drawn]), torch.cat([a for _, a in drawn])
        expected, delta = reference_eg(model, x[0], t[0], refs, which, alphas)
        assert torch.allclose(explained.maps[0], expected, atol=1e-6)
        assert explained.info["delta"][0].item() == pytest.approx(delta.item(), abs=1e-5)
