"""`atlas compare` on stores built by the real pipeline: linear CKA and unit matching against a model
itself, a copy with permuted channels and random weights; refusals; the pages and the site index."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from atlas import models
from atlas.compare import compare
from atlas.compare.run import analyse
from atlas.compare.similarity import chance, cka, cka_matrix, correlation, match_units
from atlas.compare.stores import read_side
from atlas.errors import AtlasError

PERMUTED = "relu1"  # conv1's output channels are permuted: relu1 shows them permuted, later layers unchanged


@pytest.fixture(scope="module")
def stores(tmp_path_factory, make_images, config, build_stages):
    """Dataset-stage stores of atlas:tiny_convnet on one image folder: its own weights (with feature
    visualizations), and a copy whose conv1 channels are permuted; returns (root, own, permuted, perm)."""
    root = tmp_path_factory.mktemp("compare")
    images = make_images(root / "images", 24)
    _, own = build_stages(config(root / "own", images), ("featurevis", "dataset"))
    perm = np.random.default_rng(0).permutation(8)
    state = models.load("atlas:tiny_convnet").model.state_dict()
    state["conv1.weight"] = state["conv1.weight"][perm].contiguous()
    state["conv1.bias"] = state["conv1.bias"][perm]
    state["conv2.weight"] = state["conv2.weight"][:, perm].contiguous()
    torch.save(state, root / "permuted.pt")
    _, permuted = build_stages(config(root / "permuted", images, weights=str(root / "permuted.pt")), ("dataset",))
    return root, own, permuted, perm


def test_cka_is_invariant_to_rotation_and_scale_and_one_on_itself():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert cka(x, x) == pytest.approx(1, abs=1e-12)
    assert cka(x, 3.5 * x @ q + 2.0) == pytest.approx(1, abs=1e-12)  # orthogonal, isotropic scale, shift
    other = rng.normal(size=(40, 5))
    assert cka(x, other) == pytest.approx(cka(other, x)) and cka(x, other) < 0.5
    assert np.isnan(cka(x, np.ones((40, 3))))  # a constant layer compares with nothing
    np.testing.assert_allclose(cka_matrix([x, other], [other, x]), [[cka(x, other), 1], [1, cka(x, other)]],
                               atol=1e-12)
    best, r, matched = match_units(correlation(x, np.column_stack([x[:, ::-1], np.ones(40)])))
    np.testing.assert_array_equal(best, [5, 4, 3, 2, 1, 0])
    np.testing.assert_allclose(r, 1, atol=1e-12)
    assert matched.all()
    best, r, matched = match_units(correlation(np.ones((40, 1)), x))
    assert best[0] == -1 and np.isnan(r[0]) and not matched[0]  # a dead unit has no counterpart


def test_the_chance_level_of_a_best_correlation_falls_with_more_images():
    rng = np.random.default_rng(0)
    few, many = rng.normal(size=(32, 1100)), rng.normal(size=(600, 1100))
    # independent units: on 32 images some of 1,000 correlate above 0.5 with any unit by chance
    assert chance(few[:, :100], few[:, 100:]) > 0.6 > chance(many[:, :100], many[:, 100:]) > 0
    assert np.isnan(chance(np.ones((32, 3)), few[:, :10]))
    assert chance(few[:, :100], few[:, 100:]) == chance(few[:, :100], few[:, 100:])  # seeded


def test_a_model_against_itself_is_the_identity(stores, tmp_path):
    _, own, _, _ = stores
    side = read_side(own)
    result = analyse(side, side)
    np.testing.assert_allclose(np.diag(result.cka), 1, atol=1e-6)
    for m in result.layers:
        assert m.other == m.layer
        np.testing.assert_array_equal(m.best, np.arange(len(m.best)))
        np.testing.assert_allclose(m.r, 1, atol=1e-6)
        assert m.unmatched == 0
    report = compare(own, own, tmp_path / "site")
    summary = json.loads((tmp_path / "site" / "atlas-2Dtiny_convnet" / "compare" / "atlas-2Dtiny_convnet.self"
                          / "compare.json").read_text())
    np.testing.assert_allclose(np.diag(summary["cka"]), 1, atol=1e-6)
    assert report["unmatched"] == 0 and report["mean_diagonal_cka"] == pytest.approx(1, abs=1e-6)


def test_a_permuted_copy_is_matched_back_exactly(stores):
    _, own, permuted, perm = stores
    result = analyse(read_side(own), read_side(permuted))
    np.testing.assert_allclose(np.diag(result.cka), 1, atol=1e-4)  # CKA ignores the order of channels
    by_layer = {m.layer: m for m in result.layers}
    m = by_layer[PERMUTED]
    assert m.other == PERMUTED
    np.testing.assert_array_equal(m.best, np.argsort(perm))  # B's channel j is A's channel perm[j]
    assert m.matched.all() and (m.r > 0.999).all()
    for later in ("relu2", "block.relu@0", "block.conv2", "block"):
        assert by_layer[later].other == later
        np.testing.assert_array_equal(by_layer[later].best, np.arange(16))


def test_trained_and_random_weights_differ_in_deep_layers(tmp_path, config, build_stages):
    # atlas:tiny_convnet's own weights are a seeded random draw, so its "random" is the same network: the
    # embedded default's ImageNet weights against its random initialization, on the embedded photos
    cfg = config(tmp_path / "trained", tmp_path, model="efficientnet_lite0", layers=("blocks.1.0", "bn2"),
                 crop_size=16, topk=2).replace(data=None)
    _, trained = build_stages(cfg, ("dataset",))
    _, random = build_stages(cfg.replace(store_dir=tmp_path / "random", weights="random"), ("dataset",))
    report = compare(trained, random, tmp_path / "site")
    assert report["folder"].endswith("efficientnet_lite0.random")  # one name: B's folder says which weights
    result = analyse(read_side(trained), read_side(random))
    assert result.a.layers == ["blocks.1.0", "bn2"]
    assert result.cka[1, 1] < 0.5


def test_stores_of_other_images_or_without_summaries_are_refused(stores, make_images, config, build_stages,
                                                                 run_atlas, tmp_path):
    root, own, _, _ = stores
    others = make_images(tmp_path / "images", 10)
    _, other = build_stages(config(tmp_path / "other", others), ("dataset",))
    with pytest.raises(AtlasError, match="built on different images"):
        compare(own, other, tmp_path / "site")
    proc = run_atlas("compare", str(own), str(other), "--out", str(tmp_path / "site"), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "different images" in proc.stderr and "Traceback" not in proc.stderr
    # the same search set, fewer explained images on one side: compared on the images both explain
    _, fewer = build_stages(config(tmp_path / "fewer", str(root / "images"), explain=12), ("dataset",))
    assert compare(own, fewer, tmp_path / "site")["images"] == 12
    _, few = build_stages(config(tmp_path / "few", str(root / "images"), explain=4), ("dataset",))
    with pytest.raises(AtlasError, match="explain only 4 of the same images"):
        compare(own, few, tmp_path / "site")
    shutil.rmtree(tmp_path / "site")
    old = tmp_path / "old.h5"
    shutil.copy(own, old)
    with h5py.File(old, "a") as f:
        for g in f["layers"].values():
            del g["means"]
    with pytest.raises(AtlasError, match="rerun `atlas dataset`"):
        compare(own, old, tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_pages_link_units_and_the_site_index_lists_them(stores, tmp_path, crawl, refs):
    from atlas.site import render
    _, own, permuted, _ = stores
    site = tmp_path / "site"
    render(own, site, progress=False)
    report = compare(own, permuted, site)
    folder = site / "atlas-2Dtiny_convnet" / "compare" / "atlas-2Dtiny_convnet.permuted"
    assert report["index"] == str(folder / "index.html")
    pages = {p.name for p in folder.glob("*.html")}
    assert pages == {"index.html", "relu1.html", "relu2.html", "block.relu-400.html", "block.conv2.html",
                     "block.html"}
    root_links = refs(site / "index.html").urls
    assert "atlas-2Dtiny_convnet/compare/atlas-2Dtiny_convnet.permuted/index.html" in root_links
    reached = crawl(site / "index.html")
    assert folder / "relu1.html" in reached
    layer = refs(folder / "relu1.html")
    # A's unit pages are linked; B has A's name, so the site's pages of that name are not B's
    assert "../../../atlas-2Dtiny_convnet/relu1/0.html" in layer.urls
    assert sum("/relu1/" in u for u in layer.urls) == 8  # one per row: A's unit
    assert layer.imgs == 8 and layer.imgs_without_alt == 0  # A's visualizations (B's store has none)
    render(own, site, progress=False)  # a render of the model keeps its comparisons
    assert (folder / "index.html").is_file()
    assert "compare/atlas-2Dtiny_convnet.permuted/index.html" in " ".join(refs(site / "index.html").urls)

