"""End to end on the tiny model: dataset top-k, attribution, store consolidation."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from atlas import pipeline
from atlas.config import preset
from atlas.dataset import box_of
from atlas.layers import Capture


def make_images(folder: Path, n: int = 14) -> Path:
    gen = np.random.default_rng(0)
    for i in range(n):
        sub = folder / ("class 3" if i % 2 else "unlabelled")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = gen.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i:02d}.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    return folder


def config(tmp_path: Path, data: Path, **kw):
    # one attribution method and no checks: tests/test_attribution_stage.py covers the rest
    kw = {"attr_methods": ("gradient",), "attr_check_images": 0, "attr_unit_topk": 0, **kw}
    return preset("quick").replace(model="atlas:tiny_convnet", data=str(data), store_dir=tmp_path / "store",
                                   site_dir=tmp_path / "site", fv_steps=4, fv_size=32, workers=0, topk=4,
                                   device="cpu", **kw)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


def build(cfg, stages=("dataset", "attribution")):
    ctx = pipeline.prepare(cfg, progress=False)
    return ctx, pipeline.run_stages(ctx, stages)


def test_topk_equals_brute_force_and_skips_bad_files(tmp_path, images):
    ctx, path = build(config(tmp_path, images, data_unit=5, data_batch=3))
    with h5py.File(path) as f:
        skipped = dict(zip(f["dataset/skipped_paths"].asstr()[...], f["dataset/skipped_reasons"].asstr()[...]))
        assert skipped["empty.jpg"] == "empty file"
        assert skipped["text.jpg"].startswith("unreadable: UnidentifiedImageError")
        assert f["dataset/images"].shape == (14, 32, 32, 3)
        labels = f["dataset/labels"][...]
        paths = f["dataset/paths"].asstr()[...]
        assert all((lab == 3) == ("class 3" in p) for lab, p in zip(labels, paths))
        pixels = f["dataset/images"][...]
        x = ctx.loaded.preprocess.from_uint8(pixels)
        with torch.no_grad(), Capture(ctx.loaded.model, ["conv2", "block"]) as cap:
            acts = cap.run(x)
        for layer in ("conv2", "block"):
            peak = acts[layer].flatten(2).amax(2).T.numpy()  # [C, N]
            order = np.argsort(-peak, axis=1, kind="stable")[:, :4]
            np.testing.assert_array_equal(f[f"layers/{layer}/topk/index"][...], order)
            np.testing.assert_allclose(f[f"layers/{layer}/topk/value"][...],
                                       np.take_along_axis(peak, order, 1), rtol=1e-5)
            low = np.argsort(peak, axis=1, kind="stable")[:, :4]
            np.testing.assert_array_equal(f[f"layers/{layer}/bottomk/index"][...], low)
            np.testing.assert_allclose(f[f"layers/{layer}/stats/max"][...], peak.max(1), rtol=1e-5)
            flat = acts[layer].flatten(2)
            np.testing.assert_allclose(f[f"layers/{layer}/stats/mean"][...], flat.mean((0, 2)).numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(f[f"layers/{layer}/stats/std"][...], flat.transpose(0, 1).reshape(flat.shape[1], -1).std(1, unbiased=False).numpy(), rtol=1e-3)
            np.testing.assert_allclose(f[f"layers/{layer}/stats/zero_fraction"][...], (flat <= 0).float().mean((0, 2)).numpy(), rtol=1e-6)
            edges = f[f"layers/{layer}/stats/hist_edges"][...].astype(np.float64)
            expected = np.stack([np.histogram(row, edges)[0] for row in peak])
            np.testing.assert_array_equal(f[f"layers/{layer}/stats/hist"][...], expected)
            box = f[f"layers/{layer}/topk/box"][...]
            flat = acts[layer].flatten(2)  # [N, C, P]
            pos = flat.argmax(2).T.numpy()  # [C, N]
            _, _, h, w = acts[layer].shape
            rf = f[f"layers/{layer}/topk"].attrs["receptive_field"]
            np.testing.assert_array_equal(box, box_of(np.take_along_axis(pos, order, 1), h, w, rf, 32))
            assert (box[..., 2] - box[..., 0] == box[..., 3] - box[..., 1]).all()
            assert box.min() >= 0 and box.max() <= 32


def test_units_merge_to_the_single_pass_result(tmp_path, images):
    _, small = build(config(tmp_path / "a", images, data_unit=3))
    _, whole = build(config(tmp_path / "b", images, data_unit=1000))
    with h5py.File(small) as a, h5py.File(whole) as b:
        for layer in a["layers"]:
            for k in ("topk/index", "topk/value", "topk/box", "bottomk/index", "stats/mean", "stats/std"):
                np.testing.assert_allclose(a[f"layers/{layer}/{k}"][...], b[f"layers/{layer}/{k}"][...],
                                           rtol=1e-5, err_msg=f"{layer}/{k}")
        np.testing.assert_array_equal(a["dataset/images"][...], b["dataset/images"][...])


def test_gradient_attribution_matches_autograd(tmp_path, images):
    ctx, path = build(config(tmp_path, images))
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


def test_featurevis_stage_fills_every_channel(tmp_path, images):
    _, path = build(config(tmp_path, images, fv_batch=5), stages=("featurevis",))
    with h5py.File(path) as f:
        for layer in f["layers"]:
            g = f[f"layers/{layer}/featurevis"]
            assert g["channel_done"][...].all()
            assert g["channel"].shape == (f[f"layers/{layer}"].attrs["channels"], 32, 32, 3)
            assert g["channel"].attrs["steps"] == 4
            assert np.isfinite(g["channel_objective"][...]).all()


def test_topk_of_a_hand_set_channel_is_known_by_construction(tmp_path):
    """Image i is grey 20 with one pixel of red 10 * i at (x=i, y=15 - i): channel 0 of the
    colour probe peaks there at exactly 10 * i / 255."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        pixels = np.full((16, 16, 3), 20, np.uint8)
        pixels[15 - i, i, 0] = 10 * i if i >= 2 else 20
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    cfg = preset("quick").replace(model="atlas:color_probe", data=str(folder), store_dir=tmp_path / "store",
                                  workers=0, topk=3, data_unit=5, data_batch=2, device="cpu", layers=("probe",))
    _, path = build(cfg, stages=("dataset",))
    with h5py.File(path) as f:
        top, bottom = f["layers/probe/topk"], f["layers/probe/bottomk"]
        assert top["index"][0].tolist() == [11, 10, 9]
        np.testing.assert_allclose(top["value"][0], [110 / 255, 100 / 255, 90 / 255], rtol=1e-6)
        rf = top.attrs["receptive_field"]
        assert rf == 1
        assert top["box"][0].tolist() == [[11, 4, 12, 5], [10, 5, 11, 6], [9, 6, 10, 7]]
        assert bottom["index"][0].tolist() == [0, 1, 2]  # grey 20 everywhere; ties by index
        np.testing.assert_allclose(bottom["value"][0], 20 / 255, rtol=1e-6)
        # green never varies: every image ties, so the lowest indices win both lists
        assert top["index"][1].tolist() == [0, 1, 2]
        assert not f["layers/probe/stats/dead"][...].any()
