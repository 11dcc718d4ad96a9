"""Caricatures: explained images pushed towards what a layer sees in them, stored and shown on the layer page."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from atlas.featurevis import caricatures as C
from atlas.featurevis import objectives as O
from atlas.featurevis.param import frequency_scale, spectrum_of, spectrum_to_rgb
from atlas.featurevis.render import render
from atlas.featurevis.transforms import Robustness
from atlas.layers import Capture
from atlas.site import render as render_site
from atlas.store.moved import is_compacted


def _photos(n: int = 3, side: int = 32) -> torch.Tensor:
    """Smooth colour blobs with an edge or two, black and white pixels included: [n, 3, side, side] in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    images = []
    for i in range(n):
        blob = torch.exp(-((x - 0.3 * i + 0.3) ** 2 + (y + 0.2 * i) ** 2) * 4)
        edge = (x + 0.5 * y > 0.2 * i - 0.2).float()
        images.append(torch.stack([blob, edge * 0.8, (1 - blob) * (1 - edge)]).clamp(0, 1))
    return torch.stack(images)


def test_the_inverted_parameterization_starts_at_the_photo():
    photos = _photos(2, 48)
    scale = frequency_scale(48)
    back = spectrum_to_rgb(spectrum_of(photos, scale), 48, scale)
    assert torch.equal((back * 255).round(), (photos * 255).round())


@pytest.mark.parametrize("size", [32, 56, 112, 128, 224])
def test_the_transforms_are_cropped_back_to_the_image_side(size):
    r = C.crop_back(Robustness().scaled(min(1.0, size / C.LUCID_SIZE)))
    assert r.frame(size) == size
    assert r.scales == Robustness().scales and r.angles == Robustness().angles


def test_caricatures_raise_the_dot_product_objective_over_the_original_image(tiny, config, tmp_path):
    photos = _photos()
    settings = C.settings_of(config(tmp_path, tmp_path).replace(fv_caricature_steps=24, fv_caricature_lr=0.05), 32)
    for layer in ("conv2", "block"):
        out = C.caricatures(tiny.model, tiny.preprocess, layer, photos, [1, 2, 3], settings)
        # the start value, worked out by hand: the layer's activation on the photo, dotted with itself
        with torch.no_grad(), Capture(tiny.model, [layer]) as cap:
            act = cap.run(tiny.preprocess.normalize(photos))[layer]
        by_hand = (act ** 2).sum((1, 2, 3)) / (act.shape[2] * act.shape[3])
        np.testing.assert_allclose(out["objective_start"], by_hand.numpy(), rtol=1e-3)
        assert out["finite"].all()
        assert (out["objective_end"] > out["objective_start"] * 1.05).all(), (layer, out)
        assert out["images"].shape == (3, 32, 32, 3) and out["images"].dtype == np.uint8
        assert out["loss"].shape[0] == 3


def test_zero_steps_leave_the_photo_as_it_is(tiny, config, tmp_path):
    photos = _photos()
    settings = C.settings_of(config(tmp_path, tmp_path).replace(fv_caricature_steps=0), 32)
    out = C.caricatures(tiny.model, tiny.preprocess, "conv2", photos, [1, 2, 3], settings)
    np.testing.assert_array_equal(out["images"], (photos.permute(0, 2, 3, 1) * 255).round().byte().numpy())
    np.testing.assert_allclose(out["objective_end"], out["objective_start"], rtol=1e-3)


