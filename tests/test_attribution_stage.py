"""The attribution stage end to end on the tiny model: maps, true-label maps, unit attributions, checks."""

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atlas import pipeline
from atlas.attribution.base import InputSpace
from atlas.attribution.gradients import SmoothGrad
from atlas.attribution.units import UnitAttribution
from atlas.layers import Capture

METHODS = ("gradient", "smoothgrad", "smoothgrad_sq", "vargrad", "integrated_gradients", "grad_cam",
           "lrp_epsilon_plus_flat", "extremal_perturbation")
# every method above with few steps, the checks and the unit attributions, small
SETTINGS = dict(topk=3, attr_methods=METHODS, attr_steps=8, attr_samples=6, attr_check_images=2, attr_extremal_steps=4,
                attr_check_groups=3, attr_check_points=5, attr_unit_topk=2, attr_unit_size=8, data_unit=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory, make_images, config):
    root = tmp_path_factory.mktemp("stage")
    cfg = config(root, make_images(root / "images", n=10), **SETTINGS)
    ctx = pipeline.prepare(cfg, progress=False)
    return ctx, pipeline.run_stages(ctx, ("dataset", "attribution"))


def maps_of(g: h5py.Group, key: str = "maps") -> np.ndarray:
    scale = g["scale" if key == "maps" else "label_scale"][...]
    return g[key][...].astype(np.float32) * scale[:, None, None]


def test_every_method_has_a_map_per_image(built):
    _, path = built
    with h5py.File(path) as f:
        n, size = f["dataset/images"].shape[:2]
        top1 = f["dataset/top5"][:, 0]
        for name in METHODS:
            g = f[f"attribution/{name}"]
            assert g["maps"].shape == (n, size, size)
            np.testing.assert_array_equal(g["target"][...], top1)
            assert np.isfinite(maps_of(g)).all() and np.abs(maps_of(g)).max() > 0
            path_method = name == "integrated_gradients"
            conserving = path_method or name.startswith("lrp_")  # IG's completeness, LRP's conservation
            assert np.isfinite(g["completeness"][...]).all() == conserving
            assert (g["steps"][...] >= 3).all() == path_method  # the adaptive rule starts with 3 points
            extremal = name == "extremal_perturbation"  # its achieved area and preserved logit are kept
            assert np.isfinite(g["area"][...]).all() == np.isfinite(g["preserved"][...]).all() == extremal
        ig = f["attribution/integrated_gradients"]
        failures = int((ig["completeness"][...] > 0.01).sum())
        assert ig.attrs["completeness_failures"] == failures
        assert ig["maps"].attrs["baseline"] == "black" and ig["maps"].attrs["rule"] == "adaptive"
        lrp = f["attribution/lrp_epsilon_plus_flat"]  # the tiny network's residual sum is canonized: relevance conserved
        assert lrp["completeness"][...].max() < 1e-3 and "1 residual sums" in lrp["maps"].attrs["canonization"]


def test_label_maps_explain_the_true_class(built):
    ctx, path = built
    with h5py.File(path) as f:
        labels, top1 = f["dataset/labels"][...], f["dataset/top5"][:, 0]
        g = f["attribution/gradient"]
        label_maps, maps = maps_of(g, "label_maps"), maps_of(g)
        np.testing.assert_array_equal(g["label_target"][...], labels)
        assert np.isnan(label_maps[labels < 0]).all()
        same, other = (labels == top1), (labels >= 0) & (labels != top1)
        assert same.any() or other.any()
        np.testing.assert_allclose(label_maps[same], maps[same])
        x = ctx.loaded.preprocess.from_uint8(f["dataset/images"][...]).requires_grad_(True)
        ctx.loaded.model(x).gather(1, torch.from_numpy(np.maximum(labels, 0))[:, None]).sum().backward()
        expected = x.grad.sum(1).numpy()
        for i in np.nonzero(other)[0]:
            np.testing.assert_allclose(label_maps[i], expected[i], atol=2e-3 * np.abs(expected[i]).max())


