"""Attribution methods against values worked out by hand, hand-made references and Captum."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atlas.attribution.base import InputSpace
from atlas.attribution.cam import GradCAM, GuidedGradCAM, default_cam_layer
from atlas.attribution.gradients import Gradient, GradientXInput, GuidedBackprop, SmoothGrad
from atlas.attribution.extremal import ExtremalPerturbation
from atlas.attribution.perturbation import Occlusion
from atlas.errors import AtlasError


def images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Agreement to `rel` of the expected map's largest value."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp(min=1e-12)
    assert ((actual - expected).abs().max() / scale).item() <= rel


class Linear(nn.Module):
    """f(x) = W vec(x) + b on 3 x 4 x 4 inputs, 2 classes, weights set by a seed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 2)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(2, 48, generator=gen))
            self.fc.bias.copy_(torch.tensor([0.5, -0.5]))

    def forward(self, x):
        return self.fc(x.flatten(1))

    def row(self, target: int) -> torch.Tensor:
        return self.fc.weight[target].view(1, 3, 4, 4)


# --- gradients ---

def test_gradient_of_a_linear_model_is_the_weight_row():
    model, x = frozen(Linear()), images(2, 4)
    assert torch.equal(Gradient(model).attribute(x, 1), model.row(1).expand(2, -1, -1, -1))


def test_gradient_x_input_is_weight_times_input():
    model, x = frozen(Linear()), images(2, 4)
    torch.testing.assert_close(GradientXInput(model).attribute(x, torch.tensor([0, 1])),
                               torch.cat([model.row(0), model.row(1)]) * x)


def test_smoothgrad_without_noise_is_the_gradient_and_its_square(convnet):
    x, target = images(2, 32), torch.tensor([3, 5])
    g = Gradient(convnet).attribute(x, target)
    kw = dict(samples=3, noise=0.0, batch=2)
    torch.testing.assert_close(SmoothGrad(convnet, **kw).attribute(x, target), g)
    torch.testing.assert_close(SmoothGrad(convnet, variant="squared", **kw).attribute(x, target), g * g)
    # Not exactly 0: the variance of equal floats leaves rounding error (1e-18 here).
    vargrad = SmoothGrad(convnet, variant="vargrad", **kw).attribute(x, target)
    assert vargrad.abs().max() < 1e-6 * (g * g).max()


def test_smoothgrad_noise_is_keyed_by_seed_plus_position(convnet):
    """Image i of a call draws from seed + i: the same image alone, given seed + i, gets the same map."""
    x = images(2, 32)
    together = SmoothGrad(convnet, samples=4, noise=0.1, seed=7).attribute(x, 3)
    alone = SmoothGrad(convnet, samples=4, noise=0.1, seed=8).attribute(x[1:], 3)
    torch.testing.assert_close(together[1:], alone)
    assert not torch.allclose(together[1:], SmoothGrad(convnet, samples=4, noise=0.1, seed=7).attribute(x[1:], 3))


def test_smoothgrad_in_bfloat16_autocasts_the_passes_and_keeps_the_average(convnet):
    """bfloat16 rounding is one more noise: the map stays close to float32's from the same draws."""
    x, target = images(2, 32), torch.tensor([3, 5])
    full = SmoothGrad(convnet, samples=16, noise=0.1, seed=3)
    half = SmoothGrad(convnet, samples=16, noise=0.1, seed=3, precision="bfloat16")
    seen = []
    hook = convnet.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        a, b = full.attribute(x, target), half.attribute(x, target)
    finally:
        hook.remove()
    assert set(seen) == {torch.float32, torch.bfloat16}  # the second method's passes ran in bfloat16
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.98
    assert half.params["precision"] == "bfloat16" and "precision" not in full.params
    with pytest.raises(ValueError, match="precision"):
        SmoothGrad(convnet, precision="float16")


