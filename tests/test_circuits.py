"""Circuits: a unit's inputs by attribution (in the unit-attribution pass) and by weights."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from atlas.attribution.circuits import kernel_slices
from atlas.attribution.units import UnitAttribution, crop_maps, unit_maps
from atlas.layers import LayerInfo


class TwoLayers(nn.Module):
    """a = relu(1x1 conv of the image) with 4 channels, b = 1x1 conv of a: b0 = 2 a1 - a3, b1 = a0 + a2."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)  # overwrites a's output: the inputs must be read before it
        self.b = nn.Conv2d(4, 2, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]).view(4, 3, 1, 1))
            self.b.weight.copy_(torch.tensor([[0.0, 2, 0, -1], [1, 0, 1, 0]]).view(2, 4, 1, 1))

    def forward(self, x):
        return self.b(self.relu(self.a(x)))


def info(name: str, channels: int) -> LayerInfo:
    return LayerInfo(name, name, 0, "Conv2d", channels, 4, 4)


def test_a_units_inputs_are_the_channels_that_drive_it():
    model = TwoLayers().eval().requires_grad_(False)
    x = torch.rand(2, 3, 4, 4) + 0.5
    method = UnitAttribution(model, info("b", 2), batch=8, source=info("a", 4))
    maps, inputs = method.pairs(x, torch.tensor([0, 0]))
    a = torch.relu(model.a(x))
    b0 = model.b(a)[:, 0]
    # the gradient of the spatial max reaches only the arg-max position
    where = b0.flatten(1).argmax(1)
    at = a.flatten(2)[torch.arange(2), :, where]  # [2, 4]: a's channels at b0's peak
    expected = at * torch.tensor([0.0, 2, 0, -1])
    torch.testing.assert_close(inputs, expected)
    torch.testing.assert_close(inputs.sum(1), b0.flatten(1).amax(1))  # no bias: the inputs add up to the peak
    assert (inputs[:, 1] > 0).all() and (inputs[:, 3] < 0).all() and (inputs[:, [0, 2]] == 0).all()
    assert maps.shape == x.shape


def test_unit_maps_average_the_inputs_over_the_top_images():
    model = TwoLayers().eval().requires_grad_(False)
    x = torch.rand(3, 3, 4, 4) + 0.5
    method = UnitAttribution(model, info("b", 2), batch=2, source=info("a", 4))
    index = np.array([[0, 1], [2, -1]])  # unit 0: images 0 and 1; unit 1: image 2 only
    boxes = np.tile(np.array([0, 0, 4, 4]), (2, 2, 1))
    _, inputs = unit_maps(method, lambda i: x[torch.as_tensor(i)], index, boxes, range(2), 4)
    each = [method.pairs(x[i:i + 1], torch.tensor([c]))[1][0] for i, c in ((0, 0), (1, 0), (2, 1))]
    np.testing.assert_allclose(inputs[0], ((each[0] + each[1]) / 2).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inputs[1], each[2].numpy(), rtol=1e-5, atol=1e-6)
    _, none = unit_maps(UnitAttribution(model, info("b", 2), batch=2), lambda i: x[torch.as_tensor(i)],
                        index, boxes, range(2), 4)
    assert none is None


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.relu2 = nn.ReLU()
        self.grouped = nn.Conv2d(5, 5, 3, padding=1, groups=5)
        with torch.no_grad():
            for m in (self.conv2, self.grouped):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
            self.bn2.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0]))
            self.bn2.running_var.copy_(torch.tensor([4.0, 1.0, 0.25, 9.0, 1.0]))

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(x)))
        return self.grouped(y) + y


def test_the_kernel_slice_is_the_convolutions_weights_scaled_by_its_norm():
    model = ConvBN().eval()
    x = torch.rand(1, 3, 8, 8)
    kernel, provenance = kernel_slices(model, "relu1", "relu2", x)
    scale = model.bn2.weight / torch.sqrt(model.bn2.running_var + model.bn2.eps)
    torch.testing.assert_close(kernel, model.conv2.weight * scale.view(-1, 1, 1, 1))
    assert provenance == {"conv": "conv2", "norm": "bn2", "from": "relu1"}
    assert kernel[1].sum().item() == pytest.approx(-2 * model.conv2.weight[1].sum().item(), rel=1e-5)
    # straight into the convolution, without a norm: the raw weights
    kernel, provenance = kernel_slices(model, "relu1", "conv2", x)
    torch.testing.assert_close(kernel, model.conv2.weight)
    assert provenance["norm"] == ""
    # a grouped convolution, and a path through a sum, have no single kernel slice
    assert kernel_slices(model, "relu2", "grouped", x) is None
    assert kernel_slices(model, "bn1", "relu2", x) is not None  # bn1's output is what relu1 overwrites
    assert kernel_slices(model, "conv1", "relu2", x) is None  # bn1 and relu1 lie before the convolution


