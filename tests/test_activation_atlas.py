"""The activation atlas: two classes of images laid out apart, cells labelled and rendered, the page linked."""

import os
import re

import h5py
import numpy as np
import pytest
from PIL import Image

from atlas import featurevis, pipeline
from atlas.featurevis.activation_atlas import bin_cells, layout_key
from atlas.store.schema import ACTIVATION_ATLAS

PER_CLASS = 12
SIDE = 16  # atlas:color_probe's input side
GRID = 6


def _photos(folder, colour: int, seed: int) -> None:
    """PER_CLASS noisy images dominated by one colour channel (0 red, 2 blue), in a folder named by its class."""
    gen = np.random.default_rng(seed)
    sub = folder / ("red", "green", "blue")[colour]
    sub.mkdir(parents=True)
    for i in range(PER_CLASS):
        pixels = gen.integers(0, 60, (SIDE, SIDE, 3))
        pixels[..., colour] = gen.integers(150, 256, (SIDE, SIDE))
        Image.fromarray(pixels.astype(np.uint8)).save(sub / f"{i:02d}.png")


@pytest.fixture(scope="module")
def built(tmp_path_factory, config, build_stages):
    """atlas:color_probe (its `probe` layer's channels are exactly the pixel's red, green and blue) over
    red and blue images, built through the dataset stage, with an activation atlas of `probe`."""
    tmp = tmp_path_factory.mktemp("atlas")
    _photos(tmp / "photos", 0, 0)
    _photos(tmp / "photos", 2, 1)
    cfg = config(tmp, tmp / "photos", model="atlas:color_probe", layers=("probe",), explain=2 * PER_CLASS,
                 atlas_layers=1, atlas_grid=GRID, atlas_points=1200, fv_size=SIDE)
    ctx, path = build_stages(cfg, stages=("featurevis", "dataset"))
    return cfg, ctx, path


def _labels(f: h5py.File, image: np.ndarray) -> np.ndarray:
    """The true class of each point's image (by source index)."""
    d = f["dataset"]
    by_source = dict(zip(d["source_index"][...].tolist(), d["labels"][...].tolist()))
    return np.array([by_source[int(i)] for i in image])


def test_bin_cells_keeps_the_cells_with_enough_points():
    xy = np.array([[0.1, 0.1], [0.2, 0.3], [0.4, 0.2], [0.9, 0.9], [0.99, 1.0], [0.6, 0.1]], np.float32)
    cell, row, col, count = bin_cells(xy, 2, 2)
    # (row, col) by (y, x): the first three share the top-left cell, the next two the bottom-right
    assert cell.tolist() == [0, 0, 0, 1, 1, -1]
    assert row.tolist() == [0, 1] and col.tolist() == [0, 1] and count.tolist() == [3, 2]


def test_two_classes_lie_in_separate_regions(built):
    _, _, path = built
    with h5py.File(path) as f:
        g = f[f"layers/probe/{ACTIVATION_ATLAS}"]
        xy, image = g["xy"][...], g["image"][...]
        labels = _labels(f, image)
    assert xy.shape == (2 * PER_CLASS * 50, 2) and set(labels.tolist()) == {0, 2}  # 50 positions of each image
    assert (xy >= 0).all() and (xy <= 1).all()
    # every point's 10 nearest neighbours in the layout come from images of its own class
    dist = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    near = np.argsort(dist, 1)[:, :10]
    assert (labels[near] == labels[:, None]).mean() > 0.99
    # and the two classes' centroids lie further apart than either class's spread
    red, blue = xy[labels == 0], xy[labels == 2]
    gap = np.linalg.norm(red.mean(0) - blue.mean(0))
    assert gap > 2 * max(red.std(0).max(), blue.std(0).max())