class Rectified(nn.Module):
    """Every way a network rectifies: in-place module, F.relu, torch.relu_ (return value
    ignored), Tensor.relu, nn.ReLU6 (with inputs above 6). `hooked` swaps them all for
    plain modules, the form a module-backward-hook Guided Backprop can see."""

    def __init__(self, hooked: bool = False):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(5)])
        self.fc = nn.Linear(6, 4)
        self.relu = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6()
        self.hooked = nn.ModuleList([nn.ReLU() for _ in range(4)] + [nn.ReLU6()]) if hooked else None

    def forward(self, x):
        pre = lambda i, h: self.convs[i](h) * (50.0 if i == 4 else 1.0)  # noqa: E731
        if self.hooked is not None:
            for i, act in enumerate(self.hooked):
                x = act(pre(i, x))
        else:
            x = self.relu(pre(0, x))
            x = F.relu(pre(1, x))
            x = pre(2, x)
            torch.relu_(x)
            x = pre(3, x).relu()
            x = self.relu6(pre(4, x))
        return self.fc(x.mean(dim=(2, 3)))


def guided_by_module_hooks(model: Rectified, x: torch.Tensor, target: int) -> torch.Tensor:
    """Guided Backprop the classic way: a backward hook on each ReLU module keeps only positive gradients."""
    hooks = [m.register_full_backward_hook(lambda _m, grad_in, _out: (grad_in[0].clamp(min=0),))
             for m in model.hooked]
    try:
        x = x.clone().requires_grad_(True)
        model(x)[:, target].sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return x.grad


