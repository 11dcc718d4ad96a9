"""The dataset stage on the tiny models: top and bottom examples, statistics and boxes against a
brute-force pass, bad files skipped with a reason, and work units that merge to one pass."""

import json

import h5py
import numpy as np
import torch
from PIL import Image

from atlas.config import preset
from atlas.dataset.fields import field_centres
from atlas.dataset.reader import DatasetImages, box_of
from atlas.layers import Capture


def json_values(d: dict) -> dict:
    """`d` as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(d))


def test_topk_equals_brute_force_and_skips_bad_files(tmp_path, images, config, build_stages):
    cfg = config(tmp_path, images, data_unit=5, data_batch=3)
    ctx, path = build_stages(cfg)
    with h5py.File(path) as f:
        # encoded once, with every field; no folder of this machine named
        assert json.loads(f.attrs["config"]) == json_values(cfg.to_dict(public=True))
        assert str(tmp_path) not in f.attrs["config"] and str(images) not in f.attrs["config"]
        skipped = dict(zip(f["dataset/skipped_paths"].asstr()[...], f["dataset/skipped_reasons"].asstr()[...]))
        assert skipped["empty.jpg"] == "empty file"
        assert skipped["text.jpg"].startswith("unreadable: UnidentifiedImageError")
        assert f["dataset/images"].shape == (14, 32, 32, 3)
        labels = f["dataset/labels"][...]
        paths = f["dataset/paths"].asstr()[...]
        assert all((lab == 3) == ("class 3" in p) for lab, p in zip(labels, paths))
        pixels = f["dataset/images"][...]
        x = ctx.loaded.preprocess.from_uint8(pixels)
        pres = {"relu2": "relu2:in", "block": "block.relu@1:in", "block.conv2": None}
        with torch.no_grad(), Capture(ctx.loaded.model, [*pres, "relu2:in", "block.relu@1:in"]) as cap:
            acts = cap.run(x)
        for layer, pre in pres.items():
            flat = acts[layer].flatten(2)  # [N, C, P]
            under = acts[pre].flatten(2) if pre else flat  # what the examples rank by
            peak = flat.amax(2).T.numpy()  # [C, N]
            key, low_key = under.amax(2).T.numpy(), under.amin(2).T.numpy()
            order = np.argsort(-key, axis=1, kind="stable")[:, :4]
            np.testing.assert_array_equal(f[f"layers/{layer}/topk/index"][...], order)
            pos = under.argmax(2).T.numpy()  # [C, N]
            shown = np.take_along_axis(flat.numpy(), pos.T[..., None], 2)[..., 0].T  # the activation there, [C, N]
            np.testing.assert_allclose(f[f"layers/{layer}/topk/value"][...], np.take_along_axis(shown, order, 1),
                                       rtol=1e-5)
            low = np.argsort(low_key, axis=1, kind="stable")[:, :4]
            np.testing.assert_array_equal(f[f"layers/{layer}/bottomk/index"][...], low)
            np.testing.assert_allclose(f[f"layers/{layer}/bottomk/value"][...], np.take_along_axis(low_key, low, 1),
                                       rtol=1e-5)
            np.testing.assert_allclose(f[f"layers/{layer}/stats/max"][...], peak.max(1), rtol=1e-5)
            np.testing.assert_allclose(f[f"layers/{layer}/stats/mean"][...], flat.mean((0, 2)).numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(f[f"layers/{layer}/stats/std"][...], flat.transpose(0, 1).reshape(flat.shape[1], -1).std(1, unbiased=False).numpy(), rtol=1e-3)
            np.testing.assert_allclose(f[f"layers/{layer}/stats/zero_fraction"][...], (flat <= 0).float().mean((0, 2)).numpy(), rtol=1e-6)
            edges = f[f"layers/{layer}/stats/hist_edges"][...].astype(np.float64)
            expected = np.stack([np.histogram(row, edges)[0] for row in peak])
            np.testing.assert_array_equal(f[f"layers/{layer}/stats/hist"][...], expected)
            box = f[f"layers/{layer}/topk/box"][...]
            _, _, h, w = acts[layer].shape
            rf = f[f"layers/{layer}/topk"].attrs["receptive_field"]
            centres = list(f[f"layers/{layer}/topk"].attrs["field_centres"])
            assert centres == field_centres(ctx.loaded.model, ctx.layers[[l.name for l in ctx.layers].index(layer)], 32)
            np.testing.assert_array_equal(box, box_of(np.take_along_axis(pos, order, 1), h, w, rf, 32, centres))
            low_box = box_of(np.take_along_axis(under.argmin(2).T.numpy(), low, 1), h, w, rf, 32, centres)
            np.testing.assert_array_equal(f[f"layers/{layer}/bottomk/box"][...], low_box)
            assert (box[..., 2] - box[..., 0] == box[..., 3] - box[..., 1]).all()
            assert box.min() >= 0 and box.max() <= 32


def test_units_merge_to_the_single_pass_result(tmp_path, images, config, build_stages):
    # the ranges decoded by two worker processes (started from the forkserver), the whole by this one
    ctx, small = build_stages(config(tmp_path / "a", images, data_unit=3, workers=2))
    _, whole = build_stages(config(tmp_path / "b", images, data_unit=1000))
    done = ctx.store.done("dataset")
    assert len([k for k in done if k.startswith("images/")]) == 6  # 16 files (2 bad) in ranges of 3
    assert [k for k in done if k.startswith("summary/")] == ["summary/0000"]  # one running summary, not six
    with h5py.File(small) as a, h5py.File(whole) as b:
        for layer in a["layers"]:
            for k in ("topk/index", "topk/value", "topk/box", "bottomk/index", "stats/mean", "stats/std"):
                np.testing.assert_allclose(a[f"layers/{layer}/{k}"][...], b[f"layers/{layer}/{k}"][...],
                                           rtol=1e-5, err_msg=f"{layer}/{k}")
        np.testing.assert_array_equal(a["dataset/images"][...], b["dataset/images"][...])
        # what the other stages read straight from the parts: the consolidated rows, by source index
        stored, source = a["dataset/images"][...], a["dataset/source_index"][...]
        reader = DatasetImages(ctx.store, ctx.loaded.preprocess, torch.device("cpu"))
        np.testing.assert_array_equal(reader.order, np.sort(source))
        rows = np.array([13, 0, 7, 3, 7])  # scattered over several parts, one twice
        np.testing.assert_array_equal(reader.pixels(source[rows]), stored[rows])
        assert [reader.labels[int(i)] for i in source] == a["dataset/labels"][...].tolist()


def test_topk_of_a_hand_set_channel_is_known_by_construction(tmp_path, build_stages):
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
    _, path = build_stages(cfg, stages=("dataset",))
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


def test_decoding_workers_are_the_cores_unless_the_images_are_few():
    import os
    from atlas.config import Config
    from atlas.dataset.reader import decoding_workers
    cores = len(os.sched_getaffinity(0))
    assert decoding_workers(Config(workers=None), 1_000_000) == cores
    assert decoding_workers(Config(workers=None), 63) == 0  # decoded here: a process start costs more
    assert decoding_workers(Config(workers=None), 64 * cores - 1) == cores - 1
    assert decoding_workers(Config(workers=3), 10) == 3  # as given
