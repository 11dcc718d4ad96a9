import numpy as np
import pytest
import torch

from atlas.featurevis import objectives as O
from atlas.featurevis.param import frequency_scale, init_spectrum, spectrum_to_rgb, unit_seed
from atlas.featurevis.render import RenderSettings, render
from atlas.featurevis.stage import plan
from atlas.layers import Capture

SETTINGS = RenderSettings(size=32, steps=24, lr=0.05, loss_points=6)


def _start_value(tiny, objective, seeds):
    scale = frequency_scale(32)
    with torch.no_grad(), Capture(tiny.model, sorted(objective.layers)) as cap:
        image = spectrum_to_rgb(init_spectrum(seeds, 32), 32, scale)
        return objective(cap.run(tiny.preprocess.normalize(image))).numpy()


@pytest.mark.parametrize("make", [
    lambda: O.channel("conv2", [0, 3, 5]),
    lambda: O.neuron("block", [1, 2, 7]),
    lambda: O.negative_channel("block.conv1", 4),
    lambda: O.direction("conv2", torch.linspace(-1, 1, 16)),
    lambda: O.channel("conv2", 1) + 0.5 * O.diversity("conv2"),
    lambda: O.channel("block", 2) - O.channel("block", 3),
])
def test_each_objective_rises(tiny, make):
    objective = make()
    seeds = [11, 12, 13]
    before = _start_value(tiny, objective, seeds)
    result = render(tiny.model, tiny.preprocess, objective, seeds, SETTINGS)
    assert np.all(result.finite)
    assert result.objective.mean() > before.mean() + 1e-3, (objective.name, before, result.objective)
    assert result.loss.shape == (3, 6)


def test_an_image_is_the_same_alone_or_in_a_batch(tiny):
    seeds = [unit_seed("m", "conv2", c) for c in range(5)]
    batch = render(tiny.model, tiny.preprocess, O.channel("conv2", [0, 1, 2, 3, 4]), seeds, SETTINGS)
    alone = render(tiny.model, tiny.preprocess, O.channel("conv2", [3]), seeds[3:4], SETTINGS)
    assert np.abs(batch.images[3].astype(int) - alone.images[0].astype(int)).max() <= 1
    np.testing.assert_allclose(batch.objective[3], alone.objective[0], rtol=1e-4, atol=1e-5)


def test_the_stored_seed_reproduces_the_image(tiny):
    seeds = [unit_seed("m", "block", 6)]
    a = render(tiny.model, tiny.preprocess, O.channel("block", 6), seeds, SETTINGS)
    b = render(tiny.model, tiny.preprocess, O.channel("block", 6), seeds, SETTINGS)
    assert np.array_equal(a.images, b.images)
    assert unit_seed("m", "block", 6) != unit_seed("m", "block", 7) != unit_seed("m", "conv2", 7)


def test_objective_arithmetic_names_and_layers():
    objective = 2 * O.channel("a", 1) - O.neuron("b", 2)
    assert objective.layers == {"a", "b"}
    assert "channel a:1" in objective.name and "neuron b:2" in objective.name
    acts = {"a": torch.ones(1, 3, 2, 2), "b": torch.full((1, 3, 3, 3), 5.0)}
    assert objective(acts).item() == pytest.approx(2 * 1 - 5)
    with pytest.raises(ValueError, match="channels: got 2 indices for a batch of 1"):
        O.channel("a", [0, 1])(acts)


def test_plan_resumes_from_done_channel_ranges(tiny):
    from atlas.layers import discover, select
    layers = select(tiny.model, discover(tiny.model, 32), ["conv1", "conv2"])
    units = plan(layers, ["channel"], {"channel/conv1/00000-00004", "channel/conv2/00004-00010"},
                 lambda view: 4)
    assert units == [("channel", "conv1", [4, 5, 6, 7]), ("channel", "conv2", [0, 1, 2, 3]),
                     ("channel", "conv2", [10, 11, 12, 13]),
                     ("channel", "conv2", [14, 15])]


