"""The site's pages of units, layers, dataset images and the about page: every view, quality,
histograms, sort keys, attribution sprites, scales, badges and palettes, older stores."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
from PIL import Image

from atlas.site import render
from atlas.site.pictures import PICTURE_EXT as EXT
from atlas.site.pictures import heatmap
from atlas.site.plots import histogram_plot
from atlas.store.schema import VIEWS
from atlas.testing.synthetic import histogram, write_synthetic_store


def test_every_view_is_shown(full, refs, crawl):
    model, store = full
    unit = model / "block.0.relu-401" / "7.html"
    urls = refs(unit).urls
    assert f"7-views.{EXT}" in urls and f"7.{EXT}" in urls
    strip = Image.open(unit.parent / f"7-views.{EXT}")
    assert strip.size == (6 * 16, 16)  # negative, neuron and k=4 diversity images of 16 px, one file
    text = unit.read_text()
    windows = dict(re.findall(r'aria-label="(\w+) visualization of block.0.relu@1 unit 7" style="([^"]+)"', text))
    assert windows["negative"].endswith("0% 0/600% 100%")  # tile 0 of 6
    assert windows["neuron"].endswith("20% 0/600% 100%")  # tile 1: 1/(6-1) of the way
    assert windows["diversity"].endswith("100% 0/150% 100%") and "aspect-ratio:4" in windows["diversity"]
    assert "Views in this atlas: channel, negative, neuron, diversity." in unit.read_text()
    crawl(model.parent / "index.html")


def test_quick_store_shows_channel_only(site):
    root, _ = site
    unit = (root / "tiny" / "conv1" / "0.html").read_text()
    assert "not rendered: negative, neuron, diversity" in unit
    assert "-views." not in unit and "More views" not in unit
    assert not [p for p in (root / "tiny" / "conv1").glob(f"[0-9]*-*.{EXT}") if not p.stem.endswith(("-attribution", "-examples"))]


def test_quality_flag(full):
    model, store = full
    with h5py.File(store, "r") as f:
        quality = f["layers/block.0.relu@1/featurevis/quality"][()]
        dead = f["layers/block.0.relu@1/stats/dead"][()]
    low = int(np.flatnonzero((quality < 1) & ~dead)[0])
    high = int(np.flatnonzero((quality > 1) & ~dead)[0])
    layer = model / "block.0.relu-401"
    low_page, high_page = (layer / f"{low}.html").read_text(), (layer / f"{high}.html").read_text()
    assert "weaker than a real photo" in low_page
    assert "weaker than a real photo" not in high_page
    assert f"quality <strong>{quality[high]:.4g}</strong>" in high_page
    assert "the highest any dataset image reaches" in high_page
    if dead.any():
        assert "dead unit" in (layer / f"{int(np.flatnonzero(dead)[0])}.html").read_text()


def test_histogram_bars(full):
    model, store = full
    with h5py.File(store, "r") as f:
        hist = f["layers/conv1/stats/hist"][3]
    svg = re.search(r'<figure class="hist">.*?</svg>', (model / "conv1" / "3.html").read_text(), re.S)
    assert svg and "per-image maximum activation" in svg.group(0)
    bars = re.search(r'<path class="bars" d="([^"]+)"><title>Images per bin: ([^<]+)</title>', svg.group(0))
    assert bars.group(1).count("M") == bars.group(1).count("z") == np.count_nonzero(hist) > 0
    assert [int(n) for n in re.findall(r": (\d+)", bars.group(2))] == [int(n) for n in hist if n]


def test_histogram_binning():
    peaks = np.array([[0.0, 0.2, 0.2, 1490.0, -5.0]])
    counts = histogram(peaks)[0]
    assert counts.sum() == 5 and counts[24] == 3 and counts[47] == 1 and counts[0] == 0
    plot = histogram_plot(counts, np.sinh(np.linspace(-8, 8, 49)))
    assert plot["path"].count("M") == np.count_nonzero(counts)
    assert plot["counts"].endswith(": 1") and ": 3;" in plot["counts"]
    assert plot["left"] == "−7.16" and plot["right"] == "1490"  # one empty bin each side, clamped at the top
    assert histogram_plot(np.zeros(48, np.int64), np.sinh(np.linspace(-8, 8, 49))) is None


def test_layer_grid_carries_sort_keys(full):
    model, store = full
    with h5py.File(store, "r") as f:
        quality = f["layers/block.0.relu@1/featurevis/quality"][()]
        top = f["layers/block.0.relu@1/stats/max"][()]
    page = (model / "block.0.relu-401" / "index.html").read_text()
    cells = re.findall(r'<li([^>]*)><a href="(\d+)\.html" class="u ', page)
    assert len(cells) == 300
    for attrs, c in cells:
        c = int(c)
        q, m = re.search(r'data-q="([^"]+)"', attrs), re.search(r'data-m="([^"]+)"', attrs)
        assert (q is not None) == bool(np.isfinite(quality[c]))
        if q:
            assert float(q.group(1)) == pytest.approx(quality[c], rel=1e-2)
        assert float(m.group(1)) == pytest.approx(top[c], rel=1e-3)
    assert 'id="grid-controls"' in page and 'value="q-desc"' in page and 'value="m-desc"' in page
    summary = (model / "index.html").read_text()
    assert f"<td>{int((quality < 1).sum())}</td>" in summary  # low-quality count per layer


def test_image_page_shows_every_method_in_one_sprite(site, refs, site_store, spec):
    root, _ = site
    images = root / "tiny" / "images"
    with h5py.File(site_store(root.parent / "again", name="tiny"), "r") as f:
        labels, top1 = f["dataset/labels"][()], f["dataset/top5"][:, 0]
    for i in range(spec.N_IMAGES):
        page = (images / f"{i}.html").read_text()
        urls = refs(images / f"{i}.html").urls
        assert f"{i}-maps.{EXT}" in urls and f"{i}.jpg" in urls
        assert [u for u in urls if u.endswith(f".{EXT}")] == [f"{i}-maps.{EXT}"]  # one request for every map
        rows = 2 if labels[i] >= 0 and labels[i] != top1[i] else 1
        assert Image.open(images / f"{i}-maps.{EXT}").size == (len(spec.METHODS) * 32, rows * 32)
        assert page.count('class="hm" role="img"') == len(spec.METHODS) * rows
        assert ("for the true label" in page) == (rows == 2)
        for family in ("Gradients", "Guided", "CAM", "Path methods", "Other"):
            assert f"<h3>{family}</h3>" in page
    assert (labels[1], labels[2]) != (-1, -1)  # the store has images with and without a second row


def test_map_scales_are_in_attribution_units(site, tmp_path, site_store):
    """Stores keep maps divided by a per-image `scale`; the page shows the scale of the attribution itself."""
    root, _ = site
    with h5py.File(site_store(tmp_path), "r") as f:
        stored, factor = f["attribution/gradient/maps"][0], f["attribution/gradient/scale"][0]
    assert np.abs(stored).max() == pytest.approx(1, rel=1e-3) and factor < 0.1
    _, scale = heatmap(stored)
    badges = (root / "tiny" / "images" / "0.html").read_text()
    assert f"<strong>gradient</strong> <span class=\"muted small\">±{scale * factor:.3g}</span>" in badges


def test_true_label_row_names_the_class(site):
    root, _ = site
    page = (root / "tiny" / "images" / "1.html").read_text()
    assert "the map below it, the true label, <strong>&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert re.search(r'aria-label="integrated_gradients attribution of image 1 for the true label &lt;script&gt;', page)


def test_completeness_badges(site, tmp_path, site_store, badges_of):
    root, _ = site
    with h5py.File(site_store(tmp_path), "r") as f:
        error = f["attribution/integrated_gradients/completeness"][()]
        tolerance = f["attribution/integrated_gradients"].attrs["tolerance"]
    assert error[0] > tolerance >= error[1]  # incomplete on even images
    for i in (0, 1):
        badges = badges_of((root / "tiny" / "images" / f"{i}.html").read_text())
        path = [b for b in badges["integrated_gradients"] if b[1].startswith("completeness")]
        state = "ok" if i == 1 else "warn" if error[i] <= 5 * tolerance else "bad"
        assert path == [(state, f"completeness {error[i] * 100:.2g} %")]
        for method in ("gradient", "guided_backprop", "grad_cam", "grad×input"):  # no completeness: no badge
            assert not [b for b in badges[method] if b[1].startswith("completeness")]


def test_randomization_badges_link_to_the_checks(site, refs, crawl, badges_of):
    root, _ = site
    page = root / "tiny" / "images" / "0.html"
    badges = badges_of(page.read_text())
    assert ("bad", "insensitive to weights") in badges["guided_backprop"]
    for method in ("gradient", "integrated_gradients", "grad_cam"):
        assert ("ok", "passes randomization") in badges[method]
    assert "../checks.html#guided_backprop" in refs(page).urls
    crawl(page)  # every anchor exists on checks.html


def test_unsigned_maps_use_the_sequential_palette(site):
    values = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]] * 5, np.float32)
    signed, scale = heatmap(values, signed=True)
    signed = signed.astype(int)
    assert scale == pytest.approx(2.0) and signed[0, 0, 2] - signed[0, 0, 0] > 50  # negative: blue
    assert signed[0, -1, 0] - signed[0, -1, 2] > 50 and (signed[0, 2] > 240).all()  # positive red, zero white
    unsigned, _ = heatmap(values, signed=False)
    assert (unsigned[:, :3] == 255).all() and (unsigned[..., 0] >= unsigned[..., 2]).all()  # never blue
    root, _ = site  # in the sprite, grad_cam (third in display order) has no blue pixel
    sheet = np.asarray(Image.open(root / "tiny" / "images" / f"0-maps.{EXT}").convert("RGB"), float)
    cam = sheet[:32, 2 * 32:3 * 32]
    assert (cam[..., 2] - cam[..., 0]).max() < 8


def test_unit_attribution_scale_is_in_attribution_units(site, tmp_path, site_store):
    """Unit maps are stored divided by a per-map scale: the strip puts them back on one scale."""
    root, _ = site
    with h5py.File(site_store(tmp_path), "r") as f:
        maps = f["layers/block.0.relu@1/unit_attribution/maps"][7].astype(np.float32)
        scale = f["layers/block.0.relu@1/unit_attribution/scale"][7]
    _, expected = heatmap(np.concatenate(list(maps * scale[:, None, None]), axis=1))
    text = (root / "tiny" / "block.0.relu-401" / "7.html").read_text()
    assert f"scale ±{expected:.4g}." in text


def test_unit_page_shows_what_made_it_fire(site):
    root, _ = site
    unit = root / "tiny" / "block.0.relu-401" / "7.html"
    text = unit.read_text()
    assert "What made this unit fire" in text
    overlays = re.findall(r'class="crop hu" role="img" aria-label="([^"]+)" style="([^"]+)"', text)
    assert len(overlays) == 3
    for k, (label, style) in enumerate(overlays):
        assert label.startswith("what made unit 7 fire on image ")
        assert f"url(7-attribution.{EXT})" in style and f"url(7-examples.{EXT})" in style  # over its example crop
        assert f"{k * 50}% 0/" in style  # its tile of the strip
    assert Image.open(unit.parent / f"7-attribution.{EXT}").size == (3 * 16, 16)


def test_about_page_lists_attribution_and_check_settings(site, spec):
    root, _ = site
    text = (root / "tiny" / "about.html").read_text()
    assert 'id="attribution"' in text and 'id="checks"' in text
    for method in spec.METHODS:
        assert f"<h3>{method}</h3>" in text
    assert "&#34;tolerance&#34;: 0.01" in text and "&#34;threshold&#34;: 0.5" in text
    assert "&#34;target&#34;: &#34;channel spatial max&#34;" in text  # unit attribution settings
    for key in ("verdict_step", "target", "order", "mean_replacement", "blur_sigma_fraction_of_side",
                "mass_centre_box_fraction_of_side", "seed"):  # the settings attributes of /checks
        assert f"&#34;{key}&#34;: " in text, key
    assert "&#34;blur_sigma_fraction_of_side&#34;: 0.05" in text


def test_older_store_without_the_new_datasets(tmp_path, crawl, site_store, spec):
    """A store written before label maps, completeness, unit attributions and checks still renders."""
    store = site_store(tmp_path, name="older")
    with h5py.File(store, "r+") as f:
        for g in f["attribution"].values():
            for key in ("label_maps", "label_target", "completeness", "steps"):
                del g[key]
            g.attrs.clear()
        for layer in f["layers"].values():
            layer.pop("unit_attribution", None)
        del f["checks"]
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "older"
    image = (model / "images" / "1.html").read_text()
    assert "completeness" not in image and "randomization" not in image and "true label, <strong>" not in image
    assert Image.open(model / "images" / f"1-maps.{EXT}").size == (len(spec.METHODS) * 32, 32)
    assert "No checks in this store" in (model / "checks.html").read_text()
    assert "Unit attributions have not been computed" in (model / "conv1" / "0.html").read_text()
    crawl(tmp_path / "site" / "index.html")


def test_skipped_methods_say_why(tmp_path, site_store, spec):
    store = site_store(tmp_path, name="skipping", methods=("gradient",))
    with h5py.File(store, "r+") as f:
        f["attribution"].attrs["skipped"] = json.dumps({"guided_backprop": f"no ReLU to guide {spec.XSS}"})
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "skipping"
    for page in ("images/0.html", "about.html"):
        text = (model / page).read_text()
        assert "guided_backprop" in text and "no ReLU to guide &lt;script&gt;" in text and spec.XSS not in text


def test_about_page_of_a_deep_model_lists_shared_settings_and_datasets_once(tmp_path):
    """Per-layer repeats made ResNet-50's about page over 400 KB: settings and store rows are grouped."""
    layers = [(f"stage{i // 4}.{i % 4}", 4, 4) for i in range(40)]
    store = write_synthetic_store(tmp_path / "deep.h5", layers, n_images=6, k=2, fv_size=8, image_size=16,
                                  views=VIEWS, name="deep")
    render(store, tmp_path / "site", progress=False)
    about = (tmp_path / "site" / "deep" / "about.html").read_text()
    assert len(about) < 40_000
    for view in VIEWS:
        assert about.count(f"featurevis {view}, every layer") == 1
    assert "<code>/layers/&lt;layer&gt;/topk/index</code></td><td>C×2 (in 40 layers)" in about
    assert "stage3.1/topk" not in about
