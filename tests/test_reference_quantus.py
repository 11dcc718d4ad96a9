"""Atlas's checks against Quantus 0.6.0 (a test dependency): equal where the definitions coincide, and
each difference pinned where Atlas chooses otherwise (docs/references.md lists both)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from atlas.attribution import methods
from atlas.attribution.checks import ablation
from atlas.attribution.checks import sanity
from atlas.attribution.checks.similarity import spearman, ssim
from atlas.bench.references_quantus import Explainer, pixel_flipping

quantus = pytest.importorskip("quantus")
SIZE = 12  # image side: 144 pixels, 432 colour values
TOL = 1e-3  # the bound; the shared metrics agree to about 1e-7


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _pattern(shape, phase: float, scale: float) -> torch.Tensor:
    k = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    return scale * torch.cos(1.7 * k + phase)


class Conv(nn.Conv2d):
    """A convolution whose re-initialization draws nothing: a fixed pattern replaces its weights.

    So Atlas's and Quantus's randomized copies are the same network, whichever seeds each tool uses.
    """

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.copy_(_pattern(self.weight.shape, 0.5, self.weight[0].numel() ** -0.5))
            self.bias.copy_(_pattern(self.bias.shape, 2.0, 0.1))


class Linear(nn.Linear):
    """A linear layer re-initialized to a fixed pattern, like `Conv`."""

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.copy_(_pattern(self.weight.shape, 1.0, self.in_features ** -0.5))
            self.bias.zero_()


class Probe(nn.Module):
    """conv -> BatchNorm -> ReLU -> conv -> ReLU -> mean -> linear, 5 classes, weights set by formulas."""

    def __init__(self):
        super().__init__()
        self.conv1 = Conv(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = Conv(4, 6, 3, padding=1)
        self.fc = Linear(6, 5)
        with torch.no_grad():  # the "trained" weights, unlike the re-initialized pattern
            for i, p in enumerate(self.parameters()):
                p.copy_(_pattern(p.shape, 0.3 * i, 0.6) + 0.05 * i)
            self.bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.3, 0.0]))
            self.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 1.5]))
        self.eval()

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def gradient(model: nn.Module):
    return methods.get("gradient", model)


@pytest.fixture(scope="module")
def probe():
    """(model, images [3, 3, 12, 12], top-1 classes, Atlas's ranking map |gradient| summed over colour)."""
    model = Probe()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, gradient(model).attribute(x, y).abs().sum(1)


def _flip(metric, model, x, y, a_batch):
    return np.asarray(metric(model, x.numpy(), y.numpy(), a_batch=a_batch, device="cpu"), np.float64)


# --- where the definitions coincide ---

@pytest.mark.parametrize("replacement", ablation.REPLACEMENTS)
def test_deletion_is_quantus_pixel_flipping(probe, replacement):
    """Softmax probabilities (RISE's, Quantus's default), Atlas's order and replacement, whole pixels."""
    model, x, y, order = probe
    ours = ablation.ablation_curves(model, x, y, order, points=13, replacement=replacement)
    theirs = pixel_flipping(quantus, model, x, y, order, points=13, replacement=replacement)
    assert theirs.shape == (3, 12)
    np.testing.assert_allclose(ours[:, 1:], theirs, atol=TOL, rtol=0)
    assert np.ptp(ours) > 0.05  # the curves move: agreeing on them means something


def test_deletion_one_pixel_a_step_is_selectivity_and_region_perturbation(probe):
    model, x, _, _ = probe
    x = x[:2, :, :8, :8]  # 64 steps, each a forward pass in both tools
    with torch.no_grad():
        y = model(x).argmax(1)
    order = gradient(model).attribute(x, y).abs().sum(1)
    ours = ablation.ablation_curves(model, x, y, order, points=65)
    a = order[:, None].numpy()
    selectivity = quantus.Selectivity(patch_size=1, perturb_baseline=0.0, normalise=False, disable_warnings=True)
    np.testing.assert_allclose(ours[:, 1:], _flip(selectivity, model, x, y, a), atol=TOL, rtol=0)
    region = quantus.RegionPerturbation(patch_size=1, regions_evaluation=64, perturb_baseline=0.0,
                                        normalise=False, disable_warnings=True)
    # region perturbation records the drop from the intact image's probability
    np.testing.assert_allclose(ours[:, :1] - ours[:, 1:], _flip(region, model, x, y, a), atol=TOL, rtol=0)


@pytest.mark.parametrize("absolute, score", [(True, "spearman_abs"), (False, "spearman")])
def test_random_logit_matches_for_the_same_class(probe, monkeypatch, absolute, score):
    model, x, y, _ = probe
    explain = Explainer(gradient)
    metric = quantus.RandomLogit(num_classes=5, similarity_func=quantus.similarity_func.correlation_spearman,
                                 abs=absolute, normalise=False, disable_warnings=True)
    theirs = metric(model, x.numpy(), y.numpy(), a_batch=explain(model, x.numpy(), y.numpy()),
                    explain_func=explain, device="cpu")
    drawn = explain.targets[-1]
    monkeypatch.setattr(sanity, "other_classes", lambda target, n, seed=0: drawn)
    ours = sanity.random_logit(gradient(model), x, y, 5)
    assert (ours["target"] == drawn).all() and (drawn != y.numpy()).all()
    np.testing.assert_allclose(ours[score], theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("absolute, score", [(True, "spearman_abs"), (False, "spearman")])
def test_randomization_is_mprt_one_layer_a_group(probe, absolute, score):
    """Cascading from the top and independent, BatchNorm reset whole (scale 1, shift 0, statistics 0 and 1)."""
    model, x, y, _ = probe
    groups = sanity.parameter_groups(model, x[:1], count=4)
    assert [names for _, names in groups] == [["fc"], ["conv2"], ["bn"], ["conv1"]]
    ours = sanity.randomization(gradient, model, x, y, groups)
    for order, mode, flip in (("top_down", "cascading", 1), ("independent", "independent", -1)):
        metric = quantus.MPRT(similarity_func=quantus.similarity_func.correlation_spearman, layer_order=order,
                              abs=absolute, normalise=False, disable_warnings=True)
        result = metric(model, x.numpy(), y.numpy(), a_batch=None, explain_func=Explainer(gradient), device="cpu")
        layers = [k for k in result if k != "original"][::flip]  # Quantus's independent order is bottom-up
        assert layers == ["fc", "conv2", "bn", "conv1"]
        np.testing.assert_allclose(ours[mode][score], [result[k] for k in layers], atol=TOL, rtol=0)
    assert ours["cascading"]["spearman_abs"][-1].mean() < 0.9  # the maps changed


# --- where Atlas chooses differently: each difference, pinned ---

def test_quantus_auc_counts_steps_from_the_first_and_atlas_fractions_from_the_intact_image(probe, monkeypatch):
    """Quantus 0.6.0's AUC is the trapezoid over its curve, one unit a step, starting after the first step;
    Atlas's is over the fraction removed, 0 to 1, starting at the intact image. (Quantus calls np.trapz,
    which NumPy 2.4 removed: the test lends it np.trapezoid.)"""
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    model, x, y, order = probe
    # 12 colour values a step = 4 whole pixels: 36 steps, the same points as Atlas's 37
    metric = quantus.PixelFlipping(features_in_step=12, perturb_baseline=0.0, normalise=False,
                                   return_auc_per_sample=True, disable_warnings=True)
    theirs = _flip(metric, model, x, y, order[:, None].numpy())
    curves = ablation.ablation_curves(model, x, y, order, points=37)
    ours = ablation.auc(curves, ablation.fractions(37))
    np.testing.assert_allclose(36 * ours, theirs + (curves[:, 0] + curves[:, 1]) / 2, atol=1e-5, rtol=0)
    assert np.abs(36 * ours - theirs).min() > 0.01


def test_quantus_ranks_colour_values_and_its_abs_takes_the_colour_sum(probe):
    """Atlas removes a pixel with all its colours, ranked by |map| summed over colour for a sign-free method.

    Quantus flips single colour values: given the 3-channel |map| it ranks each colour of a pixel on its own;
    given the colour-summed signed map with abs=True, it ranks by |sum| instead of the sum of |map|. Both
    change the curve; fed Atlas's ranking map, it agrees (test_deletion_is_quantus_pixel_flipping).
    """
    model, x, y, order = probe
    maps = gradient(model).attribute(x, y)
    ours = ablation.ablation_curves(model, x, y, order, points=13)[:, 1:]
    colours = quantus.PixelFlipping(features_in_step=12, perturb_baseline=0.0, normalise=False, disable_warnings=True)
    by_colour = _flip(colours, model, x, y, maps.abs().numpy())[:, 2::3]
    abs_sum = quantus.PixelFlipping(features_in_step=12, perturb_baseline=0.0, abs=True, normalise=False,
                                    disable_warnings=True)
    by_abs_sum = _flip(abs_sum, model, x, y, maps.sum(1, keepdim=True).numpy())[:, 2::3]
    assert np.abs(ours - by_colour).max() > 10 * TOL
    assert np.abs(ours - by_abs_sum).max() > 10 * TOL


@pytest.mark.parametrize("baseline", ["mean", "black"])
def test_quantus_named_baselines_are_statistics_of_the_image(probe, baseline):
    """Quantus's "mean" is the mean of the image's values as flipped so far, "black" their minimum; Atlas's
    mean is the normalization mean colour, zero in the input space (Quantus: perturb_baseline=0.0)."""
    model, x, y, order = probe
    ours = ablation.ablation_curves(model, x, y, order, points=13)[:, 1:]
    metric = quantus.PixelFlipping(features_in_step=12, perturb_baseline=baseline, normalise=False,
                                   disable_warnings=True)
    assert np.abs(ours - _flip(metric, model, x, y, order[:, None].numpy())[:, 2::3]).max() > 10 * TOL


def test_quantus_region_perturbation_ranks_patches(probe):
    """With regions larger than a pixel, Quantus ranks whole patches by their summed map; Atlas ranks pixels."""
    model, x, y, order = probe
    ours = ablation.ablation_curves(model, x, y, order, points=37)
    region = quantus.RegionPerturbation(patch_size=2, regions_evaluation=36, perturb_baseline=0.0, normalise=False,
                                        disable_warnings=True)
    theirs = _flip(region, model, x, y, order[:, None].numpy())
    assert np.abs((ours[:, :1] - ours[:, 1:]) - theirs).max() > 10 * TOL


def test_quantus_ssim_compares_flattened_maps(probe):
    """Quantus's SSIM runs on the flattened map (a 1-D signal: a row's end touches the next row's start) with
    a uniform 7-sample window, sample covariances and the pair's joint range; Atlas's is Wang et al.'s 2-D SSIM
    (11 x 11 Gaussian window, sigma 1.5) of each map scaled to [0, 1], as in Adebayo et al."""
    metrics = pytest.importorskip("skimage.metrics")
    model, x, y, _ = probe
    a = gradient(model).attribute(x, y).sum(1).numpy().astype(np.float64)
    b = gradient(model).attribute(x, (y + 1) % 5).sum(1).numpy().astype(np.float64)
    theirs = quantus.similarity_func.ssim(a.reshape(3, -1), b.reshape(3, -1), batched=True)
    flat = [metrics.structural_similarity(p.ravel(), q.ravel(), data_range=np.ptp(np.r_[p.ravel(), q.ravel()]))
            for p, q in zip(a, b)]
    np.testing.assert_allclose(theirs, flat, atol=1e-9)
    assert np.abs(ssim(a, b) - np.asarray(theirs)).max() > 0.05


def test_a_constant_map_scores_zero_in_atlas_and_nan_in_quantus():
    """Atlas reads a map wiped out by randomization as sharing no ordering (0); scipy's Spearman, which Quantus
    calls, is undefined there (NaN; in a batch, SciPy 1.17 turns the whole answer into one NaN, which
    Quantus 0.6.0 then fails to index)."""
    a, b = np.zeros(16), np.arange(16.0)
    assert spearman(a[None], b[None])[0] == 0
    with pytest.warns(Warning):  # scipy: "An input array is constant"
        assert np.isnan(quantus.similarity_func.correlation_spearman(a, b))


def test_the_random_class_comes_from_another_generator(probe):
    """Both draw uniformly over the classes but the target, Quantus with NumPy's legacy seed, Atlas with a
    `default_rng`: the same seed picks other classes, so the pair reads Quantus's class from its call."""
    model, x, y, _ = probe
    explain = Explainer(gradient)
    metric = quantus.RandomLogit(num_classes=5, seed=42, disable_warnings=True)
    metric(model, x.numpy(), y.numpy(), a_batch=explain(model, x.numpy(), y.numpy()), explain_func=explain,
           device="cpu")
    ours = sanity.other_classes(y, 5, seed=42)
    assert (ours != y.numpy()).all() and (explain.targets[-1] != y.numpy()).all()
    assert (ours != explain.targets[-1]).any()


class Defined(nn.Module):
    """The classifier defined first, a scale without `reset_parameters`, two convolutions of one shape."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)) * self.scale)


def test_quantus_randomizes_in_definition_order_and_seeds_every_layer_alike():
    """Atlas: forward order (the classifier first, as Adebayo et al.), a seed per module name, and a module
    without `reset_parameters` re-drawn around its own spread. Quantus: `named_modules` order reversed
    (here a convolution first), the same seed before every layer (equal-shaped layers get equal weights),
    and modules without `reset_parameters` left as they are."""
    model = Defined().eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    groups = sanity.parameter_groups(model, x, count=4)
    assert [names for _, names in groups] == [["fc"], ["conv2"], ["conv1"], [""]]  # "": the model owns the scale
    randomized = dict(quantus.PyTorchModel(model, device="cpu").get_random_layer_generator(order="top_down"))
    assert list(randomized) == ["conv2", "conv1", "fc"]
    theirs = randomized["fc"]  # one copy, randomized cumulatively
    assert torch.equal(theirs.conv1.weight, theirs.conv2.weight) and torch.equal(theirs.scale, model.scale)
    ours = sanity.randomized(model, groups)
    assert not torch.equal(ours.conv1.weight, ours.conv2.weight) and not torch.equal(ours.scale, model.scale)