def test_cells_are_labelled_with_the_class_their_images_show(built):
    _, _, path = built
    with h5py.File(path) as f:
        g = f[f"layers/probe/{ACTIVATION_ATLAS}"]
        a = {k: g[k][...] for k in ("cell", "image", "row", "col", "count", "class", "class_score", "direction",
                                    "units", "unit_weight", "done", "images", "candidates")}
        labels = _labels(f, a["image"])
        assert g.attrs["method"] == "UMAP" and g.attrs["metric"] == "cosine" and g.attrs["grid"] == GRID
        assert g["images"].attrs["objective"].startswith("direction probe")
    kept = len(a["row"])
    assert 2 <= kept <= GRID * GRID and a["images"].shape == (kept, SIDE, SIDE, 3) and a["done"].all()
    assert sorted(a["candidates"].tolist()) == [0, 2]  # the images' predictions: red and blue
    np.testing.assert_array_equal(np.bincount(a["cell"][a["cell"] >= 0], minlength=kept), a["count"])
    assert len({(r, c) for r, c in zip(a["row"], a["col"])}) == kept and (a["count"] >= 3).all()
    for k in range(kept):
        members = labels[a["cell"] == k]
        shown = int(np.bincount(members).argmax())
        assert (members == shown).all()  # a cell holds one class's activations
        assert a["class"][k] == shown  # and supports that class
        assert a["units"][k, 0] == shown  # whose colour channel is the unit it aligns with most
        # activation x gradient: the logit is the channel's mean over 16 x 16 positions
        np.testing.assert_allclose(a["class_score"][k], a["count"][k] * a["direction"][k, shown] / SIDE ** 2,
                                   rtol=1e-2)
    unit = a["direction"].astype(np.float32) / np.linalg.norm(a["direction"].astype(np.float32), axis=1,
                                                               keepdims=True)
    np.testing.assert_allclose(a["unit_weight"][:, 0], unit.max(1), rtol=1e-2)


def test_the_atlas_is_not_redone_and_is_redone_for_another_grid(built, config):
    cfg, ctx, _ = built
    parts = ctx.store.parts / "featurevis"
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.h5")}
    featurevis.run_later(ctx)
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.h5")} == before
    other = pipeline.prepare(cfg.replace(atlas_grid=3), progress=False)
    featurevis.run_later(other)
    with other.store.read_unit("featurevis", layout_key("probe")) as part:
        assert part.attrs["grid"] == 3 and int(part["row"][...].max()) <= 2
    path = pipeline.consolidate(other.store)
    with h5py.File(path) as f:
        g = f[f"layers/probe/{ACTIVATION_ATLAS}"]
        assert g.attrs["grid"] == 3 and g["done"][...].all()  # every cell of the new layout is rendered
    featurevis.run_later(ctx)  # back to the first grid, for the other tests of this module
    pipeline.consolidate(ctx.store)


def test_the_page_places_every_cell_and_links_its_units(built, tmp_path, crawl, refs):
    from atlas.site import render
    _, _, path = built
    render(path, tmp_path / "site", progress=False)
    (model,) = [p for p in (tmp_path / "site").iterdir() if (p / "summary.json").is_file()]
    page = model / "probe" / "atlas.html"
    text = page.read_text()
    with h5py.File(path) as f:
        kept = len(f[f"layers/probe/{ACTIVATION_ATLAS}/row"])
    assert len(re.findall(r'class="aa-cell[ "]', text)) == kept and ">red<" in text and ">blue<" in text
    urls = refs(page).urls
    assert any(u.startswith("atlas.") for u in urls) and "0.html" in urls and "2.html" in urls
    assert refs(page).imgs_without_alt == 0
    assert "atlas.html" in refs(model / "probe" / "index.html").urls
    assert "probe/atlas.html" in refs(model / "index.html").urls
    seen = crawl(page)  # every link of the page leads to a file of the site
    assert (model / "probe" / "0.html").resolve() in seen
    assert os.path.getsize(model / "probe" / next(u for u in urls if u.startswith("atlas."))) > 0
