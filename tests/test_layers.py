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
    assert [l.name for l in L.select(tiny.model, found)] == [
        "conv1", "conv2", "block.conv1", "block.conv2", "block"]
    resnet = torchvision.models.resnet50()
    names = [l.name for l in L.select(resnet, L.discover(resnet, 64))]
    assert names[:5] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3",
                         "layer1.0.downsample.0"]
    assert "layer4.2" in names and "layer1.0.relu@0" not in names and "fc" not in names
    assert sum(n.count(".") == 1 for n in names) == 16  # every bottleneck block
    assert sum(".conv" in n or "downsample.0" in n for n in names) + 1 == 53  # every convolution


def test_default_selection_of_the_embedded_model():
    import timm
    model = timm.create_model("tf_efficientnet_lite0")
    selected = L.select(model, L.discover(model, 224))
    assert selected[0].name == "conv_stem" and selected[-1].name == "conv_head"
    assert len(selected) == 18 and sum(l.channels for l in selected) == 3120


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


def test_receptive_field_grows_with_depth(tiny):
    found = {l.name: l for l in L.discover(tiny.model, 32)}
    assert L.receptive_field(tiny.model, found["conv1"], 32) == 3
    assert L.receptive_field(tiny.model, found["conv2"], 32) == 5
    assert L.receptive_field(tiny.model, found["block"], 32) == 13