class DeadUnit(torch.nn.Module):
    """conv channel 0 = 20 * red - 2: below zero on a grey start image, so its ReLU is dead."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.relu = torch.nn.ReLU(inplace=True)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([20.0, 0.0, 0.0]).view(1, 3, 1, 1))
            self.conv.bias.fill_(-2.0)

    def forward(self, x):
        return self.relu(self.conv(x))


def test_redirected_relu_revives_a_dead_unit():
    from atlas.models import Preprocess
    model = DeadUnit().eval().requires_grad_(False)
    pre = Preprocess(size=16, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    plain = RenderSettings(size=16, steps=40, lr=0.1, redirect_steps=0)
    redirected = RenderSettings(size=16, steps=40, lr=0.1, redirect_steps=16)
    dead = render(model, pre, O.channel("relu", 0), [1], plain)
    alive = render(model, pre, O.channel("relu", 0), [1], redirected)
    assert dead.objective[0] == 0.0
    assert alive.objective[0] > 0.5
    assert "forward" not in vars(model.relu)  # the override is gone afterwards


@pytest.mark.parametrize("upper", [6.0, float("inf")])
def test_redirected_gradient_fused_equals_its_rule(upper):
    from atlas.featurevis.redirect import _GRADIENT
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, 6, generator=gen) * 4
    x[0] = -1.0  # image 0: every input below zero, so no ordinary gradient reaches it
    x[1, :, :3] = 7.0
    grad = torch.randn(4, 5, 6, 6, generator=gen)
    x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    inside = (x > 0) & (x < upper)
    expected = grad * inside
    # the dead image gets the gradient wherever a step would raise its inputs, all below zero
    expected[0] = torch.where(grad[0] > 0, 0.0, grad[0])
    for fuse in (False, True):
        assert torch.equal(_GRADIENT(x, grad, upper, fuse=fuse), expected)


def test_diversity_groups_do_not_pull_on_each_other():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    values = O.diversity("a", [0, 0, 1, 1])({"a": x})
    (grad,) = torch.autograd.grad(values[0], x)
    assert grad[2:].abs().sum() == 0 and grad[1].abs().sum() > 0
    assert O.diversity("a", [0, 1, 2, 3])({"a": x}).abs().sum() == 0


def _lucid_chain(image: torch.Tensor, offsets, angle: int, r) -> torch.Tensor:
    """Lucid's transforms step by step at scale 1: pad with grey, crop, rotate, crop."""
    from torchvision.transforms.functional import InterpolationMode, rotate
    x = torch.nn.functional.pad(image, [r.pad] * 4, value=0.5)
    for (dx, dy), j in zip(offsets, r.jitter):
        if j == r.jitter[-1] and angle:
            x = rotate(x, angle, InterpolationMode.BILINEAR, fill=[0.5] * 3)
        side = x.shape[-1] - j
        x = x[..., dy:dy + side, dx:dx + side]
    return x


@pytest.mark.parametrize("offsets, angle", [([(4, 4), (2, 2)], 0), ([(0, 8), (4, 0)], 0), ([(3, 5), (1, 3)], 7),
                                            ([(8, 1), (0, 4)], -10)])
def test_the_view_is_lucids_transform_chain(monkeypatch, offsets, angle):
    from atlas.featurevis import transforms as T
    r = T.Robustness()
    image = torch.rand(1, 3, 32, 32)
    monkeypatch.setattr(T, "draw", lambda gen, rob: (offsets, 1.0, angle))
    view = T.random_affine(image, [torch.Generator()], r)
    expected = _lucid_chain(image, offsets, angle, r)
    assert view.shape == expected.shape == (1, 3, r.frame(32), r.frame(32))  # the grey pad reaches the model
    # torchvision blends its fill into the rotated frame's edge (a darker seam); compare inside it
    edge = 5 if angle else 0
    inner = (slice(None), slice(None), slice(edge, view.shape[-1] - edge), slice(edge, view.shape[-1] - edge))
    assert torch.allclose(view[inner], expected[inner], atol=1e-4)


def test_transform_draws_follow_lucids_lists():
    from atlas.featurevis.transforms import LUCID_ANGLES, Robustness, draw
    r, gen = Robustness(), torch.Generator().manual_seed(0)
    draws = [draw(gen, r) for _ in range(4000)]
    assert {d[0][0][0] for d in draws} == set(range(9)) and {d[0][1][1] for d in draws} == set(range(5))
    assert {d[1] for d in draws} == set(r.scales) and {d[2] for d in draws} == set(range(-10, 11))
    assert abs(np.mean([d[2] == 0 for d in draws]) - 6 / 26) < 0.03 and len(LUCID_ANGLES) == 26


