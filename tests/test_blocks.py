"""Image building blocks: activation x gradient of the top-1 logit per unit, neuron groups by NMF,
their store layout and their section on the image pages."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from atlas.attribution.blocks import contributions, neuron_groups, nmf_layers, strongest
from atlas.models.tiny import ColorProbe
from atlas.site import render
from atlas.site.blocks import PALETTE, groups_picture


def _probe(weights: list[float], bias: float) -> ColorProbe:
    """The colour probe whose class 0 weighs colour channel c by weights[c]: logit 0 = sum_c w_c mean(x_c) + bias."""
    model = ColorProbe().eval()
    with torch.no_grad():
        model.fc.weight[0] = torch.tensor(weights)
        model.fc.bias[0] = bias
    return model


def test_contributions_add_up_to_the_logit_above_a_linear_head():
    model = _probe([0.5, 3.0, -1.0], bias=0.25)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    found, acts, logit = contributions(model, ["probe"], x, torch.zeros(3, dtype=torch.long))
    expected = torch.tensor([0.5, 3.0, -1.0]) * x.mean((2, 3))  # worked out by hand: w_c * mean of colour c
    torch.testing.assert_close(found["probe"], expected)
    torch.testing.assert_close(found["probe"].sum(1), logit - 0.25)
    units, values = strongest(found["probe"].numpy(), 2)
    assert (units[:, 0] == 1).all()  # green carries the largest weight
    assert values.shape == (3, 2) and np.allclose(values[:, 0], expected[:, 1].numpy())


def test_every_layer_from_one_pass_despite_in_place_activations(convnet):
    """tiny_convnet: ReLU(inplace) overwrites conv1's output; the pooled head is linear above `block`."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 7])
    found, acts, logit = contributions(convnet, ["conv1", "block"], x, target)
    torch.testing.assert_close(acts["conv1"], convnet.conv1(x))  # before the in-place ReLU
    assert (acts["conv1"] < 0).any()
    torch.testing.assert_close(found["block"].sum(1), logit - convnet.fc.bias[target], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(logit, convnet(x)[[0, 1], target])


def test_neuron_groups_find_two_disjoint_groups():
    act = np.zeros((6, 4, 4), np.float32)
    act[[0, 1, 2], :, :2] = np.array([1.0, 0.5, 0.8])[:, None, None]  # left half: channels 0-2
    act[[3, 4], :, 2:] = np.array([0.7, 1.0])[:, None, None]  # right half: channels 3-4
    act[5] = -1  # negative everywhere: clipped away
    maps, channels, weights, directions = neuron_groups(act, 2, max_iter=500)
    assert maps.shape == (2, 4, 4) and (maps >= 0).all() and (weights >= 0).all()
    left = int(np.argmax(maps[:, 0, 0]))
    right = 1 - left
    assert np.allclose(maps[left][:, 2:], 0, atol=1e-3) and np.allclose(maps[right][:, :2], 0, atol=1e-3)
    assert set(channels[left][weights[left] > 1e-3]) == {0, 1, 2}
    assert set(channels[right][weights[right] > 1e-3]) == {3, 4}
    basis = np.zeros((2, 6), np.float32)
    for g in range(2):
        basis[g, channels[g]] = weights[g]
    rebuilt = np.einsum("ghw,gc->chw", maps, basis)
    np.testing.assert_allclose(rebuilt, np.maximum(act, 0), atol=1e-3)
    np.testing.assert_allclose(directions, basis, atol=1e-6)  # the whole direction: here 5 channels at most


def test_neuron_groups_keep_the_configured_count():
    act = np.random.default_rng(0).random((10, 3, 3)).astype(np.float32)
    maps, channels, weights, directions = neuron_groups(act, 4)
    assert maps.shape == (4, 3, 3) and channels.shape == weights.shape == (4, 5) and directions.shape == (4, 10)
    np.testing.assert_allclose(np.take_along_axis(directions, channels, 1), weights, rtol=1e-6)
    assert (maps >= 0).all() and np.isclose(weights.max(1), 1).all()
    totals = maps.sum((1, 2))
    assert (np.diff(totals) <= 1e-6).all()  # strongest group first
    silent, _, none, _ = neuron_groups(-act, 4)
    assert not silent.any() and not none.any()


def test_groups_picture_tints_each_pixel_by_its_strongest_group():
    photo = np.full((2, 2, 3), 255, np.uint8)
    maps = np.zeros((2, 2, 2), np.float32)
    maps[0, 0, 0], maps[1, 1, 1] = 1.0, 0.5
    picture = groups_picture(photo, maps)
    red, blue = (np.array([int(PALETTE[g][k:k + 2], 16) for k in (1, 3, 5)]) for g in (0, 1))
    assert np.abs(picture[0, 0].astype(int) - (255 * 0.3 + red * 0.7)).max() <= 1
    assert np.abs(picture[1, 1].astype(int) - (255 * 0.65 + blue * 0.35)).max() <= 1
    assert (picture[0, 1] == 255).all()


def test_nmf_layers_are_the_deepest_spatial_ones(tiny):
    from atlas.layers import discover
    layers = discover(tiny.model, tiny.input_size)
    assert [l.name for l in nmf_layers(layers, 1)] == ["block"]  # fc and the pool have one position
    assert nmf_layers(layers, 0) == []


@pytest.fixture(scope="module")
def built(tmp_path_factory, images, config, build_stages):
    tmp = tmp_path_factory.mktemp("blocks")
    cfg = config(tmp, images, explain=5, attr_blocks_groups=3, fv_directions=True)
    ctx, store = build_stages(cfg, ("featurevis", "dataset", "attribution"))
    return ctx, store


def test_stage_writes_and_consolidates_the_blocks(built):
    ctx, store = built
    names = [layer.name for layer in ctx.layers]
    with h5py.File(store, "r") as f:
        g = f["blocks"]
        n = len(f["dataset/explained"])
        assert g["units"].shape == (n, len(names), 8) and g["units"].dtype == np.int32
        assert g["contribution"].shape == (n, len(names), 8) and g["total"].shape == (n, len(names))
        nmf = g["nmf/block"]
        assert nmf["maps"].shape == (n, 3, 16, 16) and nmf["maps"].dtype == np.float16
        assert nmf["units"].shape == nmf["weights"].shape == (n, 3, 5)
        assert (nmf["maps"][()] >= 0).all() and (nmf["units"][()] >= 0).all()
        np.testing.assert_array_equal(g["target"][()], f["attribution/gradient/target"][()])
        np.testing.assert_allclose(g["logit"][()], f["attribution/gradient/score"][()], rtol=1e-5)
        # `block` feeds the pooled linear head: its units add up to the logit minus the bias
        bias = ctx.loaded.model.fc.bias.detach().numpy()[g["target"][()]]
        np.testing.assert_allclose(g["total"][:, names.index("block")], g["logit"][()] - bias, rtol=1e-4, atol=1e-5)
        contribution = g["contribution"][()]
        assert (np.diff(np.abs(contribution), axis=2) <= 1e-7).all()  # strongest first
        assert g.attrs["method"].startswith("activation x gradient") and g.attrs["groups"] == 3


def test_each_neuron_group_gets_a_feature_visualization_of_its_direction(built):
    from atlas.featurevis import objectives as O
    from atlas.featurevis.param import unit_seed
    from atlas.featurevis.render import render as render_fv
    from atlas.featurevis.stage import settings_of
    ctx, store = built
    with h5py.File(store, "r") as f:
        d = f["directions/block"]
        explained = f["dataset/source_index"][()][f["dataset/explained"][()]]
        np.testing.assert_array_equal(np.sort(d["index"][()]), np.sort(explained))
        assert d["images"].shape == (5, 3, 32, 32, 3) and d["images"].dtype == np.uint8
        row = int(np.flatnonzero(d["index"][()] == explained[0])[0])
        vectors = f["blocks/nmf/block/directions"][0].astype(np.float32)  # the first explained image's groups
        done, objective = d["done"][row], d["objective"][row]
    assert done.all() == bool((np.abs(vectors).sum(1) > 0).all()) and done.any()
    # the rendered image raises the direction's objective above the start image's
    g = int(np.flatnonzero(done)[0])
    seed = unit_seed(ctx.loaded.spec, "block", int(explained[0]) * 3 + g, ctx.config.seed, "direction")
    start = render_fv(ctx.loaded.model, ctx.loaded.preprocess, O.direction("block", torch.as_tensor(vectors[g:g + 1])),
                      [seed], settings_of(ctx.config.replace(fv_steps=0)))
    assert objective[g] > start.objective[0]


def test_resume_skips_done_chunks(built, build_stages):
    ctx, store = built
    parts = sorted((ctx.store.parts / "attribution").glob("blocks*.h5"))
    written = [p.stat().st_mtime_ns for p in parts]
    build_stages(ctx.config, ("attribution",))
    assert parts and [p.stat().st_mtime_ns for p in parts] == written


def test_image_page_shows_the_building_blocks(built, tmp_path, crawl):
    ctx, store = built
    model = Path(render(store, tmp_path / "site", progress=False)["folder"])
    with h5py.File(store, "r") as f:
        row = int(f["dataset/explained"][0])
        first = f["blocks/units"][0, -1, 0]  # the deepest layer's strongest unit
        groups = f["blocks/nmf/block/units"][0]
    page = (model / "images" / f"{row}.html").read_text()
    assert 'id="building-blocks"' in page
    assert f'href="../block/{first}.html"' in page and f'src="../block/{first}.' in page
    assert page.index("<a href=\"../block/index.html\">block</a>") < page.index("relu1</a>")  # deepest first
    assert f'src="{row}-groups-0.' in page and any((model / "images").glob(f"{row}-groups-0.*"))
    assert len(re.findall(r'class="swatch"', page)) == 3
    assert len(re.findall(rf'class="direction" src="{row}-groups-0-\d\.', page)) == 3  # each group's direction
    assert f'title="block unit {groups[0][0]}, weight' in page
    crawl(model / "images" / f"{row}.html")