def test_unit_pages_show_inputs_and_outputs_the_transpose_of_the_next_layers(tmp_path, site_store, crawl):
    import h5py
    from atlas.site.render import render
    store = site_store(tmp_path)
    inputs = np.zeros((300, 6), np.float32)
    inputs[7] = [3.0, -1.0, 0.5, 0.0, -2.0, np.nan]  # unit 7's inputs from conv1's six units
    after = np.zeros((3, 300), np.float32)
    after[:, 7] = [0.25, -4.0, 1.0]  # what unit 7 gives head's three units
    kernel = np.zeros((300, 6, 3, 3), np.float16)
    kernel[7, 0, 1, 1], kernel[7, 4, 0, 0] = 2.0, -1.0
    with h5py.File(store, "r+") as f:
        g = f["layers/block.0.relu@1"].create_group("circuits")
        g.create_dataset("inputs", data=inputs).attrs.update({"from": "conv1", "k": 3})
        g.create_dataset("kernel", data=kernel).attrs.update({"from": "conv1", "conv": "block.0.conv1", "norm": ""})
        h = f['layers/head."q"<i>'].create_group("circuits")
        h.create_dataset("inputs", data=after).attrs.update({"from": "block.0.relu@1", "k": 3})
    render(store, tmp_path / "site", progress=False)
    page = tmp_path / "site" / "tiny" / "block.0.relu-401" / "7.html"
    text = page.read_text()
    names = re.findall(r'<span class="name">([^<]+)</span>', text)
    head = 'head.&#34;q&#34;&lt;i&gt;'
    assert names == ["conv1:0", "conv1:2", "conv1:4", "conv1:1",  # inputs: excitatory, then inhibitory
                     f"{head}:2", f"{head}:0", f"{head}:1"]  # outputs: the column of head's inputs
    assert "Inputs from conv1" in text and f"Outputs to {head}" in text
    cells = re.findall(r'<span class="kernel"[^>]*>(.*?)</span>', text)
    assert len(cells) == 4 and cells[0].count("<i ") == 9
    # conv1:0's +2 at full red; conv1:4's -1 half as blue, on the same scale; conv1:2's zeros white
    assert cells[0].count("rgb(255,0,0)") == 1 and cells[0].count("rgb(255,255,255)") == 8
    assert cells[2].count("rgb(128,128,255)") == 1 and cells[1].count("rgb(255,255,255)") == 9
    crawl(page)
    first = (tmp_path / "site" / "tiny" / "conv1" / "0.html").read_text()
    assert "Outputs to block.0.relu@1" in first and "Inputs from" not in first


def test_units_sharing_a_top_image_share_its_forward_pass_and_get_the_same_maps(tiny):
    """One forward pass per image, one backward round per unit: the maps and inputs of one pass per pair,
    and the gradient of the full model's forward pass."""
    from atlas.layers import Capture
    model = tiny.model
    layer, source = info("conv2", 16), info("relu1", 8)
    x = torch.rand(3, 3, 32, 32)
    image = torch.tensor([0, 2, 0, 0, 1, 2])  # image 0 for three units, image 2 for two
    channel = torch.tensor([1, 5, 7, 1, 3, 0])
    method = UnitAttribution(model, layer, batch=16, source=source)
    forwards = []
    handle = model.register_forward_pre_hook(lambda _m, args: forwards.append(args[0].shape[0]))
    try:
        shared, shared_inputs = method.pairs(x, channel, image)
    finally:
        handle.remove()
    assert forwards == [3]  # three images, one pass
    apart, apart_inputs = method.pairs(x[image], channel)
    torch.testing.assert_close(shared, apart)
    torch.testing.assert_close(shared_inputs, apart_inputs)
    # the truncated pass gives the full model's gradient
    for i in range(len(image)):
        xi = x[image[i]][None].clone().requires_grad_(True)
        with Capture(model, ["conv2"], fn=lambda a: a) as cap:
            peak = cap.run(xi)["conv2"][0, channel[i]].amax()
            assert cap.returned is not None  # the whole model ran
        grad, = torch.autograd.grad(peak, xi)
        torch.testing.assert_close(shared[i], (grad * xi.detach())[0])
    # unit_maps reads each image once per batch and gives the maps of one pair at a time
    index = np.array([[0, 2], [1, 0]])
    boxes = np.tile(np.array([0, 0, 32, 32]), (2, 2, 1))
    read = []

    def pixels(i):
        read.append(list(i))
        return x[torch.as_tensor(i)]
    maps, _ = unit_maps(method, pixels, index, boxes, range(2), 8)
    assert read == [[0, 1, 2]]
    for u, k in ((0, 0), (0, 1), (1, 0), (1, 1)):
        one = method.pairs(x[index[u, k]][None], torch.tensor([u]))[0]
        np.testing.assert_allclose(maps[u, k], crop_maps(one.sum(1), boxes[u, k][None], 8)[0], rtol=1e-5, atol=1e-6)
