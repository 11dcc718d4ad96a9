"""The feature-visualization stage: every view stored, quality derived, faults handled per unit."""

import h5py
import numpy as np
import pytest
import torch

from atlas import pipeline
from atlas.featurevis import stage
from atlas.layers import Capture
from atlas.store.schema import VIEWS


@pytest.fixture(scope="module")
def few_images(tmp_path_factory, make_images):
    return make_images(tmp_path_factory.mktemp("images"), n=6)


def test_every_view_is_stored_with_its_shape_and_quality(tmp_path, few_images, config, build_stages):
    cfg = config(tmp_path, few_images, layers=("conv2", "block"), fv_views=VIEWS, fv_diversity=3,
                 fv_batch=12)
    ctx, path = build_stages(cfg, stages=("featurevis", "dataset"))
    with h5py.File(path) as f:
        g = f["layers/block/featurevis"]
        assert g["channel"].shape == g["negative"].shape == g["neuron"].shape == (16, 32, 32, 3)
        assert g["diversity"].shape == (16, 3, 32, 32, 3) and g["diversity_seed"].shape == (16, 3)
        assert g["diversity_done"][...].all() and g["negative_done"][...].all()
        assert len(set(g["diversity_seed"][0])) == 3
        # block's output is a ReLU's: the negative view minimizes the pre-activation, pushed below zero
        assert g["negative"].attrs["objective"] == "negative block.relu@1:in:[1 channels] (pre-activation)"
        with torch.no_grad(), Capture(ctx.loaded.model, ["block.relu@1:in"]) as cap:
            pre = {v: cap.run(ctx.loaded.preprocess.from_uint8(g[v][...]))["block.relu@1:in"] for v in
                   ("channel", "negative")}
        own = torch.arange(16)
        low, high = (pre[v][own, own].mean((1, 2)) for v in ("negative", "channel"))
        assert (low < high).all()
        torch.testing.assert_close(-low, torch.from_numpy(g["negative_objective"][...]), atol=0.02, rtol=0.02)
        best = f["layers/block/topk/value"][:, 0]
        np.testing.assert_allclose(g["quality"][...], g["channel_peak"][...] / best, rtol=1e-6)
        assert g["channel"].attrs["view"] == "channel" and g["diversity"].attrs["objective"].startswith(
            "channel block:")


def test_non_finite_images_are_rendered_again_then_flagged(tmp_path, few_images, monkeypatch, config,
                                                           build_stages):
    calls = []
    real = stage.render

    def flaky(model, pre, objective, seeds, settings, device):
        result = real(model, pre, objective, seeds, settings, device)
        calls.append(len(seeds))
        if len(calls) == 1:
            result.finite[1] = False  # the first batch's second image "diverged"
            result.objective[1] = np.nan
        if len(calls) == 2:
            result.finite[:] = False  # and so does its retry
        return result
    monkeypatch.setattr(stage, "render", flaky)
    _, path = build_stages(config(tmp_path, few_images, layers=("conv1",), fv_batch=8), stages=("featurevis",))
    assert calls == [8, 1]
    with h5py.File(path) as f:
        done = f["layers/conv1/featurevis/channel_done"][...]
        assert done.tolist() == [True, False] + [True] * 6


def test_out_of_memory_halves_the_batch(tmp_path, few_images, monkeypatch, config):
    sizes = []
    real = stage.render

    def small_gpu(model, pre, objective, seeds, settings, device):
        sizes.append(len(seeds))
        if len(seeds) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, pre, objective, seeds, settings, device)
    monkeypatch.setattr(stage, "render", small_gpu)
    cfg = config(tmp_path, few_images, layers=("conv1",), fv_batch=8)
    ctx = pipeline.prepare(cfg, progress=False)
    path = pipeline.run_stages(ctx, ["featurevis"])
    assert sizes[:4] == [8, 4, 2, 2]
    assert sorted(ctx.store.done("featurevis")) == [f"channel/conv1/{a:05d}-{a + 2:05d}" for a in (0, 2, 4, 6)]
    with h5py.File(path) as f:
        assert f["layers/conv1/featurevis/channel_done"][...].all()


def test_the_stage_alone_fills_every_channel_and_renders(tmp_path, images, config):
    """`pipeline.build` of the stage alone: every channel of every default layer, and the site's report."""
    cfg = config(tmp_path, images, fv_batch=5)
    built = pipeline.build(cfg, stages=("featurevis",), progress=False)
    path = built.store
    assert path == cfg.store_dir / "atlas-tiny_convnet.h5"
    assert built.site["folder"] == str(cfg.site_dir / "atlas-2Dtiny_convnet") and built.site["pages"] > 72
    assert not built.site["over_budget"] and built.site["views_note"] is None
    assert (cfg.site_dir / "index.html").is_file()
    with h5py.File(path) as f:
        assert len(f["layers"]) == 5  # the default selection
        for layer in f["layers"]:
            g = f[f"layers/{layer}/featurevis"]
            assert g["channel_done"][...].all()
            assert g["channel"].shape == (f[f"layers/{layer}"].attrs["channels"], 32, 32, 3)
            assert g["channel"].attrs["steps"] == 4
            assert np.isfinite(g["channel_objective"][...]).all()


def test_maco_renders_store_their_transparency_and_the_site_fades_by_it(tmp_path, few_images, config):
    from PIL import Image

    from atlas.site.data import Faded, pictures
    cfg = config(tmp_path, few_images, layers=("conv2",), fv_param="phase", fv_batch=8)
    built = pipeline.build(cfg, stages=("featurevis",), progress=False)
    with h5py.File(built.store) as f:
        g = f["layers/conv2/featurevis"]
        assert g["channel_alpha"].shape == g["channel"].shape[:-1] and g["channel_alpha"].dtype == np.uint8
        assert g["channel"].attrs["optimizer"] == "NAdam" and "MACO" in g["channel"].attrs["parameterization"]
        assert g["channel_done"][...].all()
        shown = pictures(f["layers/conv2"])["channel"]
        assert isinstance(shown, Faded)
        alpha = g["channel_alpha"][0].astype(float)[..., None] / 255
        expected = g["channel"][0] * alpha + 128 * (1 - alpha)
        faded = shown[0].astype(float)
        assert np.abs(faded - expected).max() <= 0.5
    picture = next((cfg.site_dir / "atlas-2Dtiny_convnet").glob("conv2/0.*"))
    with Image.open(picture) as im:  # what the site wrote is the faded picture, within lossy coding
        written = np.asarray(im.convert("RGB"), float)
    assert np.abs(written - faded).mean() < 12
