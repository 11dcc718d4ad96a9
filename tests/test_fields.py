"""Receptive fields, measured: their side and the true centre of every position, padding included."""

import pytest
import torch
from torch import nn

from atlas.dataset.fields import field_centres, receptive_field
from atlas.dataset.reader import box_of
from atlas.layers import discover


def test_receptive_field_grows_with_depth(tiny):
    found = {l.name: l for l in discover(tiny.model, 32)}
    assert receptive_field(tiny.model, found["conv1"], 32) == 3
    assert receptive_field(tiny.model, found["conv2"], 32) == 5
    assert receptive_field(tiny.model, found["block"], 32) == 13


class SamePad(nn.Module):
    """TensorFlow's "same" padding for a stride-2 3x3 convolution: the extra pixel goes after the image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, stride=2)

    def forward(self, x):
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1)))


@pytest.mark.parametrize("model, offset", [(nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1)), 0.5),
                                           (SamePad(), 1.5)])
def test_field_centres_follow_the_padding(model, offset):
    layer = next(l for l in discover(model, 32) if l.channels == 2)
    oy, sy, ox, sx = field_centres(model, layer, 32)
    assert (sy, sx) == (2.0, 2.0) and oy == pytest.approx(offset) and ox == pytest.approx(offset)
    # position 5's field is input pixels 2*5-1 .. 2*5+1 (symmetric) or 10 .. 12 (after-padded): a box around it
    box = box_of(torch.tensor([5 * layer.width + 5]).numpy(), layer.height, layer.width, 3, 32, [oy, sy, ox, sx])
    assert box.tolist() == ([[9, 9, 12, 12]] if offset == 0.5 else [[10, 10, 13, 13]])