def test_smoothgrad_variants_share_their_noise_and_match_the_method(built):
    ctx, path = built
    cfg = ctx.config
    with h5py.File(path) as f:
        x = ctx.loaded.preprocess.from_uint8(f["dataset/images"][:2])
        source, top1 = f["dataset/source_index"][:2], f["dataset/top5"][:2, 0]
        for variant, name in SmoothGrad.VARIANTS.items():
            stored = maps_of(f[f"attribution/{name}"])[:2]
            for i in range(2):
                method = SmoothGrad(ctx.loaded.model, InputSpace.of(ctx.loaded.preprocess), samples=cfg.attr_samples,
                                    noise=cfg.attr_noise, variant=variant, seed=cfg.seed + int(source[i]),
                                    adaptive=cfg.attr_smoothgrad_adaptive)
                expected = method.attribute(x[i:i + 1], int(top1[i])).sum(1)[0].numpy()
                np.testing.assert_allclose(stored[i], expected, atol=2e-3 * np.abs(expected).max())


def test_unit_attribution_is_gradient_x_input_of_the_channel_peak(built):
    ctx, path = built
    with h5py.File(path) as f:
        layer = "relu2"
        g = f[f"layers/{layer}"]
        maps = g["unit_attribution/maps"]
        assert maps.shape == (g.attrs["channels"], 2, 8, 8)
        assert g["unit_attribution"].attrs["method"] == "gradient_x_input"
        channel = 5
        row, (x0, y0, x1, y1) = g["topk/index"][channel, 0], g["topk/box"][channel, 0]
        x = ctx.loaded.preprocess.from_uint8(f["dataset/images"][row:row + 1]).requires_grad_(True)
        with Capture(ctx.loaded.model, [layer], fn=lambda a: a, stop=True) as cap:
            cap.run(x)[layer][0, channel].amax().backward()
        full = (x.grad * x).sum(1, keepdim=True).detach()[:, :, y0:y1, x0:x1]
        mode = "area" if full.shape[-1] >= 8 else "bilinear"
        expected = F.interpolate(full, size=(8, 8), mode=mode)[0, 0].numpy()
        stored = maps[channel, 0].astype(np.float32) * g["unit_attribution/scale"][channel, 0]
        np.testing.assert_allclose(stored, expected,
                                   atol=2e-3 * np.abs(expected).max() + 1e-6)


def test_checks_hold_every_method_and_the_control(built):
    _, path = built
    with h5py.File(path) as f:
        checks = f["checks"]
        rows = checks["images"][...]
        assert rows.shape == (2,) and (rows < f["dataset/images"].shape[0]).all()
        assert checks["fractions"].shape == (5,)
        for name in METHODS:
            g = checks[name]
            assert g["randomization"].attrs["verdict"] in ("pass", "fail")
            assert g["randomization/cascading/spearman_abs"].shape == (3, 2)
            assert g["random_logit/target"].shape == (2,)
            assert g["deletion/mean"].shape == (2, 5)
        assert checks["random/deletion/blur"].shape == (2, 5)


def test_adding_a_method_computes_only_that_method(tmp_path, make_images, config):
    data = make_images(tmp_path / "images", n=6)
    cfg = config(tmp_path, data, **{**SETTINGS, "attr_methods": ("gradient",), "attr_check_images": 0,
                                    "attr_unit_topk": 0})
    ctx = pipeline.prepare(cfg, progress=False)
    pipeline.run_stages(ctx, ("dataset", "attribution"))
    parts = sorted((tmp_path / "store").glob("*.parts/attribution/*.h5"))
    before = {p: p.stat().st_mtime_ns for p in parts}
    ctx = pipeline.prepare(cfg.replace(attr_methods=("gradient", "gradient_x_input")), progress=False)
    path = pipeline.run_stages(ctx, ("dataset", "attribution"))
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    with h5py.File(path) as f:
        assert set(f["attribution"]) == {"gradient", "gradient_x_input"}


