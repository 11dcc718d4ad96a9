"""Extremal Perturbations against torchray, the paper's authors' library (a test dependency)."""

import pytest
import torch

from atlas.attribution.extremal import ExtremalPerturbation, SmoothMask, blur_pyramid, perturbed

torchray = pytest.importorskip("torchray.attribution.extremal_perturbation")


@pytest.mark.parametrize("side, step, sigma", [(224, 7, 21.0), (64, 2, 6.0), (50, 3, 9.0)])
def test_the_smooth_mask_is_torchrays(side, step, sigma):
    # torchray's 9 x 9 neighbourhood of a pixel is centred on its cell when sigma is a multiple of the step
    # (the paper's 21 = 3 x 7); otherwise torchray shifts it by the margin, where Atlas keeps it centred
    param = torch.rand(3, 1, -(-side // step), -(-side // step), generator=torch.Generator().manual_seed(side))
    theirs, frame = torchray.MaskGenerator((side, side), step, sigma).generate(param)
    smooth = SmoothMask(side, side, step, sigma, margin=True)
    pairs = [(SmoothMask(side, side, step, sigma)(param), theirs), (smooth(param), frame),  # frame: margin too
             (smooth.crop(smooth(param)), theirs)]
    for ours, reference in pairs:
        if side == 224:  # the paper's geometry: to the last bit
            assert torch.equal(ours, reference)
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_the_blur_pyramid_and_its_reading_are_torchrays():
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    ours = blur_pyramid(x, 8, 5.0)
    theirs = torchray.Perturbation(x, num_levels=8, max_blur=5.0)
    torch.testing.assert_close(ours[0], theirs.pyramid, atol=1e-5, rtol=0)
    mask = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    mask[0, 0, :4] = 1.0  # the top level, exactly
    torch.testing.assert_close(perturbed(ours.expand(2, -1, -1, -1, -1), mask), theirs.apply(mask),
                               atol=1e-5, rtol=0)


class Centre(torch.nn.Module):
    def forward(self, x):
        energy = x[:, :, 12:20, 10:22].pow(2).mean(dim=(1, 2, 3))
        return torch.stack([energy, 0.5 * x.mean(dim=(1, 2, 3))], dim=1) * 100


def test_the_optimization_is_torchrays_where_the_area_counts_the_same():
    """With the area counted over torchray's frame, Atlas's optimization is torchray's, step for step.

    torchray returns the mask made before its last update, so it runs one iteration more. Counting
    the area over the image instead (Atlas's default), the mask keeps about its nominal area of the
    image, torchray's more (its margin is mostly off).
    """
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    theirs, _ = torchray.extremal_perturbation(Centre(), x, 0, areas=[0.1], max_iter=301, step=1, sigma=3.0)
    same = ExtremalPerturbation(Centre(), area=0.1, steps=300, area_over="frame")
    same.geometry = lambda h, w: (1, 3.0, 20.0)  # torchray's: its blur does not scale with the input
    ours = same.explain(x, 0).maps.sum(1, keepdim=True)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    own = ExtremalPerturbation(Centre(), area=0.1, steps=300)
    own.geometry = same.geometry
    mask = own.explain(x, 0).maps.sum(1)[0]
    assert abs(float(mask.mean()) - 0.1) < abs(float(theirs.mean()) - 0.1)
    assert float(theirs.mean()) > 0.11
    assert own.params["area_over"] == "image" and same.params["area_over"] == "frame"
    with pytest.raises(ValueError, match="area_over"):
        ExtremalPerturbation(Centre(), area_over="margin")