def test_scale_zooms_the_content_about_the_centre(monkeypatch):
    from atlas.featurevis import transforms as T
    image = torch.zeros(1, 3, 64, 64)
    image[..., 22:42, 22:42] = 1.0  # a centred 20 px square
    for scale in (0.9, 1.1):
        monkeypatch.setattr(T, "draw", lambda gen, rob: ([(4, 4), (2, 2)], scale, 0))
        view = T.random_affine(image, [torch.Generator()], T.Robustness())
        width = float((view[0, 0, view.shape[-1] // 2] - 0.5).clamp(min=0).sum() * 2)
        assert abs(width - 20 * scale) < 1.0, (scale, width)


def test_the_diversity_view_is_lucids_objective_at_lucids_weight():
    from atlas.config import Config
    from atlas.featurevis.stage import objective_of
    cfg = Config()
    acts = {"l": torch.rand(2 * cfg.fv_diversity, 6, 5, 5)}
    k = cfg.fv_diversity
    ours = objective_of("diversity", "l", [1, 4], cfg)(acts)
    for unit, channel_index in enumerate((1, 4)):  # Lucid: mean channel - 1e2 * sum_{i != j} <g_i, g_j> / n
        a = acts["l"][unit * k:(unit + 1) * k]
        g = torch.nn.functional.normalize(torch.einsum("bchw,bdhw->bcd", a, a).flatten(1), dim=1)
        pairs = (g @ g.T).sum() - (g @ g.T).diag().sum()
        lucid = a[:, channel_index].mean() - 1e2 * pairs / k
        assert torch.allclose(ours[unit * k:(unit + 1) * k].sum() / k, lucid, rtol=1e-5)


def test_a_diversity_set_differs_in_style(tiny):
    def gram_similarity(a: torch.Tensor) -> float:
        g = torch.nn.functional.normalize(torch.einsum("bchw,bdhw->bcd", a, a).flatten(1), dim=1)
        s = g @ g.T
        return float((s.sum() - s.diag().sum()) / (len(a) * (len(a) - 1)))
    settings, seeds = RenderSettings(size=32, steps=48), [1, 2, 3, 4]
    alone = render(tiny.model, tiny.preprocess, O.channel("block", [1] * 4), seeds, settings)
    mixed = render(tiny.model, tiny.preprocess, O.channel("block", [1] * 4) + 100 * O.diversity("block"), seeds,
                   settings)
    assert gram_similarity(alone.acts["block"]) > 0.9 > 0.6 > gram_similarity(mixed.acts["block"])


def test_the_negative_view_moves_a_channel_silent_at_the_start():
    """A ReLU channel that is zero on the start image: only its pre-activation gives the negative view a gradient."""
    from atlas import models
    tiny = models.load("atlas:tiny_convnet")
    with torch.no_grad():
        tiny.model.conv1.bias[0] = -5.0  # silent everywhere on a grey start image
    settings, seeds = RenderSettings(size=32, steps=24), [3]
    start = _start_value(tiny, O.channel("relu1:in", 0), seeds)
    assert _start_value(tiny, O.channel("relu1", 0), seeds) == 0
    on_pre = render(tiny.model, tiny.preprocess, O.negative_channel("relu1", 0, pre="relu1:in"), seeds, settings)
    on_post = render(tiny.model, tiny.preprocess, O.negative_channel("relu1", 0), seeds, settings)
    assert -on_pre.objective[0] < start[0] - 0.1  # the pre-activation went down
    assert "relu1" in on_pre.acts and (on_pre.acts["relu1"][0, 0] == 0).all()
    plain = render(tiny.model, tiny.preprocess, O.channel("relu1", 0), seeds, RenderSettings(size=32, steps=0)).images
    assert np.array_equal(on_post.images, plain)  # flat on the ReLU's output: the image never moves
    assert not np.array_equal(on_pre.images, plain)


@pytest.mark.parametrize("upsample", [True, False])
def test_the_model_sees_the_frame_at_its_input_size(tiny, upsample):
    """Lucent's upsampling: every step's frame and the final image reach the model at its input side
    (the tiny model's 32 px) when smaller; without it, at their own side."""
    seen = []
    handle = tiny.model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    settings = RenderSettings(size=12, steps=3, loss_points=1, robustness=RenderSettings().robustness.scaled(0.1),
                              upsample=upsample)
    try:
        render(tiny.model, tiny.preprocess, O.channel("conv2", 0), [5], settings)
    finally:
        handle.remove()
    frame = settings.view
    assert frame < tiny.preprocess.size == 32
    assert set(seen) == ({(32, 32)} if upsample else {(frame, frame), (12, 12)}), seen