def rectified_pair(positive_first_layer: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Rectified()
    if positive_first_layer:
        with torch.no_grad():
            model.convs[0].weight.abs_()
    reference = Rectified(hooked=True)
    reference.load_state_dict(model.state_dict())
    return frozen(model), frozen(reference)


def test_guided_backprop_matches_module_hooks_for_every_kind_of_relu():
    model, reference = rectified_pair()
    x = images(2, 6)
    ours = GuidedBackprop(model).attribute(x, 2)
    torch.testing.assert_close(ours, guided_by_module_hooks(reference, x, 2), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours, Gradient(model).attribute(x, 2), atol=1e-4)  # guidance did something


def test_relu6_ceiling_is_reached_in_the_guided_model():
    model, _ = rectified_pair()
    caught = []
    handle = model.relu6.register_forward_hook(lambda _m, inp, _out: caught.append(inp[0]))
    model(images(2, 6))
    handle.remove()
    assert (caught[0] > 6).any() and (caught[0] < 0).any()  # both ends of ReLU6 are exercised


def test_guided_backprop_is_nonnegative_when_the_first_layer_weights_are():
    # The input gradient is W1^T times the guided gradient at the first ReLU, which is >= 0.
    model, _ = rectified_pair(positive_first_layer=True)
    assert GuidedBackprop(model).attribute(images(2, 6), 1).min() >= 0


def test_guided_backprop_needs_a_rectifier():
    with pytest.raises(AtlasError, match="no ReLU"):
        GuidedBackprop(frozen(Linear())).attribute(images(1, 4), 0)


# --- Grad-CAM ---

class PooledHead(nn.Module):
    """A = conv(x) (2x2, stride 2: 6 x 6 -> 3 x 3), logits = W mean_hw(A): alpha_k = W_tk / 9."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2, stride=2)
        self.fc = nn.Linear(4, 2, bias=False)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 3, 2, 2, generator=gen))
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 1.0, 2.0, 0.0]]))

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_grad_cam_is_the_relu_of_the_class_weighted_maps_over_their_area():
    model, x = frozen(PooledHead()), images(2, 6)
    acts = model.conv(x)
    expected = F.relu(torch.einsum("k,bkhw->bhw", model.fc.weight[0], acts))[:, None] / 9
    torch.testing.assert_close(GradCAM(model, layer="conv").layer_maps(x, 0), expected)


@pytest.mark.parametrize("layer", ["block", "conv1", "block.conv1"])  # conv1: an in-place ReLU follows
def test_grad_cam_agrees_with_captum(convnet, layer):
    captum_attr = pytest.importorskip("captum.attr")
    x, target = images(3, 32), torch.tensor([1, 4, 7])
    ours = GradCAM(convnet, layer=layer, batch=2).layer_maps(x, target)
    module = dict(convnet.named_modules())[layer]
    expected = captum_attr.LayerGradCam(convnet, module).attribute(x, target=target, relu_attributions=True)
    assert_close(ours, expected)


def test_grad_cam_attribution_spreads_the_upsampled_map_over_colours(convnet):
    x, method = images(2, 32), GradCAM(convnet, layer="block")
    cam = method.layer_maps(x, 3)
    maps = method.attribute(x, 3)
    torch.testing.assert_close(maps.sum(1, keepdim=True),
                               F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False))
    assert torch.equal(maps[:, 0], maps[:, 2])
    assert method.params == {"method": "grad_cam", "signed": False, "layer": "block"}


def test_guided_grad_cam_is_guided_backprop_times_the_cam(convnet):
    x = images(2, 32)
    cam = F.interpolate(GradCAM(convnet, layer="block").layer_maps(x, 3), size=(32, 32), mode="bilinear",
                        align_corners=False)
    expected = GuidedBackprop(convnet).attribute(x, 3) * cam
    method = GuidedGradCAM(convnet, input_size=32)
    torch.testing.assert_close(method.attribute(x, 3), expected)
    assert method.params == {"method": "guided_grad_cam", "signed": True, "layer": "block"}


def test_grad_cam_finds_its_default_layer_at_the_first_call(convnet):
    method = GradCAM(convnet)
    assert method.layer is None
    method.attribute(images(1, 32), 0)
    assert method.params["layer"] == "block"


def test_grad_cam_names_a_bad_layer(convnet):
    with pytest.raises(AtlasError, match="no module named 'nope'"):
        GradCAM(convnet, layer="nope").attribute(images(1, 32), 0)
    with pytest.raises(AtlasError, match="not a feature map"):
        GradCAM(convnet, layer="fc").attribute(images(1, 32), 0)


def _torchvision(name: str, **kw):
    torchvision = pytest.importorskip("torchvision")
    return getattr(torchvision.models, name)(weights=None, **kw)


def _timm(name: str, **kw):
    return pytest.importorskip("timm").create_model(name, pretrained=False, **kw)


@pytest.mark.parametrize("build, expected", [
    (lambda: _torchvision("resnet18"), "layer4"),
    (lambda: _torchvision("efficientnet_b0"), "features"),
    (lambda: _torchvision("vgg11"), "features"),  # not its adaptive pool to 7 x 7
    (lambda: _torchvision("googlenet", aux_logits=False, init_weights=False), "inception5b"),
    (lambda: _torchvision("densenet121"), "features"),
    (lambda: _timm("efficientnet_lite0"), "bn2"),
], ids=["resnet18", "efficientnet_b0", "vgg11", "googlenet", "densenet121", "timm_efficientnet_lite0"])
def test_default_cam_layer_of_real_architectures(build, expected):
    assert default_cam_layer(frozen(build()), 64) == expected


def test_default_cam_layer_of_the_tiny_convnet_and_a_transformer(convnet):
    assert default_cam_layer(convnet, 32) == "block"  # outermost, after block.relu@1
    # a transformer: the last block's normalized input, as a patch grid (tests/test_transformers.py)
    assert default_cam_layer(frozen(_timm("vit_tiny_patch16_224", img_size=32, depth=2)), 32) == "blocks.1.norm1"


# --- occlusion ---

def test_occlusion_of_a_linear_model_is_the_weighted_input_of_each_patch():
    model, x = frozen(Linear()), images(2, 4)
    space = InputSpace(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    for fill, value in [("zero", torch.zeros(1, 3, 1, 1)), ("black", space.lo(x))]:
        maps = Occlusion(model, space, patch=2, stride=2, fill=fill).attribute(x, 1)
        # A 2 x 2 patch removes sum over its pixels and colours of w * (x - fill).
        contribution = (model.row(1) * (x - value)).sum(1, keepdim=True)
        per_patch = F.avg_pool2d(contribution, 2) * 4
        torch.testing.assert_close(maps, F.interpolate(per_patch, scale_factor=2).expand(-1, 3, -1, -1))


def test_occlusion_averages_the_patches_covering_a_pixel():
    model, x = frozen(Linear()), images(1, 4)
    maps = Occlusion(model, patch=4, stride=1).attribute(x, 0)  # one patch: the whole image
    torch.testing.assert_close(maps, (model.row(0) * x).sum().expand(1, 3, 4, 4))
    maps = Occlusion(model, patch=3, stride=1).attribute(x, 0)  # four patches, corners in one each
    drops = [(model.row(0) * x)[..., r:r + 3, c:c + 3].sum() for r in (0, 1) for c in (0, 1)]
    torch.testing.assert_close(maps[0, :, 0, 0], drops[0].expand(3))
    torch.testing.assert_close(maps[0, :, 1, 1], torch.stack(drops).mean().expand(3))


@pytest.mark.parametrize("patch, stride", [(8, 4), (5, 3)])  # tiling exactly, and cut at the edge
def test_occlusion_agrees_with_captum(convnet, patch, stride):
    captum_attr = pytest.importorskip("captum.attr")
    x, target = images(2, 32), torch.tensor([1, 4])
    ours = Occlusion(convnet, patch=patch, stride=stride, batch=40).attribute(x, target)
    expected = captum_attr.Occlusion(convnet).attribute(
        x, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride), target=target, baselines=0,
        perturbations_per_eval=64)
    assert_close(ours, expected)


def test_occlusion_defaults_and_params():
    method = Occlusion(frozen(Linear()))
    assert method.windows(32, 32)[:2] == [(0, 4, 0, 4), (0, 4, 2, 6)]  # patch 32 // 8, stride 2
    assert method.params == {"method": "occlusion", "signed": True, "patch": None, "stride": None, "fill": "zero"}
    with pytest.raises(ValueError, match="fill"):
        Occlusion(frozen(Linear()), fill="grey")


# --- extremal perturbation ---

class CentreBox(nn.Module):
    """The logit is the energy of a centred 10 x 10 box (the same under a left-right flip, the paper's jitter)."""

    def forward(self, x):
        energy = x[:, :, 11:21, 11:21].pow(2).mean(dim=(1, 2, 3))
        return torch.stack([energy, -energy], dim=1) * 100


def test_extremal_perturbation_keeps_the_box_the_logit_depends_on():
    x, method = images(2, 32), ExtremalPerturbation(CentreBox(), area=0.1, steps=400)
    explained = method.explain(x, 0)
    mask = explained.maps.sum(1)
    inside = mask[:, 11:21, 11:21].mean((1, 2))
    outside = (mask.sum((1, 2)) - mask[:, 11:21, 11:21].sum((1, 2))) / (32 * 32 - 100)
    assert (inside > 0.8).all() and (inside > 10 * outside).all()
    assert ((explained.info["preserved"] > 0.5) & (explained.info["preserved"] <= 1)).all()
    torch.testing.assert_close(explained.info["area"], mask.mean((1, 2)))
    assert (explained.info["area"] < 0.2).all()  # on its way down to 0.1 (the weight grows for 800 steps)
    again = ExtremalPerturbation(CentreBox(), area=0.1, steps=400).attribute(x[1:], 0)
    torch.testing.assert_close(again, explained.maps[1:])  # deterministic, and alone = batched


class CentreQuarter(nn.Module):
    """The logit is the energy of the central 32 x 32 box of a 64 px image, a quarter of it."""

    def forward(self, x):
        energy = x[:, :, 16:48, 16:48].pow(2).mean(dim=(1, 2, 3))
        return torch.stack([energy, -energy], dim=1) * 10


@pytest.mark.parametrize("area", [0.05, 0.1, 0.2])
def test_the_extremal_mask_keeps_its_area_of_the_image(area):
    """With the paper's schedule (weight 300, x1.0035 a step, 800 steps) the mask's mean over the image is
    within 2 % of the image of its target, although keeping more would keep more of the logit."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    explained = ExtremalPerturbation(CentreQuarter(), area=area, steps=800).explain(x, 0)
    assert abs(float(explained.info["area"][0]) - area) <= 0.02
    if area == 0.1:  # a weight that only grows to 300 (1 at the first step) leaves most of the image on
        weak = type("Weak", (ExtremalPerturbation,), {"LAMBDA": 1.0, "LAMBDA_GROWTH": 300 ** (1 / 800)})
        assert float(weak(CentreQuarter(), area=area, steps=800).explain(x, 0).info["area"][0]) > 0.3


def test_extremal_perturbation_params():
    method = ExtremalPerturbation(CentreBox(), area=0.05, steps=10)
    assert method.params["area"] == 0.05 and method.params["steps"] == 10
    assert {k: method.params[k] for k in ("lr", "momentum", "lambda", "lambda_growth", "levels", "coldness")} == \
        {"lr": 0.01, "momentum": 0.9, "lambda": 300.0, "lambda_growth": 1.0035, "levels": 8, "coldness": 20.0}
    assert method.geometry(224, 224) == (7, 21.0, 20.0) and method.geometry(112, 112) == (4, 10.5, 10.0)
    with pytest.raises(ValueError, match="area"):
        ExtremalPerturbation(CentreBox(), area=1.5)
