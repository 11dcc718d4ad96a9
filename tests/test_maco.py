"""MACO: natural colour statistics, horama's preconditioner, crops, transparency, batch independence."""

import numpy as np
import pytest
import torch

from atlas.featurevis import maco
from atlas.featurevis import objectives as O
from atlas.featurevis.render import RenderSettings, render
from atlas.featurevis.transforms import Robustness
from atlas.models import IMAGENET_MEAN, IMAGENET_STD


def _colour_correlation(images: torch.Tensor) -> np.ndarray:
    """The 3 x 3 correlation of R, G and B over every pixel of [B, 3, H, W]."""
    x = images.permute(1, 0, 2, 3).reshape(3, -1).double().numpy()
    return np.corrcoef(x)


def _photos(size: int) -> torch.Tensor:
    from atlas.dataset.images import decode, sample_images
    from atlas.models import Preprocess
    pre = Preprocess(size=size, crop_pct=1.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    photos = [p for p, _ in (decode(r.path, pre) for r in sample_images()) if p is not None]
    return torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255.0


def test_random_phases_give_natural_colour_statistics():
    size = 64
    mag = maco.magnitude(size)
    low, high = mag[:, 1:4, 1:4].mean(), mag[:, 28:32, 28:32].mean()
    assert low > 5 * high  # photos: energy falls with frequency
    renders = maco.to_rgb(maco.init_phase(list(range(16)), size), mag)
    natural = _colour_correlation(_photos(size))
    ours = _colour_correlation(renders)
    assert np.abs(ours - natural).max() < 0.15, (ours, natural)
    assert ours[0, 1] > 0.7  # R and G move together, as in photos
    # the deviation this guards against: R, G and B phases drawn apart, no recorrelation, is colour noise
    apart = torch.sigmoid(maco._standardize(torch.fft.irfft2(torch.polar(
        mag.expand(16, -1, -1, -1), torch.rand(16, 3, size, size // 2 + 1) * 6.283), s=(size, size))))
    assert np.abs(_colour_correlation(apart) - natural).max() > 0.5


def test_preconditioner_is_horamas():
    horama = pytest.importorskip("horama.maco_fv")
    size = 48
    mag = maco.magnitude(size)
    phase = maco.init_phase([3], size)
    theirs = horama.maco_preconditioner(mag, phase[0], (-2.5, 2.5), "cpu")
    pixels = maco.to_rgb(phase, mag)[0]  # Atlas keeps pixels; an ImageNet-normalized model sees horama's values
    ours = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    low, high = maco.pixel_range()
    assert (low < 0).all() and (high[:2] > 1).all() and (high - low - 5 * torch.tensor(IMAGENET_STD)).abs().max() < 1e-6
    # the range is in the model's own input space, as horama feeds its image to the model: a model
    # normalized by 0.5 and 0.5 sees horama's values too, from pixels -0.75 to 1.75
    half = maco.to_rgb(phase, mag, (0.5,) * 3, (0.5,) * 3)[0]
    torch.testing.assert_close((half - 0.5) / 0.5, theirs, atol=1e-5, rtol=1e-5)
    low, high = maco.pixel_range((0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(low, torch.full((3,), -0.75))
    torch.testing.assert_close(high, torch.full((3,), 1.75))


def test_crops_are_macos_and_crop_major():
    crops = maco.Crops()
    gens = [torch.Generator().manual_seed(s) for s in range(50)]
    boxes = maco.crop_boxes(gens, 200, crops)
    assert boxes.shape == (50 * crops.count, 5)
    assert torch.equal(boxes[:, 0].long(), torch.arange(50).repeat(crops.count))  # row j * B + i: image i
    sides = (boxes[:, 3] - boxes[:, 1]) / 200
    assert torch.allclose(sides, (boxes[:, 4] - boxes[:, 2]) / 200)  # square
    assert sides.min() >= 0.25 - 1e-6 and sides.max() <= 0.30 + 1e-6
    centres = (boxes[:, 1] + boxes[:, 3]) / 400
    assert abs(centres.mean() - 0.5) < 0.03 and abs(centres.std() - crops.spread) < 0.03
    images = torch.rand(50, 3, 200, 200)
    assert maco.cut(images, boxes, 40).shape == (50 * crops.count, 3, 40, 40)
    # each image draws its own crops: the same boxes alone or among others
    alone = maco.crop_boxes([torch.Generator().manual_seed(7)], 200, crops)
    torch.testing.assert_close(alone[:, 1:], boxes[7::50, 1:])


def test_the_crop_is_roi_align_then_bicubic_in_values_and_gradients():
    from torchvision.ops import roi_align

    def horamas(images, boxes, view):
        big = roi_align(images, boxes, output_size=(2 * view, 2 * view))
        return torch.nn.functional.interpolate(big, size=(view, view), mode="bicubic", align_corners=True,
                                               antialias=True)
    images = torch.rand(2, 3, 160, 160, requires_grad=True)
    drawn = maco.crop_boxes([torch.Generator().manual_seed(s) for s in (1, 2)], 160, maco.Crops())
    odd = torch.tensor([[0, -30.0, -12.5, 40.2, 61.0],  # over the top-left corner
                        [1, 130.0, 140.5, 190.0, 200.0],  # over the bottom-right corner
                        [0, 50.3, 60.7, 50.6, 61.0],  # under a pixel
                        [1, 0.0, 0.0, 160.0, 160.0],  # the whole canvas: several samples per bin
                        [0, 10.0, 20.0, 90.0, 100.0]])
    for boxes in (drawn, odd):
        ours, theirs = maco.cut(images, boxes, 24), horamas(images, boxes, 24)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
        weights = torch.randn_like(ours)
        mine, = torch.autograd.grad((ours * weights).sum(), images)
        ref, = torch.autograd.grad((theirs * weights).sum(), images)
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


def test_over_crops_averages_the_objective_per_image():
    acts = {"a": torch.arange(2 * 3 * 4 * 1 * 1, dtype=torch.float32).reshape(6, 4, 1, 1)}
    objective = O.channel("a", [1, 2])  # image 0 -> channel 1, image 1 -> channel 2
    values = maco.over_crops(objective, 3)(acts)
    # crop-major rows: image 0 is rows 0, 2, 4; image 1 is rows 1, 3, 5
    expected = torch.tensor([(1 + 9 + 17) / 3, (6 + 14 + 22) / 3])
    torch.testing.assert_close(values, expected)


SETTINGS = RenderSettings(size=32, steps=10, param="phase", loss_points=4, redirect_steps=0,
                          robustness=Robustness().scaled(0.25))


def test_maco_rises_keeps_its_size_and_returns_transparency(tiny):
    objective = O.channel("conv2", [0, 3])
    before = render(tiny.model, tiny.preprocess, objective, [5, 6],
                    RenderSettings(**{**SETTINGS.__dict__, "steps": 0})).objective
    result = render(tiny.model, tiny.preprocess, objective, [5, 6], SETTINGS)
    assert SETTINGS.view == 32 + 2 * 3 - 3 and SETTINGS.canvas == 2 * round(35 * 1280 / 224 / 2)
    assert result.images.shape == (2, 32, 32, 3) and result.alpha.shape == (2, 32, 32)
    assert result.alpha.dtype == np.uint8 and result.alpha.max() == 255 and result.alpha.min() < 128
    assert result.objective.mean() > before.mean() and result.finite.all()
    provenance = SETTINGS.provenance()
    assert provenance["optimizer"] == "NAdam" and provenance["canvas"] == SETTINGS.canvas
    with pytest.raises(ValueError, match="param: expected"):
        render(tiny.model, tiny.preprocess, objective, [5, 6], RenderSettings(size=32, steps=1, param="pixels"))


def test_a_maco_image_is_the_same_alone_or_in_a_batch(tiny):
    batch = render(tiny.model, tiny.preprocess, O.channel("conv2", [0, 1, 2]), [4, 5, 6], SETTINGS)
    alone = render(tiny.model, tiny.preprocess, O.channel("conv2", [1]), [5], SETTINGS)
    # the crops and noise are the same numbers in both; the convolutions are not bit-identical across
    # batch sizes or even runs (the CPU kernels block a batch differently, by thread count and load), and
    # the steps carry that float noise into a pixel's rounding: a level here and there (measured: at most
    # half a level on average, 4 at worst), never a picture of its own, which differs by tens of levels
    diff = np.abs(batch.images[1].astype(int) - alone.images[0].astype(int))
    other = np.abs(batch.images[0].astype(int) - alone.images[0].astype(int))
    assert other.mean() > 20
    assert diff.mean() < 0.05 * other.mean() and (diff > 4).mean() < 0.01
    # the objective carries the same float noise through the steps (measured up to 0.2 %)
    np.testing.assert_allclose(batch.objective[1], alone.objective[0], rtol=1e-2, atol=1e-5)
