import pytest
import torch
import torch.nn.functional as F
import torchvision

from atlas import layers as L
from atlas.errors import AtlasError


def test_discovers_every_layer_of_the_tiny_model(tiny):
    found = L.discover(tiny.model, 32)
    assert [l.name for l in found] == [
        "conv1", "relu1", "conv2", "relu2", "block.conv1", "block.relu@0", "block.conv2",
        "block.relu@1", "block", "pool", "fc"]
    by_name = {l.name: l for l in found}
    assert by_name["conv2"].shape == (16, 16, 16)
    assert by_name["fc"].shape == (10, 1, 1)
    assert by_name["block.relu@1"].module == "block.relu" and by_name["block.relu@1"].call == 1


def test_default_selection_of_tiny_and_resnet50(tiny):
    found = L.discover(tiny.model, 32)
    # each convolution as the network passes it on: after its ReLU; block.conv2 is followed by the residual add
    assert [l.name for l in L.select(tiny.model, found)] == [
        "relu1", "relu2", "block.relu@0", "block.conv2", "block"]
    resnet = torchvision.models.resnet50()
    names = [l.name for l in L.select(resnet, L.discover(resnet, 64))]
    assert names[:6] == ["relu", "layer1.0.relu@0", "layer1.0.relu@1", "layer1.0.bn3", "layer1.0.downsample.1",
                         "layer1.0"]
    assert "layer4.2" in names and "layer1.0.conv1" not in names and "layer1.0.relu@2" not in names
    assert sum(n.count(".") == 1 for n in names) == 16  # every bottleneck block
    assert len(names) == 53 + 16  # every convolution, as passed on, and every block


def test_selection_after_a_negative_batchnorm_scale_shows_what_the_network_passes_on():
    """A BatchNorm with a negative scale flips its convolution: the unit is the ReLU after it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([-1.0, 1.0, -2.0, 1.0]))
    found = L.discover(model, 8)
    chosen = L.select(model, found)
    assert [l.name for l in chosen] == ["2", "3"] and chosen[0].pre == "2:in" and chosen[1].pre is None
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with L.Capture(model, ["0", "2", "2:in"]) as cap:
        out = cap.run(x)
    bn = model[1]
    torch.testing.assert_close(out["2:in"], bn(out["0"]))  # the pre-activation: the BatchNorm's output
    torch.testing.assert_close(out["2"], bn(out["0"]).clamp(min=0))  # what the next layer gets
    flipped = out["0"][:, 0] > 0.1  # where the raw convolution fires, the passed-on unit is silent
    assert flipped.any() and (out["2"][:, 0][flipped] == 0).all()


def test_pre_activations_and_chains(tiny):
    by_name = {l.name: l for l in L.discover(tiny.model, 32)}
    assert by_name["relu1"].pre == "relu1:in" and by_name["conv1"].then == "relu1"
    assert by_name["block"].pre == "block.relu@1:in"  # the block's output is the ReLU's after the residual add
    assert by_name["block.conv2"].then is None  # the add in between ends the chain
    assert by_name["conv1"].pre is None and by_name["pool"].pre is None


def test_the_pre_activation_of_an_inplace_relu_is_read_before_it_runs(tiny):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = F.conv2d(x, tiny.model.conv1.weight, tiny.model.conv1.bias, padding=1)
    with L.Capture(tiny.model, ["relu1:in", "relu1", "block.relu@1:in"], stop=True) as cap:
        out = cap.run(x)
    torch.testing.assert_close(out["relu1:in"], expected)
    assert (out["relu1:in"] < 0).any() and cap.returned is None
    with L.Capture(tiny.model, ["block"]) as cap:
        block = cap.run(x)["block"]
    torch.testing.assert_close(out["block.relu@1:in"].clamp(min=0), block)


def test_patterns_and_errors(tiny):
    found = L.discover(tiny.model, 32)
    assert [l.name for l in L.select(tiny.model, found, ["block.*"])] == [
        "block.conv1", "block.relu@0", "block.conv2", "block.relu@1"]
    with pytest.raises(AtlasError, match="'blok.conv9' matches no layer; closest: block.conv"):
        L.select(tiny.model, found, ["blok.conv9"])


def test_inplace_relu_does_not_corrupt_the_captured_conv(tiny):
    """conv1 is followed by ReLU(inplace=True): the capture must keep the negative values."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = F.conv2d(x, tiny.model.conv1.weight, tiny.model.conv1.bias, padding=1)
    with L.Capture(tiny.model, ["conv1", "relu1"]) as cap:
        out = cap.run(x)
    assert (out["conv1"] < 0).any()
    torch.testing.assert_close(out["conv1"], expected)
    torch.testing.assert_close(out["relu1"], expected.clamp(min=0))


def test_module_called_twice_is_two_layers(tiny):
    m = tiny.model
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    h = m.relu2(m.conv2(m.relu1(m.conv1(x))))
    first = F.relu(m.block.conv1(h))
    second = F.relu(m.block.conv2(first) + h)
    with L.Capture(m, ["block.relu@0", "block.relu@1"]) as cap:
        out = cap.run(x)
    torch.testing.assert_close(out["block.relu@0"], first)
    torch.testing.assert_close(out["block.relu@1"], second)


def test_capture_stops_after_the_deepest_layer(tiny):
    seen = []
    handle = tiny.model.fc.register_forward_hook(lambda *a: seen.append(1))
    with L.Capture(tiny.model, ["conv2"], stop=True) as cap:
        out = cap.run(torch.zeros(1, 3, 32, 32))
    handle.remove()
    assert cap.returned is None and not seen and out["conv2"].shape == (1, 16, 16, 16)
