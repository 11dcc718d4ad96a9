"""BatchNorm folding: the folded copy computes what the model computes, names and hooks included."""

import pytest
import torch
from torch import nn

from atlas.layers import Capture
from atlas.models.fold import AfterFold, fold_batchnorm


def _set_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=gen))
                m.bias.data.copy_(torch.randn(c, generator=gen))
    return model.eval().requires_grad_(False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise, with a bias of its own
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)  # after a residual sum: nothing to fold into
        self.conv4 = nn.Conv2d(8, 8, 1)
        self.bn4 = nn.BatchNorm2d(8)  # its convolution's output also goes elsewhere
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x) + x)
        y = self.conv4(x)
        x = self.bn4(y) + y
        return self.head(x.mean((2, 3)))


def test_the_folded_model_computes_the_same_outputs_and_activations():
    model = _set_stats(Net())
    folded, names = fold_batchnorm(model)
    assert names == ["bn1", "bn2"]
    assert isinstance(folded.bn1, nn.Identity) and isinstance(model.bn1, nn.BatchNorm2d)  # the model is untouched
    assert torch.equal(folded.conv4.weight, model.conv4.weight) and isinstance(folded.bn4, nn.BatchNorm2d)
    x = torch.randn(4, 3, 12, 12)
    layers = ["bn1", "bn2", "bn3", "relu@1", "conv4"]
    with Capture(model, layers) as a, Capture(folded, layers) as b:
        out_a, acts_a = model(x), dict(a.run(x))
        out_b, acts_b = folded(x), dict(b.run(x))
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    for name in layers:
        torch.testing.assert_close(acts_b[name], acts_a[name], rtol=1e-5, atol=1e-5)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(model(xa)[:, 1].sum(), xa)
    (gb,) = torch.autograd.grad(folded(xb)[:, 1].sum(), xb)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_a_layer_being_read_keeps_its_convolution_whole():
    model = _set_stats(Net())
    folded, names = fold_batchnorm(model, keep=frozenset({"conv1"}))
    assert names == ["bn2"]
    torch.testing.assert_close(folded.conv1.weight, model.conv1.weight, rtol=0, atol=0)


def test_nothing_folds_in_training_mode_or_in_a_model_that_cannot_be_traced():
    model = _set_stats(Net()).train()
    assert fold_batchnorm(model) == (model, [])

    class Branchy(Net):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return super().forward(x)
    untraceable = _set_stats(Branchy())
    assert fold_batchnorm(untraceable) == (untraceable, [])


def test_a_shared_convolution_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)
    model = _set_stats(Shared())
    assert fold_batchnorm(model) == (model, [])


def test_timm_batchnorm_act_keeps_its_activation_and_names():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False),
                          timm_layers.BatchNormAct2d(6, act_layer=nn.ReLU6), nn.Conv2d(6, 4, 1))
    _set_stats(model, seed=1)
    folded, names = fold_batchnorm(model)
    assert names == ["1"]
    assert isinstance(folded[1], AfterFold) and isinstance(folded[1].act, nn.ReLU6)
    assert "1.act" in dict(folded.named_modules())
    x = torch.randn(2, 3, 10, 10) * 3
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
