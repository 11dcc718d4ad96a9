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
    ours = SmoothMask(side, side, step, sigma)(param)
    theirs, _ = torchray.MaskGenerator((side, side), step, sigma).generate(param)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


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


def test_the_optimization_matches_torchrays_where_the_area_counts_the_same():
    """torchray counts the area over the mask's whole frame, its margin included; Atlas over the image.

    Given torchray's geometry (its blur does not scale with the input), the two
    optimizations keep the same region (IoU of the masks above one half), and
    torchray's mask keeps more of the image than the nominal area, Atlas's
    about the nominal area.
    """
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    method = ExtremalPerturbation(Centre(), area=0.1, steps=300)
    method.geometry = lambda h, w: (1, 3.0, 20.0)
    ours = method.explain(x, 0)
    theirs, _ = torchray.extremal_perturbation(Centre(), x, 0, areas=[0.1], max_iter=300, step=1, sigma=3.0)
    a, b = ours.maps.sum(1)[0] > 0.5, theirs[0, 0] > 0.5
    assert (a & b).sum() / (a | b).sum() > 0.8
    assert a.float().mean() < b.float().mean()