def test_a_method_that_does_not_apply_is_recorded_as_skipped(tmp_path, make_images, config):
    """The colour probe has no ReLU: Guided Backprop is undefined for it, the other methods still run."""
    data = make_images(tmp_path / "images", n=4)
    cfg = config(tmp_path, data, **{**SETTINGS, "model": "atlas:color_probe",
                                    "attr_methods": ("gradient", "guided_backprop"), "attr_check_images": 1,
                                    "attr_unit_topk": 0})
    ctx = pipeline.prepare(cfg, progress=False)
    path = pipeline.run_stages(ctx, ("dataset", "attribution"))
    with h5py.File(path) as f:
        assert set(f["attribution"]) == {"gradient"}
        skipped = json.loads(f["attribution"].attrs["skipped"])
        assert "no ReLU" in skipped["guided_backprop"]
        assert "guided_backprop" not in f["checks"] and "gradient" in f["checks"]
    pipeline.run_stages(pipeline.prepare(cfg, progress=False), ("attribution",))  # resumes without retrying


def test_gradient_attribution_matches_autograd(tmp_path, images, config, build_stages):
    ctx, path = build_stages(config(tmp_path, images))
    with h5py.File(path) as f:
        g = f["attribution/gradient"]
        maps = g["maps"][...].astype(np.float32) * g["scale"][...][:, None, None]
        target = g["target"][...]
        x = ctx.loaded.preprocess.from_uint8(f["dataset/images"][...]).requires_grad_(True)
        logits = ctx.loaded.model(x)
        np.testing.assert_array_equal(target, logits.argmax(1).numpy())
        logits.gather(1, torch.from_numpy(target)[:, None]).sum().backward()
        expected = x.grad.sum(1).numpy()
        np.testing.assert_allclose(maps, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())
        assert f["attribution/gradient/maps"].attrs["method"] == "gradient"


def test_circuits_come_from_the_unit_passes_and_the_kernels_from_the_weights(built):
    ctx, path = built
    names = [l.name for l in ctx.layers]
    with h5py.File(path) as f:
        for before, layer in zip(names, names[1:]):
            g = f[f"layers/{layer}/circuits"]
            inputs = g["inputs"]
            assert inputs.shape == (f[f"layers/{layer}"].attrs["channels"], f[f"layers/{before}"].attrs["channels"])
            assert inputs.attrs["from"] == before and np.isfinite(inputs[...]).any()
        assert "circuits" not in f[f"layers/{names[0]}"]
        # relu1 -> conv2 -> relu2: one convolution, so the slices are its weights
        kernel = f["layers/relu2/circuits/kernel"]
        assert kernel.attrs["conv"] == "conv2" and kernel.attrs["from"] == "relu1"
        np.testing.assert_allclose(kernel[...], ctx.loaded.model.conv2.weight.numpy(), rtol=1e-3, atol=1e-4)
        # a unit's stored inputs: the mean over its top images of activation x gradient of its peak
        channel, k = 3, f["layers/relu2/unit_attribution"].attrs["k"]
        rows = f["layers/relu2/topk/index"][channel, :k]
        x = ctx.loaded.preprocess.from_uint8(f["dataset/images"][sorted(rows)])
        source = next(l for l in ctx.layers if l.name == "relu1")
        _, each = UnitAttribution(ctx.loaded.model, next(l for l in ctx.layers if l.name == "relu2"), 8,
                                  source).pairs(x, torch.full((len(rows),), channel))
        np.testing.assert_allclose(inputs_of(f, "relu2")[channel], each.mean(0).numpy(), rtol=1e-3, atol=1e-5)


def inputs_of(f: h5py.File, layer: str) -> np.ndarray:
    return f[f"layers/{layer}/circuits/inputs"][...]
