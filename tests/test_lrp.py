"""LRP through zennit: conservation on canonized networks, and agreement with zennit's own canonizers."""

import pytest
import torch
from torch import nn

zennit = pytest.importorskip("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonPlusFlat  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402

from atlas.attribution import methods  # noqa: E402
from atlas.attribution.base import InputSpace  # noqa: E402
from atlas.attribution.lrp import LRP, canonize  # noqa: E402
from atlas.models.tiny import TinyConvNet, seeded_init  # noqa: E402

SPACE = InputSpace((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _inputs(n=3, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return SPACE.from_pixels(torch.rand(n, 3, size, size, generator=gen))


def _randomize_bn(model, seed=0):
    """BatchNorms with statistics and scales far from the identity, some scales negative."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_relevance_is_conserved_through_a_residual_block(composite):
    model = seeded_init(TinyConvNet()).eval()
    lrp = LRP(model, SPACE, composite=composite)
    out = lrp.explain(_inputs(), torch.tensor([1, 4, 7]))
    assert out.info["completeness"].max() < 1e-4
    assert "1 residual sums" in lrp.params["canonization"]


def test_without_the_explicit_sum_a_residual_block_doubles_relevance():
    """What the canonization prevents: zennit on the raw network copies the block's relevance into both branches."""
    model = seeded_init(TinyConvNet()).eval()
    x = _inputs().requires_grad_(True)
    with EpsilonPlusFlat(zero_params="bias").context(model) as modified:
        out = modified(x)
        chosen = torch.zeros_like(out)
        chosen[:, 2] = out[:, 2].detach()
        (relevance,) = torch.autograd.grad(out, x, grad_outputs=chosen)
    error = (relevance.flatten(1).sum(1) - out[:, 2].detach()).abs() / out[:, 2].detach().abs()
    assert error.median() > 0.05


class _NegativeScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1))


def test_a_negative_batchnorm_scale_is_folded_into_its_convolution():
    """The map equals LRP on the same network written without BatchNorm (its scale folded by hand)."""
    model = seeded_init(_NegativeScale())
    _randomize_bn(model)
    with torch.no_grad():
        model.bn.weight[:2] = -model.bn.weight[:2].abs()
    folded = copy_without_bn(model)
    x, target = _inputs(2), torch.tensor([0, 2])
    ours = LRP(model, SPACE).attribute(x, target)
    reference = LRP(folded, SPACE).attribute(x, target)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    assert torch.equal(model(x), model(x))  # the model itself keeps its BatchNorm
    assert model.bn.weight[:2].lt(0).all()


def copy_without_bn(model: _NegativeScale) -> nn.Module:
    bn = model.bn
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(model.conv.weight * scale[:, None, None, None])
        conv.bias.copy_((model.conv.bias - bn.running_mean) * scale + bn.bias)
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.fc).eval()


def test_resnet_matches_zennit_own_canonizer_and_the_traced_path_agrees():
    torchvision = pytest.importorskip("torchvision")
    model = _randomize_bn(torchvision.models.resnet18(num_classes=10))
    x, target = _inputs(2, 64), torch.tensor([3, 5])
    ours = LRP(model, SPACE).explain(x, target)
    # zennit's own pipeline: the composite with its ResNet canonizer, relevance seeded with the logit
    composite = EpsilonPlusFlat(zero_params="bias", canonizers=[ResNetCanonizer()])
    with Gradient(model=model, composite=composite) as attributor:
        out, relevance = attributor(x, lambda o: torch.zeros_like(o).scatter_(1, target[:, None], 1.0) * o)
    torch.testing.assert_close(ours.maps, relevance, rtol=1e-3, atol=1e-6)
    # the generic canonization (torch.fx) of the same network gives the same relevance
    traced = canonize(torch.nn.Sequential(model), x[:1])
    assert traced.sums == 8 and traced.folded == 20
    generic = LRP(torch.nn.Sequential(model), SPACE).explain(x, target)
    torch.testing.assert_close(generic.maps, ours.maps, rtol=1e-3, atol=1e-5)
    assert ours.info["completeness"].max() < 1e-3


def test_timm_batchnorm_act_and_depthwise_blocks_conserve():
    """timm's EfficientNet-Lite: BatchNormAct2d (a BatchNorm carrying its ReLU6), depthwise convolutions, skips.

    The BatchNorms get signed scales but no shifts, so that no unit fires on its bias alone: there z+ has
    nothing to divide the relevance by and LRP loses it, as it does on the trained network (README).
    """
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    canonical = canonize(model, _inputs(1, 64))
    assert canonical.folded == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert canonical.sums == 9  # every inverted residual with a skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = methods.get("lrp_epsilon_plus_flat", model, SPACE).explain(_inputs(2, 64), torch.tensor([1, 8]))
    assert out.info["completeness"].max() < 1e-3
    assert out.maps.shape == (2, 3, 64, 64)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched


class _Branchy(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        if x.mean() > 0:
            x = x + 0
        return self.fc(x.mean((2, 3)))


def test_a_model_fx_cannot_trace_falls_back_and_says_so():
    model = seeded_init(_Branchy()).eval()
    lrp = LRP(model, SPACE)
    out = lrp.explain(_inputs(2), torch.tensor([0, 1]))
    assert out.maps.shape == (2, 3, 32, 32) and torch.isfinite(out.maps).all()
    assert "torch.fx failed" in lrp.params["canonization"]
