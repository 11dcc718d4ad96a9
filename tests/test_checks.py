"""Sanity checks of attribution methods: similarity scores, randomization, ablation."""

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from atlas.attribution import methods
from atlas.attribution.checks import ablation
from atlas.attribution.checks import sanity as checks
from atlas.attribution.checks.similarity import compare, spearman, ssim, unit_scale


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# --- similarity ---

def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 12, 14))
    b = a + rng.normal(size=a.shape)
    a[0, :6] = 0  # Grad-CAM-like runs of exact zeros
    b[0, 3:9] = 0
    a[1], b[1] = np.round(a[1]), np.round(2 * b[1])  # many ties of several values
    expected = [scipy.stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman(a, b), expected, atol=1e-12)


def test_spearman_of_a_constant_map_is_zero():
    a = np.zeros((1, 4, 4))
    assert spearman(a, np.arange(16.0).reshape(1, 4, 4))[0] == 0


def test_ssim_of_identical_and_rescaled_maps_is_one():
    a = np.random.default_rng(1).normal(size=(2, 16, 16))
    np.testing.assert_allclose(ssim(a, 3 * a + 1), [1, 1], atol=1e-12)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 20, 24))
    b = a + rng.normal(size=a.shape)
    expected = [metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=1) for x, y in zip(unit_scale(a), unit_scale(b))]
    np.testing.assert_allclose(ssim(a, b), expected, atol=1e-4)


def test_compare_ignores_sign_only_in_spearman_abs():
    a = np.random.default_rng(3).normal(size=(2, 12, 12))
    scores = compare(a, -a)
    np.testing.assert_allclose(scores["spearman_abs"], 1, atol=1e-6)
    np.testing.assert_allclose(scores["spearman"], -1, atol=1e-6)
    assert all(v.shape == (2,) and v.dtype == np.float32 for v in scores.values())


# --- parameter groups and randomized copies ---

