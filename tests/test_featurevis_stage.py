"""The feature-visualization stage: every view stored, quality derived, faults handled per unit."""

import h5py
import numpy as np
import pytest
import torch

from atlas import pipeline
from atlas.featurevis import stage
from test_pipeline import build, config, make_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), n=6)


def test_every_view_is_stored_with_its_shape_and_quality(tmp_path, images):
    cfg = config(tmp_path, images, layers=("conv2", "block"), fv_views=stage.VIEWS, fv_diversity=3,
                 fv_batch=12)
    _, path = build(cfg, stages=("featurevis", "dataset"))
    with h5py.File(path) as f:
        g = f["layers/block/featurevis"]
        assert g["channel"].shape == g["negative"].shape == g["neuron"].shape == (16, 32, 32, 3)
        assert g["diversity"].shape == (16, 3, 32, 32, 3) and g["diversity_seed"].shape == (16, 3)
        assert g["diversity_done"][...].all() and g["negative_done"][...].all()
        assert len(set(g["diversity_seed"][0])) == 3
        assert (g["negative_objective"][...] < g["channel_objective"][...]).all()
        best = f["layers/block/topk/value"][:, 0]
        np.testing.assert_allclose(g["quality"][...], g["channel_peak"][...] / best, rtol=1e-6)
        assert g["channel"].attrs["view"] == "channel" and g["diversity"].attrs["objective"].startswith(
            "channel block:")


def test_non_finite_images_are_rendered_again_then_flagged(tmp_path, images, monkeypatch):
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
    _, path = build(config(tmp_path, images, layers=("conv1",), fv_batch=8), stages=("featurevis",))
    assert calls == [8, 1]
    with h5py.File(path) as f:
        done = f["layers/conv1/featurevis/channel_done"][...]
        assert done.tolist() == [True, False] + [True] * 6


def test_out_of_memory_halves_the_batch(tmp_path, images, monkeypatch):
    sizes = []
    real = stage.render

    def small_gpu(model, pre, objective, seeds, settings, device):
        sizes.append(len(seeds))
        if len(seeds) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, pre, objective, seeds, settings, device)
    monkeypatch.setattr(stage, "render", small_gpu)
    cfg = config(tmp_path, images, layers=("conv1",), fv_batch=8)
    ctx = pipeline.prepare(cfg, progress=False)
    path = pipeline.run_stages(ctx, ["featurevis"])
    assert sizes[:4] == [8, 4, 2, 2]
    assert sorted(ctx.store.done("featurevis")) == [f"channel/conv1/{a:05d}-{a + 2:05d}" for a in (0, 2, 4, 6)]
    with h5py.File(path) as f:
        assert f["layers/conv1/featurevis/channel_done"][...].all()