def test_the_start_images_see_the_same_transforms_as_the_image(tiny, config, tmp_path):
    # at lr 0 the image stays the photo, so the dot product with the photo seen through the same
    # transforms is the transformed photo's own squared activation: what `squared` measures directly
    photos = _photos(2)
    settings = C.settings_of(config(tmp_path, tmp_path).replace(fv_caricature_steps=3, fv_caricature_lr=0.0), 32)

    def own(a):
        return (a["conv2"] ** 2).sum((1, 2, 3)) / (a["conv2"].shape[2] * a["conv2"].shape[3])
    squared = O.Objective(own, "squared conv2", frozenset({"conv2"}))
    aligned = render(tiny.model, tiny.preprocess, O.dot("conv2"), [5, 6], settings, start=photos)
    alone = render(tiny.model, tiny.preprocess, squared, [5, 6], settings, start=photos)
    np.testing.assert_allclose(aligned.loss, alone.loss, rtol=1e-2)
    with torch.no_grad(), Capture(tiny.model, ["conv2"]) as cap:
        plain = own(cap.run(tiny.preprocess.normalize(photos))).numpy()
    assert not np.allclose(alone.loss[:, 0], plain, rtol=1e-2)  # the transforms did move the photo
    with pytest.raises(ValueError, match="start"):
        render(tiny.model, tiny.preprocess, O.dot("conv2"), [5, 6], settings)


@pytest.fixture(scope="module")
def built(tmp_path_factory, images, config, build_stages):
    tmp = tmp_path_factory.mktemp("caricatures")
    cfg = config(tmp, images, layers=("conv2", "block"), explain=6, fv_caricatures=3, fv_caricature_steps=8)
    return build_stages(cfg, ("featurevis", "dataset"))


def test_the_stage_writes_and_consolidates_each_layers_caricatures(built):
    ctx, store = built
    assert {k for k in ctx.store.done("featurevis") if C.is_caricature_key(k)} == {"caricatures/conv2",
                                                                                   "caricatures/block"}
    with h5py.File(store, "r") as f:
        explained = f["dataset/source_index"][()][f["dataset/explained"][()]]
        for layer in ("conv2", "block"):
            g = f[f"layers/{layer}/caricatures"]
            index = g["index"][()]
            assert len(index) == 3 and set(index) <= set(explained) and index[0] == explained.min()
            assert index[-1] == explained.max()  # spread over the explained set, both ends included
            assert g["images"].shape == (3, 32, 32, 3) and g["images"].dtype == np.uint8
            assert g["finite"][()].all() and (g["objective_end"][()] > g["objective_start"][()]).all()
            assert g.attrs["steps"] == 8 and g.attrs["lr"] == ctx.config.fv_caricature_lr
            assert g.attrs["parameterization"].startswith("fourier") and "jitter" in g.attrs["transforms"]
            assert "dot product" in g.attrs["objective"]


def test_a_finished_layer_is_not_rendered_again(built, build_stages):
    ctx, _ = built
    parts = sorted((ctx.store.parts / "featurevis").glob("caricatures*.h5"))
    written = [p.stat().st_mtime_ns for p in parts]
    _, store = build_stages(ctx.config, ("featurevis", "dataset"))
    assert len(parts) == 2 and [p.stat().st_mtime_ns for p in parts] == written
    assert all(is_compacted(p) for p in parts)  # the parts handed their images to the store, which serves them
    with h5py.File(store, "r") as f:
        assert f["layers/block/caricatures/images"][()].any()


def test_the_layer_page_shows_each_original_beside_its_caricature(built, tmp_path):
    _, store = built
    model = Path(render_site(store, tmp_path / "site", progress=False)["folder"])
    with h5py.File(store, "r") as f:
        source = f["dataset/source_index"][()]
        rows = {int(source[r]): int(r) for r in f["dataset/explained"][()]}
        index = f["layers/block/caricatures/index"][()]
        start, end = f["layers/block/caricatures/objective_start"][0], f["layers/block/caricatures/objective_end"][0]
    page = (model / "block" / "index.html").read_text()
    assert 'id="caricatures"' in page
    for k, s in enumerate(index):
        row = rows[int(s)]
        assert f'src="../images/{row}.jpg"' in page and (model / "images" / f"{row}.jpg").is_file()
        assert f'href="../images/{row}.html"' in page
        src = next((model / "block").glob(f"caricature-{k}.*"))
        assert f'src="{src.name}"' in page
    assert f"objective ×{end / start:.2f}" in page
    assert page.index('id="caricatures"') < page.index('class="grid"')