class Small(nn.Module):
    """Modules registered in a different order than they run; one never runs."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.unused = nn.Linear(2, 2)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv2(self.block(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def test_parameter_groups_start_with_the_classifier_alone():
    model = Small().eval()
    x = torch.zeros(1, 3, 8, 8)
    assert checks.parameter_groups(model, x, 3) == [
        ("head", ["head"]),
        ("conv2 .. block.1", ["conv2", "block.1"]),
        ("block.0 .. conv1", ["block.0", "conv1"])]
    assert [names for _, names in checks.parameter_groups(model, x, 9)] == [
        ["head"], ["conv2"], ["block.1"], ["block.0"], ["conv1"]]
    assert checks.parameter_groups(model, x, 1) == [("head .. conv1", ["head", "conv2", "block.1", "block.0", "conv1"])]


def test_randomized_copy_changes_only_the_chosen_groups():
    torch.manual_seed(0)
    model = Small().eval()
    model.block[1].running_mean.fill_(0.5)
    model.block[1].running_var.fill_(4.0)
    model.block[1].weight.data.fill_(2.0)  # as if trained, so BatchNorm's reset to (1, 0) changes it
    model.block[1].bias.data.fill_(0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = checks.parameter_groups(model, torch.zeros(1, 3, 8, 8), 3)
    copy = checks.randomized(model, groups[:2], seed=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    after = copy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias", "conv2.weight", "conv2.bias", "block.1.weight", "block.1.bias",
                       "block.1.running_mean", "block.1.running_var"}
    # BatchNorm is reset whole, as freshly built (and as Quantus resets it): no trained statistics around new weights
    assert torch.equal(after["block.1.running_mean"], torch.zeros(4)) and torch.equal(after["block.1.running_var"],
                                                                                       torch.ones(4))
    assert torch.equal(after["block.1.num_batches_tracked"], before["block.1.num_batches_tracked"])  # was 0
    assert not copy.training
    again = checks.randomized(model, groups[1:2], seed=1)  # the same new weights, alone or cascaded
    assert torch.equal(again.state_dict()["conv2.weight"], after["conv2.weight"])


def test_other_classes_never_repeat_the_target():
    target = np.arange(50) % 3
    other = checks.other_classes(target, 3, seed=0)
    assert (other != target).all() and set(other) <= {0, 1, 2}
    assert np.array_equal(other, checks.other_classes(target, 3, seed=0))


# --- ablation on a model whose evidence is one region ---

class Region(nn.Module):
    """Logit 0 is the sum of the top-left 4 x 4 pixels; logit 1 is 0."""

    def forward(self, x):
        evidence = x[:, :, :4, :4].sum((1, 2, 3))
        return torch.stack([evidence, torch.zeros_like(evidence)], 1)


def region_case():
    x = torch.full((2, 3, 16, 16), 0.2)
    maps = torch.zeros(2, 16, 16)
    maps[:, :4, :4] = 1.0
    return Region(), x, maps


def test_deletion_in_map_order_drops_faster_than_random():
    model, x, maps = region_case()
    fracs = ablation.fractions(11)
    deletion = ablation.ablation_curves(model, x, 0, maps, 11, "mean")
    control = ablation.ablation_curves(model, x, 0, maps, 11, "mean", order="random", seed=0)
    intact = 1 / (1 + np.exp(-9.6))  # the two-class softmax of logits (9.6, 0)
    assert deletion.shape == (2, 11) and deletion.dtype == np.float32
    np.testing.assert_allclose(deletion[:, 0], intact, atol=1e-6)  # probabilities, as RISE: not divided by it
    np.testing.assert_allclose(deletion[:, 1:], 0.5, atol=1e-6)  # region gone at 10%
    assert (ablation.auc(deletion, fracs) < ablation.auc(control, fracs) - 0.2).all()
    insertion = ablation.ablation_curves(model, x, 0, maps, 11, "mean", kind="insertion")
    np.testing.assert_allclose(insertion[:, 0], 0.5, atol=1e-6)
    np.testing.assert_allclose(insertion[:, 1:], intact, atol=1e-6)
    assert (ablation.auc(insertion, fracs) <= 1).all()


def negative_evidence_model() -> tuple[nn.Module, torch.Tensor]:
    """Logit 0 = -(sum of the top-left 4 x 4 pixels) on an image of -0.2: the evidence region's
    gradient is -1, the most negative of the map, while its pixels carry all the logit."""
    linear = nn.Linear(3 * 16 * 16, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        region = torch.zeros(3, 16, 16)
        region[:, :4, :4] = 1.0
        linear.weight[0] = -region.reshape(-1)
    return nn.Sequential(nn.Flatten(), linear, nn.ReLU()).eval(), torch.full((2, 3, 16, 16), -0.2)  # a ReLU to guide


@pytest.mark.parametrize("name", ["gradient", "smoothgrad", "guided_backprop"])
def test_methods_whose_sign_is_no_evidence_rank_pixels_by_magnitude(name):
    model, x = negative_evidence_model()
    assert methods.get(name, model).magnitude
    result = checks.run_checks(maker(name), model, x, 0, n_classes=2, groups_count=1, points=11, seed=0)
    deletion = result["deletion"]["mean"]
    np.testing.assert_allclose(deletion[:, 1:], 0.5, atol=1e-5)  # the region goes first, by |gradient|
    by_sign = ablation.ablation_curves(model, x, 0, checks._maps(methods.get(name, model), x, torch.zeros(2).long()),
                                       11, "mean")
    assert (by_sign[:, 1:-1] > 0.99).all()  # the signed map removes the region last


def test_signed_evidence_keeps_its_sign():
    model, x = negative_evidence_model()
    assert not methods.get("gradient_x_input", model).magnitude
    result = checks.run_checks(maker("gradient_x_input"), model, x, 0, n_classes=2, groups_count=1, points=11, seed=0)
    np.testing.assert_allclose(result["deletion"]["mean"][:, 1:], 0.5, atol=1e-5)  # gradient x input = +0.2 there


def test_blur_keeps_a_constant_image():
    x = torch.full((1, 3, 20, 20), 0.7)
    torch.testing.assert_close(ablation.replacement_image(x, "blur"), x)


def test_mass_centre_box_removes_the_region():
    model, x, maps = region_case()
    np.testing.assert_allclose(ablation.mass_centres(maps), [[1.5, 1.5]] * 2)
    drop = ablation.mass_centre_drop(model, x, 0, maps, box=0.25)
    np.testing.assert_allclose(drop, 1 - 0.5 / (1 / (1 + np.exp(-9.6))), atol=1e-5)
    far = ablation.box_drop(model, x, 0, np.array([[12.0, 12.0]] * 2), box=0.25)
    np.testing.assert_allclose(far, 0, atol=1e-6)


# --- the key test: Adebayo et al.'s finding on a trained CNN ---

def gratings(n: int, gen: torch.Generator, size: int = 32):
    """Noisy coloured gratings; the class is the orientation (0, 45, 90 or 135 degrees)."""
    y = torch.randint(0, 4, (n,), generator=gen)
    theta = (y.float() * np.pi / 4 + 0.3 * (torch.rand(n, generator=gen) - 0.5)).view(-1, 1, 1)
    freq = (0.5 + 0.4 * torch.rand(n, generator=gen)).view(-1, 1, 1)
    phase = (2 * np.pi * torch.rand(n, generator=gen)).view(-1, 1, 1)
    i, j = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    wave = torch.sin(freq * (torch.cos(theta) * j + torch.sin(theta) * i) + phase)
    colour = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=gen)
    return 0.3 * wave[:, None] * colour + 0.25 * torch.randn(n, 3, size, size, generator=gen), y


def train_cnn(seed: int, steps: int = 100, batch: int = 32):
    """A 3-layer CNN trained on fresh `gratings` each step; returns (model, accuracy, 8 new images)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                              nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        x, y = gratings(batch, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = gratings(256, gen)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return model, accuracy, gratings(8, gen)[0]


@pytest.fixture(scope="module")
def trained():
    model, accuracy, x = train_cnn(seed=0)
    assert accuracy > 0.9
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


def maker(name):
    return lambda model: methods.get(name, model)


def test_randomization_fails_guided_backprop_and_passes_the_gradient(trained):
    model, x, target = trained
    groups = checks.parameter_groups(model, x[:1], 4)
    assert [label for label, _ in groups] == ["8", "4", "2", "0"]
    verdicts = {}
    for name in ("gradient", "guided_backprop"):
        result = checks.randomization(maker(name), model, x, target, groups, seed=0)
        assert result["cascading"]["ssim"].shape == result["independent"]["spearman"].shape == (4, 8)
        np.testing.assert_array_equal(result["cascading"]["spearman"][0], result["independent"]["spearman"][0])
        verdicts[name] = checks.verdict(result)
    assert verdicts["gradient"][0] == "pass" and verdicts["guided_backprop"][0] == "fail", verdicts


def test_run_checks_layout_and_deletion_beats_random(trained):
    model, x, target = trained
    result = checks.run_checks(maker("gradient_x_input"), model, x, target, n_classes=4, groups_count=4,
                               points=9, seed=0, batch=32)
    control = checks.run_controls(model, x, target, points=9, seed=0, batch=32)
    arrays, attrs = checks.flatten(result, "gradient_x_input")
    assert {k: v.shape for k, v in arrays.items()} == {
        **{f"gradient_x_input/randomization/{mode}/{s}": (4, 8)
           for mode in ("cascading", "independent") for s in checks.SCORES},
        **{f"gradient_x_input/randomization/{mode}/maps": (5, 32, 32) for mode in ("cascading", "independent")},
        **{f"gradient_x_input/random_logit/{s}": (8,) for s in (*checks.SCORES, "target")},
        **{f"gradient_x_input/{kind}/{r}": (8, 9) for kind in ("deletion", "insertion") for r in ("mean", "blur")},
        "gradient_x_input/mass_centre/drop": (8,)}
    assert attrs["gradient_x_input/randomization"]["groups"] == [["8"], ["4"], ["2"], ["0"]]
    assert attrs["gradient_x_input/randomization"]["verdict"] in ("pass", "fail")
    assert (arrays["gradient_x_input/random_logit/target"] != target.numpy()).all()
    for replacement in ("mean", "blur"):
        key = f"auc_{replacement}"
        assert result["deletion"]["attrs"][key] < control["deletion"]["attrs"][key]
        assert result["insertion"]["attrs"][key] > control["insertion"]["attrs"][key]


def test_a_map_that_is_not_finite_gives_nan_ablations_not_a_crash():
    """A diverging rule (LRP's γ on signed inputs can overflow) must not stop the checks of the other images."""
    from atlas.models.tiny import TinyConvNet, seeded_init
    model = seeded_init(TinyConvNet()).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
    maps[1, 4, 5], maps[2, 0, 0] = np.inf, np.nan
    out = checks.ablations(model, x, torch.tensor([0, 1, 2]), maps, points=5, seed=0, batch=8)
    drop = out["mass_centre"]["drop"]
    assert np.isfinite(drop[0]) and np.isnan(drop[1:]).all()
    for kind in ("deletion", "insertion"):
        assert np.isfinite(out[kind]["mean"][0]).all() and np.isnan(out[kind]["mean"][1:]).all()
        assert np.isfinite(out[kind]["attrs"]["auc_mean"])
