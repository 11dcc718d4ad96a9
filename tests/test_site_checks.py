"""The site's sanity-checks page: every method's section, its randomization strips in one sprite,
their palettes, and stores with some checks or strips missing; the synthetic stores' layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from markupsafe import escape
from PIL import Image

from atlas.site import render
from atlas.site.data import slug
from atlas.site.pictures import PICTURE_EXT as EXT
from atlas.site.pictures import heatmap
from atlas.testing.synthetic import write_synthetic_store


def test_checks_page(site, tmp_path, refs, site_store, spec):
    root, _ = site
    page = root / "tiny" / "checks.html"
    text = page.read_text()
    ids = refs(page).ids
    for method in spec.METHODS:
        assert slug(method) in ids
        assert f'<a href="#{slug(method)}">' in text  # the summary table links to it
    assert text.count('<section class="method"') == len(spec.METHODS)
    assert text.count("<svg") == 4 * len(spec.METHODS)  # cascading, independent, deletion, insertion
    assert re.search(r'id="guided_backprop">\s*<h2>guided_backprop <span class="flag bad">insensitive to weights', text)
    assert "Caveat:</strong> Maps that stay alike after the weights are randomized" in text
    with h5py.File(site_store(tmp_path), "r") as f:
        auc = f["checks/gradient/deletion"].attrs["auc_mean"]
        control = f["checks/random/deletion"].attrs["auc_mean"]
        groups = json.loads(f["checks/gradient/randomization"].attrs["groups"])
    assert f'{auc:.3g} <span class="ctl" title="random pixel order">{control:.3g}</span>' in text
    assert ">head.&#34;q&#34;&lt;i&gt;</text>" in text  # group labels on the axis, escaped
    assert len(groups) == 6
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and spec.XSS not in text  # class names of the checked images
    assert "index.html" in refs(page).urls and "checks.html" in refs(root / "tiny" / "index.html").urls


STRIP_CELL = re.compile(r'<span class="st x(\d+) y(\d+)" role="img" aria-label="([^"]+)"></span>')


def _strip_cells(page: Path) -> dict[tuple[str, str], dict[int, int]]:
    """(method, mode) -> {step: sprite row} of every strip tile of a checks page (read off the aria labels)."""
    out: dict[tuple[str, str], dict[int, int]] = {}
    for section in re.findall(r'<section class="method" id="[^"]+">\s*<h2>(.*?)</section>', page.read_text(), re.S):
        method = section.split(" <", 1)[0].replace("&#215;", "×")
        for mode, row in re.findall(r'<th scope="row">(\w+)</th>(.*?)</tr>', section, re.S):
            out[(method, mode)] = {int(x): int(y) for x, y, _ in STRIP_CELL.findall(row)}
    return out


def _sprite_rows(page: Path, rows: dict[int, int], side: int) -> np.ndarray:
    sheet = np.asarray(Image.open(page.parent / f"checks-strips.{EXT}").convert("RGB"), float)
    return np.stack([sheet[r * side:(r + 1) * side] for r in sorted(set(rows.values()))])


def test_checks_page_shows_randomization_strips_in_one_sprite(site, tmp_path, refs, site_store, spec):
    root, _ = site
    page = root / "tiny" / "checks.html"
    text = page.read_text()
    steps = 6 + 1  # the original map, then one per parameter group
    sprite = Image.open(page.parent / f"checks-strips.{EXT}")
    assert sprite.size == (steps * 32, 2 * len(spec.METHODS) * 32)  # R = 32 (the image side), a row per method and mode
    pictures = {u for u in refs(page).urls if u.endswith((f".{EXT}", ".jpg", ".png"))}
    assert [u for u in pictures if u.endswith(f".{EXT}")] == [f"checks-strips.{EXT}"]  # one request for every strip
    assert len(pictures) <= 20
    assert f"url(checks-strips.{EXT})" in text
    cells = STRIP_CELL.findall(text)
    assert len(cells) == 2 * len(spec.METHODS) * steps
    assert len({(x, y) for x, y, _ in cells}) == len(cells)  # every tile of the sprite, once
    assert all(label.strip() for _, _, label in cells)
    strips = _strip_cells(page)
    assert set(strips) == {(m, mode) for m in spec.METHODS for mode in ("cascading", "independent")}
    assert text.count('<table class="strip"') == len(spec.METHODS)
    with h5py.File(site_store(tmp_path), "r") as f:
        labels = json.loads(f["checks/gradient/randomization"].attrs["labels"])
        stored = f["checks/guided_backprop/randomization/cascading/maps"][()]
        first = int(f["checks/images"][0])
    assert stored.shape == (steps, 32, 32)
    gradient = re.search(r'id="gradient">.*?</table>', text, re.S).group(0)
    heads = re.findall(r'<th scope="col" title="([^"]*)">', gradient)
    assert '<th scope="col" title="the map of the trained model">original</th>' in gradient
    assert heads == ["the map of the trained model", *[str(escape(label)) for label in labels]]
    assert f'aria-label="gradient map of image {first}, groups re-initialized down to {escape(labels[1])}"' in gradient
    assert f'aria-label="gradient map of image {first}, {escape(labels[2])} re-initialized alone"' in gradient
    assert f'<img src="images/{first}.jpg"' in gradient  # the image the strip explains
    # each tile shows its own step: nearer the heatmap of its stored map than any other step's
    row = strips[("guided_backprop", "cascading")]
    sheet = _sprite_rows(page, row, 32)[0]
    for k in range(steps):
        tiles = [heatmap(stored[j])[0].astype(float) for j in range(steps)]
        distance = [np.abs(sheet[:, k * 32:(k + 1) * 32] - t).mean() for t in tiles]
        assert int(np.argmin(distance)) == k


def _blue(rows: np.ndarray) -> float:
    """How far sprite rows lean to blue (the diverging palette's negative side): the mean of blue above red.

    A mean rather than the bluest pixel: lossy encoding tints a few pixels of any palette."""
    return float(np.clip(rows[..., 2] - rows[..., 0], 0, None).mean())


def test_strip_palettes_follow_the_signed_attribute(site, tmp_path, site_store, spec):
    root, _ = site
    page = root / "tiny" / "checks.html"
    strips = _strip_cells(page)
    for method in spec.METHODS:
        rows = {**strips[(method, "cascading")], **{k + 100: v for k, v in strips[(method, "independent")].items()}}
        blue = _blue(_sprite_rows(page, rows, 32))
        assert (blue < 1) if method == "grad_cam" else (blue > 2), method  # sequential, else diverging
    text = page.read_text()
    assert re.search(r"Randomization strip of grad_cam on image \d+: [^<]*sequential palette, unsigned", text)
    assert re.search(r"Randomization strip of gradient on image \d+: [^<]*diverging palette, signed", text)
    # the maps' `signed` attribute decides; without it, the method's name does
    store = site_store(tmp_path, name="attrs", methods=("gradient", "grad_cam", "vargrad"))
    with h5py.File(store, "r+") as f:
        f["attribution/gradient/maps"].attrs["signed"] = False  # its (signed) maps drawn from 0 up
        f["attribution/grad_cam/maps"].attrs["signed"] = True
        del f["attribution/vargrad/maps"].attrs["signed"]
    render(store, tmp_path / "site", progress=False)
    page = tmp_path / "site" / "attrs" / "checks.html"
    strips = _strip_cells(page)
    assert _blue(_sprite_rows(page, strips[("gradient", "cascading")], 32)) < 1
    palette = dict(re.findall(r"Randomization strip of (\w+) on image 0: [^(<]*\((\w+) palette", page.read_text()))
    assert palette == {"gradient": "sequential", "grad_cam": "diverging", "vargrad": "sequential"}  # vargrad: by name


def test_older_store_without_strips_still_renders(tmp_path, crawl, site_store, spec):
    store = site_store(tmp_path, name="nostrips", check_strips=False)
    with h5py.File(store, "r") as f:
        assert "maps" not in f["checks/gradient/randomization/cascading"]
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "nostrips"
    text = (model / "checks.html").read_text()
    assert not (model / f"checks-strips.{EXT}").exists()
    assert 'class="st' not in text and "checks-strips" not in text and '<table class="strip"' not in text
    assert text.count('<section class="method"') == len(spec.METHODS) and text.count("<svg") == 4 * len(spec.METHODS)
    crawl(tmp_path / "site" / "index.html")
    # one method without its strips (or with only one mode) leaves the others' in the sprite
    store = site_store(tmp_path, name="somestrips")
    with h5py.File(store, "r+") as f:
        del f["checks/gradient/randomization/cascading/maps"], f["checks/gradient/randomization/independent/maps"]
        del f["checks/grad_cam/randomization/independent/maps"]
    render(store, tmp_path / "site", progress=False)
    page = tmp_path / "site" / "somestrips" / "checks.html"
    strips = _strip_cells(page)
    assert ("gradient", "cascading") not in strips and ("grad_cam", "independent") not in strips
    assert ("grad_cam", "cascading") in strips
    assert Image.open(page.parent / f"checks-strips.{EXT}").size == (7 * 32, (2 * len(spec.METHODS) - 3) * 32)
    assert page.read_text().count('<table class="strip"') == len(spec.METHODS) - 1
    crawl(tmp_path / "site" / "index.html")


def test_partial_checks(tmp_path, crawl, site_store, badges_of):
    """Checks of some methods, and a method without some of its checks, leave the rest of the page intact."""
    store = site_store(tmp_path, name="partial", checks=("gradient", "integrated_gradients"))
    with h5py.File(store, "r+") as f:
        del f["checks/integrated_gradients/randomization"]
        del f["checks/random"]
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "partial"
    checks = (model / "checks.html").read_text()
    assert checks.count('<section class="method"') == 2 and "Not run for this method." in checks
    assert 'class="ctl"' not in checks  # no control to show
    badges = badges_of((model / "images" / "0.html").read_text())
    assert ("ok", "passes randomization") in badges["gradient"]
    assert not [b for b in badges["guided_backprop"] + badges["integrated_gradients"] if "randomization" in b[1]]
    crawl(tmp_path / "site" / "index.html")


def test_synthetic_stores_have_the_real_layout(tmp_path, site_store, spec):
    """Strips, `signed` attributes, unit-attribution scales and check settings, as docs/store.md has them."""
    with h5py.File(site_store(tmp_path, image_size=96), "r") as f:
        for method in spec.METHODS:
            assert f[f"attribution/{method}/maps"].attrs["signed"] == (method != "grad_cam")
            r = f[f"checks/{method}/randomization"]
            strips = {mode: r[f"{mode}/maps"][()] for mode in ("cascading", "independent")}
            for maps in strips.values():
                assert maps.dtype == np.float16 and maps.shape == (6 + 1, 56, 56)  # R = min(56, image side)
                assert np.abs(maps.astype(float)).max(axis=(1, 2)) == pytest.approx(1, rel=1e-3)
                if method == "grad_cam":
                    assert (maps >= 0).all()
            assert (strips["cascading"][:2] == strips["independent"][:2]).all()  # original, group 0 alone
        maps, scale = f["layers/conv1/unit_attribution/maps"], f["layers/conv1/unit_attribution/scale"]
        assert scale.dtype == np.float32 and scale.shape == maps.shape[:2]
        finite = np.isfinite(maps[()].astype(float)).any(axis=(2, 3))
        assert np.abs(maps[()][finite].astype(float)).max(axis=(1, 2)) == pytest.approx(1, rel=1e-3)
        assert (scale[()][finite] > 0).all() and np.isnan(scale[()][~finite]).all()
        assert {"verdict_step", "target", "order", "mean_replacement", "blur_sigma_fraction_of_side",
                "mass_centre_box_fraction_of_side", "seed", "threshold", "caveats"} <= set(f["checks"].attrs)
    with h5py.File(site_store(tmp_path, name="nochecks", checks=()), "r") as f:
        assert "checks" not in f


def test_synthetic_stores_hold_a_method_of_no_known_family(tmp_path, spec):
    unknown = "grad×input"
    assert unknown in spec.METHODS  # what the site tests render
    path = write_synthetic_store(tmp_path / "other.h5", [("conv", 4, 4)], n_images=2, k=1, fv_size=8, image_size=16,
                                 methods=("gradient", unknown), check_images=1)
    with h5py.File(path, "r") as f:
        maps = f[f"attribution/{unknown}/maps"]
        assert maps.attrs["method"] == unknown and maps.attrs["signed"]  # as the site takes it
        assert np.isnan(f[f"attribution/{unknown}/completeness"][()]).all()  # not a path method
        assert unknown in f["checks"] and "maps" in f[f"checks/{unknown}/randomization/cascading"]

