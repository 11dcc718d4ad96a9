"""Why zennit's z+ loses relevance, a unit that fires on its bias alone, and where Atlas's rule sends it instead."""

import pytest
import torch
from torch import nn

pytest.importorskip("zennit")
from atlas.attribution.lrp import LRP, canonize  # noqa: E402
from atlas.bench.references_lrp import dropped_relevance, zennit_relevance  # noqa: E402


class BiasOnly(nn.Module):
    """Hand-set 1x1 convolutions: conv1 passes the red channel and a channel that is always 0 (after its ReLU);
    conv2's unit 0 copies the red channel, unit 1 reads only the dead channel and fires on its bias of 1.
    The logit is the sum of both units' means, mean red + 1: unit 1 holds 1 / (1 + mean red) of it, and has no
    input to pass it to.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 1)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 0]]).view(2, 3, 1, 1))
            self.conv1.bias.copy_(torch.tensor([0.0, -1.0]))
            self.conv2.weight.copy_(torch.tensor([[1.0, 0], [0, 1.0]]).view(2, 2, 1, 1))
            self.conv2.bias.copy_(torch.tensor([0.0, 1.0]))
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
            self.fc.bias.zero_()
        self.eval()

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_the_relevance_of_a_bias_only_unit_is_what_zennits_rule_misses():
    model = BiasOnly()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(2, dtype=torch.long)
    red = x[:, 0].mean((1, 2))
    expected = 1 / (1 + red)  # unit 1's share of the logit red + 1
    lrp = LRP(model, dead_units="drop")
    out = lrp.explain(x, target)
    torch.testing.assert_close(out.info["completeness"], expected, rtol=1e-4, atol=1e-6)
    canonical = canonize(model, x[:1])
    dropped = dropped_relevance(canonical, x, target)
    assert set(dropped) == {"conv2"}  # conv1, the first layer, takes the flat rule
    torch.testing.assert_close(torch.as_tensor(dropped["conv2"]), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.maps, zennit_relevance(canonical, lrp, x, target), rtol=0, atol=1e-7)


def test_atlas_hands_a_bias_only_units_relevance_to_its_receptive_field():
    """Every pixel's relevance is (mean red + 1) / 36, evenly over its colours: the spatial mean hands each of the
    36 pixels of both units an equal share, conv2's unit 1 splits its 1 / 36 evenly between its two inputs (the
    flat rule), unit 0 passes its share to the red channel's unit, and conv1, the first layer, spreads each
    unit's relevance evenly over the three colours."""
    model = BiasOnly()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(2, dtype=torch.long)
    lrp = LRP(model)
    assert lrp.params["dead_units"] == "flat"
    out = lrp.explain(x, target)
    expected = ((x[:, 0].mean((1, 2)) + 1) / 36 / 3).view(2, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(out.maps, expected, rtol=1e-4, atol=1e-6)
    assert out.info["completeness"].max() < 1e-5


def test_where_every_unit_has_a_positive_contribution_the_rule_is_zennits():
    model = BiasOnly()
    with torch.no_grad():
        model.conv1.bias.zero_()
        model.conv1.weight[1, 1] = 1.0  # the second channel now passes green: no unit fires on its bias alone
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)) + 0.1
    target = torch.zeros(2, dtype=torch.long)
    ours, theirs = LRP(model), LRP(model, dead_units="drop")
    torch.testing.assert_close(ours.attribute(x, target), theirs.attribute(x, target), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dead_units"):
        LRP(model, dead_units="spread")
