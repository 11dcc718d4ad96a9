"""The static site: links, escaping, sprites, missing stages, determinism."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
from markupsafe import escape
from PIL import Image

from atlas.errors import AtlasError
from atlas.site import SiteWriter, render
from atlas.site.data import slug
from atlas.site.pictures import PICTURE_EXT as EXT
from atlas.site.pictures import heatmap, histogram_plot
from atlas.testing.synthetic import VIEWS, add_featurevis, histogram, write_synthetic_store

XSS = "<script>alert(1)</script>"
LAYERS = [("conv1", 6, 16), ("block.0.relu@1", 300, 8), ('head."q"<i>', 3, 4), ("fc", 4, 1)]
N_IMAGES = 6
# a signed method of no known family, the gradients, a path method (incomplete on even images),
# the insensitive guided backprop and an unsigned CAM
METHODS = ("gradient", "grad×input", "integrated_gradients", "guided_backprop", "grad_cam")
URL_IN_CSS = re.compile(r"url\(([^)]*)\)")


class _Refs(HTMLParser):
    """Collects every URL a page refers to, every <img> lacking alt text and every role="img" lacking a label."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.imgs_without_alt = 0
        self.imgs = 0
        self.ids: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("href", "src") and v is not None]
        self.urls += URL_IN_CSS.findall(a.get("style") or "")
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "img" or a.get("role") == "img":
            self.imgs += 1
            self.imgs_without_alt += not (a.get("alt") or a.get("aria-label") or "").strip()
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += URL_IN_CSS.findall(data)


def refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _store(tmp: Path, name: str = "tiny", **kwargs) -> Path:
    classes = [f'{XSS} "quoted" \'single\' & class {i}' for i in range(20)]
    paths = [f"photos/{XSS}\"'{i}.jpg" for i in range(N_IMAGES)]
    args = dict(n_images=N_IMAGES, k=4, fv_size=16, image_size=32, methods=METHODS, incomplete={"integrated_gradients"},
                name=name, no_featurevis={"fc"}, classes=classes, paths=paths, unit_size=16, check_images=3)
    return write_synthetic_store(tmp / f"{name}.h5", LAYERS, **{**args, **kwargs})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("site")
    report = render(_store(tmp), tmp / "site", progress=False)
    return tmp / "site", report


def html_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.html"))


def crawl(start: Path) -> set[Path]:
    """Every file reachable from `start` through href, src and CSS url(); asserts each exists, anchors too."""
    seen: set[Path] = set()
    todo = [start.resolve()]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for url in refs(page).urls:
            path, _, anchor = url.partition("#")
            target = (page.parent / path.split("?")[0]).resolve() if path else page
            assert target.is_file(), f"{page} links to missing {url}"
            if anchor and target.suffix == ".html":
                assert anchor in refs(target).ids, f"{page} links to {url}: no such anchor"
            if target.suffix == ".html":
                todo.append(target)
            else:
                seen.add(target)
    return seen


def test_every_link_from_the_index_exists(site):
    root, report = site
    reached = crawl(root / "index.html")
    pages = {p for p in reached if p.suffix == ".html"}
    # Every page except 404.html is reachable from the index.
    assert pages == {p.resolve() for p in html_files(root)} - {(root / "404.html").resolve()}
    assert len(pages) + 1 == report["pages"]
    units = sum(c for _, c, _ in LAYERS)
    assert len(pages) >= units + len(LAYERS) + N_IMAGES


def test_no_absolute_or_external_urls(site):
    root, _ = site
    for page in html_files(root):
        for url in refs(page).urls:
            assert not url.startswith(("/", "http:", "https:", "//", "data:", "file:")), (page, url)
            assert "://" not in url and not url.startswith("//"), (page, url)


def test_every_img_has_alt(site):
    root, _ = site
    counted = 0
    for page in html_files(root):
        r = refs(page)
        counted += r.imgs
        assert r.imgs_without_alt == 0, page
    assert counted > N_IMAGES


def test_root_files(site):
    root, report = site
    assert (root / ".nojekyll").is_file()
    assert "not found" in (root / "404.html").read_text().lower()
    assert (root / "static" / "atlas.css").is_file() and (root / "static" / "atlas.js").is_file()
    assert set(report["bytes"]) == {"html", "featurevis", "sprites", "dataset", "attributions", "search"}
    assert set(report["site_bytes"]) == set(report["bytes"]) | {"static"}
    assert all(v > 0 for v in report["bytes"].values())


def test_csp_and_no_remote_loads(site):
    root, _ = site
    for page in html_files(root):
        text = page.read_text()
        assert "Content-Security-Policy" in text and "default-src 'none'" in text, page
        assert "@import" not in text and "<iframe" not in text


def test_store_strings_are_escaped(site):
    root, _ = site
    texts = {p: p.read_text() for p in html_files(root)}
    for page, text in texts.items():
        assert XSS not in text, page
        assert '"quoted"' not in text and '"q"<i>' not in text, page
    image_page = texts[root / "tiny" / "images" / "0.html"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in image_page  # the path and class names, escaped
    assert "&#34;quoted&#34;" in image_page
    assert any("head.&#34;q&#34;&lt;i&gt;" in t for t in texts.values())


def test_folder_names_are_safe(site):
    root, _ = site
    for path in (root / "tiny").rglob("*"):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name), path
        assert not path.name.startswith(".")
    assert (root / "tiny" / "block.0.relu-401" / "index.html").is_file()


def test_layer_grid_uses_sprites(site):
    root, _ = site
    page = root / "tiny" / "block.0.relu-401" / "index.html"
    r = refs(page)
    pictures = {u for u in r.urls if u.endswith((f".{EXT}", ".jpg", ".png"))}
    assert pictures == {f"sprite-0.{EXT}", f"sprite-1.{EXT}"}  # 300 units: two sheets of 256
    assert r.imgs == 0
    assert len(re.findall(r'href="\d+\.html" class="u ', page.read_text())) == 300
    assert len(list(page.parent.glob("sprite-*"))) == 2


def test_crops_reuse_the_stored_images(site):
    root, _ = site
    images = root / "tiny" / "images"
    assert len(list(images.glob("*.jpg"))) == N_IMAGES
    assert len(list(images.glob(f"*.{EXT}"))) == N_IMAGES  # one sprite of every method's maps per image
    unit = (root / "tiny" / "conv1" / "0.html").read_text()
    crops = re.findall(r'class="crop(?: hu)?" role="img" aria-label="[^"]+" style="([^"]+)"', unit)
    assert len(crops) == 8 + 3  # k=4 highest and 4 lowest, and the 3 that unit attributions explain
    assert all(re.search(r"url\(\.\./images/\d+\.jpg\) -?\d+px -?\d+px/\d+px", c) for c in crops)


def test_missing_featurevis_is_explained(site):
    root, _ = site
    for page in (root / "tiny" / "fc" / "index.html", root / "tiny" / "fc" / "0.html"):
        assert "Feature visualization has not run for this layer" in page.read_text()
    assert not [p for p in (root / "tiny" / "fc").glob(f"*.{EXT}") if not p.stem.endswith("-attribution")]
    assert "Feature visualization has not run" not in (root / "tiny" / "conv1" / "0.html").read_text()


def test_partial_featurevis(tmp_path):
    store = _store(tmp_path, name="partial")
    with h5py.File(store, "r+") as f:
        f["layers/conv1/featurevis/channel_done"][2] = False
    render(store, tmp_path / "site", progress=False)
    layer = tmp_path / "site" / "partial" / "conv1"
    assert "partial: grey units are not rendered yet" in (layer / "index.html").read_text()
    assert re.search(r'href="2\.html" class="u nofv', (layer / "index.html").read_text())
    assert "has not been rendered yet" in (layer / "2.html").read_text()
    assert not (layer / f"2.{EXT}").exists() and (layer / f"1.{EXT}").exists()


def test_store_without_dataset_or_attribution(tmp_path):
    store = _store(tmp_path, name="nodata", n_images=0)
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "nodata"
    assert "The dataset stage has not run" in (model / "index.html").read_text()
    assert "Dataset examples have not been computed" in (model / "conv1" / "0.html").read_text()
    assert not (model / "images").exists()
    crawl(tmp_path / "site" / "index.html")

    assert "No checks in this store: run <code>atlas attribute</code>" in (model / "checks.html").read_text()

    store = _store(tmp_path, name="noattr", methods=())
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "noattr"
    assert "Attribution has not run" in (model / "images" / "0.html").read_text()
    assert "No checks in this store" in (model / "checks.html").read_text()
    assert "Unit attributions have not been computed" in (model / "conv1" / "0.html").read_text()
    crawl(tmp_path / "site" / "index.html")


def test_rendering_twice_gives_the_same_files(site, tmp_path):
    root, _ = site
    store = _store(tmp_path)
    again = tmp_path / "again"
    render(store, again, progress=False)
    render(store, again, progress=False)  # over an existing render: replaced, not merged
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}  # noqa: E731
    first, second = files(root), files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_index_lists_every_rendered_model(tmp_path):
    site_dir = tmp_path / "site"
    for name in ("alpha", "beta"):
        render(_store(tmp_path, name=name, n_images=2), site_dir, progress=False)
    index = refs(site_dir / "index.html").urls
    assert "alpha/index.html" in index and "beta/index.html" in index
    crawl(site_dir / "index.html")


def test_big_layer_page_stays_small(tmp_path):
    store = write_synthetic_store(tmp_path / "big.h5", [("wide", 2048, 1)], n_images=3, k=2, fv_size=8,
                                  image_size=16, methods=())
    render(store, tmp_path / "site", progress=False)
    page = tmp_path / "site" / "synthetic" / "wide" / "index.html"
    assert len(re.findall(r"<li data-q=\S+ data-m=", page.read_text())) > 1900  # sort keys on (nearly) all
    assert page.stat().st_size < 200_000
    assert len({u for u in refs(page).urls if u.endswith(f".{EXT}")}) <= 20


def test_slug_is_safe_and_one_to_one():
    assert slug("layer3.2.conv2") == "layer3.2.conv2"
    assert slug("layer1.0.relu@2") == "layer1.0.relu-402"
    names = ["a@", "a-40", "a-", "a/b", "a\\b", "..", ".", ".hidden", "images", "static", "é", "a b"]
    slugs = [slug(n) for n in names]
    assert len(set(slugs)) == len(names)
    for s in slugs:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", s) and not s.startswith(".")
        assert s.lower() not in ("images", "static")
    with pytest.raises(AtlasError):
        slug("")


def test_writer_refuses_paths_outside_its_folder(tmp_path):
    writer = SiteWriter(tmp_path, env=None, depth=0)  # type: ignore[arg-type]
    for bad in ("../x.html", "/etc/x", "a/../../x", "a//b", "a\\..\\b"):
        with pytest.raises(AtlasError):
            writer.path(bad)
    assert writer.path("a/b.html") == tmp_path / "a" / "b.html"


def test_not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(AtlasError, match="no store file"):
        render(tmp_path / "missing.h5", tmp_path / "site", progress=False)


def test_sprite_cells_show_their_own_unit(site, tmp_path):
    root, _ = site
    with h5py.File(_store(tmp_path), "r") as f:
        fv = f["layers/block.0.relu@1/featurevis/channel"][()].astype(float)
    sheet = np.asarray(Image.open(root / "tiny" / "block.0.relu-401" / f"sprite-1.{EXT}").convert("RGB"), float)
    unit = 256 + 2 * 16 + 5  # sheet 1, row 2, column 5; cells are 16 px (the fv size)
    cell = sheet[2 * 16:3 * 16, 5 * 16:6 * 16]
    distance = np.abs(cell[None] - fv).mean(axis=(1, 2, 3))
    assert distance.argmin() == unit  # lossy, but nearer its own unit than any other


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A site rendered from a store holding every view; returns (model folder, store)."""
    tmp = tmp_path_factory.mktemp("full")
    store = _store(tmp, name="full", views=VIEWS)
    render(store, tmp / "site", progress=False)
    return tmp / "site" / "full", store


def test_every_view_is_shown(full):
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


def test_secondary_views_shrink_to_fit_the_budget(tmp_path):
    """Past the budget the views other than channel are written smaller, and the pages say so."""
    store = _store(tmp_path, name="big", views=VIEWS, fv_size=64)
    report = render(store, tmp_path / "roomy", progress=False)
    estimates = report["estimates"]
    assert report["view_scale"] == 1.0 and set(estimates) == {1.0, 0.75, 0.5}
    assert estimates[1.0] > estimates[0.75] > estimates[0.5]
    actual = sum(report["site_bytes"].values())
    assert 0.5 < estimates[1.0] / actual < 2.0  # the estimate is of the right size
    unit = tmp_path / "roomy" / "big" / "block.0.relu-401" / "7.html"
    assert Image.open(unit.parent / f"7-views.{EXT}").size == (6 * 64, 64)
    assert "shown at" not in unit.read_text()

    budget = (estimates[0.75] + estimates[0.5]) / 2  # only half size fits
    report = render(store, tmp_path / "tight", progress=False, max_site_mb=budget / 1e6)
    assert report["view_scale"] == 0.5
    unit = tmp_path / "tight" / "big" / "block.0.relu-401" / "7.html"
    assert Image.open(unit.parent / f"7-views.{EXT}").size == (6 * 32, 32)
    assert Image.open(unit.parent / f"7.{EXT}").size == (64, 64)  # the channel view keeps its side
    note = "views other than channel shown at 32 px of the stored 64 to keep the site within"
    assert note in unit.read_text() and note in (unit.parent.parent / "about.html").read_text()
    crawl(tmp_path / "tight" / "index.html")


def test_quick_store_shows_channel_only(site):
    root, _ = site
    unit = (root / "tiny" / "conv1" / "0.html").read_text()
    assert "not rendered: negative, neuron, diversity" in unit
    assert "-views." not in unit and "More views" not in unit
    assert not [p for p in (root / "tiny" / "conv1").glob(f"[0-9]*-*.{EXT}") if not p.stem.endswith("-attribution")]


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


def test_rerender_rewrites_only_what_changed(tmp_path):
    """Adding featurevis to one layer rewrites that layer's files and the pages that summarize it."""
    store = _store(tmp_path)
    out = tmp_path / "site"
    render(store, out, progress=False)
    old = 1_000_000_000  # a time no write of this test can produce
    files = [p for p in out.rglob("*") if p.is_file()]
    for p in files:
        os.utime(p, (old, old))
    add_featurevis(store, "fc")
    report = render(store, out, progress=False)
    changed = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.stat().st_mtime != old}
    fc = {p for p in changed if p.startswith("tiny/fc/")}
    assert {"tiny/fc/index.html", "tiny/fc/0.html", f"tiny/fc/sprite-0.{EXT}", f"tiny/fc/0.{EXT}"} <= fc
    # the model's index, about page and summary list the layer; the site index shows a preview of it
    assert changed - fc == {"tiny/index.html", "tiny/about.html", "tiny/summary.json", "index.html"}
    assert report["changed"] == len(changed)
    assert not list(out.rglob(".*.tmp"))


def test_rerender_removes_files_no_longer_produced(tmp_path):
    out = tmp_path / "site"
    render(_store(tmp_path), out, progress=False)
    render(write_synthetic_store(tmp_path / "tiny.h5", LAYERS[:1], 2, name="tiny"), out, progress=False)
    assert not (out / "tiny" / "fc").exists()
    assert (out / "tiny" / "conv1" / "0.html").is_file()


def test_size_report_and_budget(tmp_path, capsys):
    report = render(_store(tmp_path), tmp_path / "site", progress=True, max_site_mb=0.001)
    out, err = capsys.readouterr()
    assert "featurevis" in out and "total" in out
    assert err.count("over its budget of 0.001 MB") == 1
    assert sum(report["site_bytes"].values()) == sum(p.stat().st_size for p in (tmp_path / "site").rglob("*")
                                                      if p.is_file())
    render(_store(tmp_path), tmp_path / "site", progress=False)
    assert "budget" not in capsys.readouterr().err


def test_search_index_is_small_and_escaped(site):
    root, _ = site
    text = (root / "tiny" / "search.js").read_text()
    assert "<" not in text and text.isascii()
    assert '"block.0.relu@1",' in text and "class 3" in text
    for page in (root / "index.html", root / "tiny" / "conv1" / "0.html"):
        assert "search.js" in page.read_text()


# --- attributions and their sanity checks ---

def _badges(page: str) -> dict[str, list[tuple[str, str]]]:
    """Per method of an image page: the (state, text) of each badge in its caption."""
    out = {}
    for caption in re.findall(r"<figcaption><strong>(.*?)</figcaption>", page, re.S):
        name = re.sub(r"<wbr>", "", caption.split("</strong>")[0])
        out[name] = re.findall(r'class="flag (\w+)"[^>]*>([^<]+)<', caption)
    return out


def test_image_page_shows_every_method_in_one_sprite(site):
    root, _ = site
    images = root / "tiny" / "images"
    with h5py.File(_store(root.parent / "again", name="tiny"), "r") as f:
        labels, top1 = f["dataset/labels"][()], f["dataset/top5"][:, 0]
    for i in range(N_IMAGES):
        page = (images / f"{i}.html").read_text()
        urls = refs(images / f"{i}.html").urls
        assert f"{i}-maps.{EXT}" in urls and f"{i}.jpg" in urls
        assert [u for u in urls if u.endswith(f".{EXT}")] == [f"{i}-maps.{EXT}"]  # one request for every map
        rows = 2 if labels[i] >= 0 and labels[i] != top1[i] else 1
        assert Image.open(images / f"{i}-maps.{EXT}").size == (len(METHODS) * 32, rows * 32)
        assert page.count('class="hm" role="img"') == len(METHODS) * rows
        assert ("for the true label" in page) == (rows == 2)
        for family in ("Gradients", "Guided", "CAM", "Path methods", "Other"):
            assert f"<h3>{family}</h3>" in page
    assert (labels[1], labels[2]) != (-1, -1)  # the store has images with and without a second row


def test_map_scales_are_in_attribution_units(site, tmp_path):
    """Stores keep maps divided by a per-image `scale`; the page shows the scale of the attribution itself."""
    root, _ = site
    with h5py.File(_store(tmp_path), "r") as f:
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


def test_completeness_badges(site, tmp_path):
    root, _ = site
    with h5py.File(_store(tmp_path), "r") as f:
        error = f["attribution/integrated_gradients/completeness"][()]
        tolerance = f["attribution/integrated_gradients"].attrs["tolerance"]
    assert error[0] > tolerance >= error[1]  # incomplete on even images
    for i in (0, 1):
        badges = _badges((root / "tiny" / "images" / f"{i}.html").read_text())
        path = [b for b in badges["integrated_gradients"] if b[1].startswith("completeness")]
        state = "ok" if i == 1 else "warn" if error[i] <= 5 * tolerance else "bad"
        assert path == [(state, f"completeness {error[i] * 100:.2g} %")]
        for method in ("gradient", "guided_backprop", "grad_cam", "grad×input"):  # no completeness: no badge
            assert not [b for b in badges[method] if b[1].startswith("completeness")]


def test_randomization_badges_link_to_the_checks(site):
    root, _ = site
    page = root / "tiny" / "images" / "0.html"
    badges = _badges(page.read_text())
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


def test_checks_page(site, tmp_path):
    root, _ = site
    page = root / "tiny" / "checks.html"
    text = page.read_text()
    ids = refs(page).ids
    for method in METHODS:
        assert slug(method) in ids
        assert f'<a href="#{slug(method)}">' in text  # the summary table links to it
    assert text.count('<section class="method"') == len(METHODS)
    assert text.count("<svg") == 4 * len(METHODS)  # cascading, independent, deletion, insertion
    assert re.search(r'id="guided_backprop">\s*<h2>guided_backprop <span class="flag bad">insensitive to weights', text)
    assert "Caveat:</strong> Maps that stay alike after the weights are randomized" in text
    with h5py.File(_store(tmp_path), "r") as f:
        auc = f["checks/gradient/deletion"].attrs["auc_mean"]
        control = f["checks/random/deletion"].attrs["auc_mean"]
        groups = json.loads(f["checks/gradient/randomization"].attrs["groups"])
    assert f'{auc:.3g} <span class="ctl" title="random pixel order">{control:.3g}</span>' in text
    assert ">head.&#34;q&#34;&lt;i&gt;</text>" in text  # group labels on the axis, escaped
    assert len(groups) == 6
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and XSS not in text  # class names of the checked images
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


def test_checks_page_shows_randomization_strips_in_one_sprite(site, tmp_path):
    root, _ = site
    page = root / "tiny" / "checks.html"
    text = page.read_text()
    steps = 6 + 1  # the original map, then one per parameter group
    sprite = Image.open(page.parent / f"checks-strips.{EXT}")
    assert sprite.size == (steps * 32, 2 * len(METHODS) * 32)  # R = 32 (the image side), a row per method and mode
    pictures = {u for u in refs(page).urls if u.endswith((f".{EXT}", ".jpg", ".png"))}
    assert [u for u in pictures if u.endswith(f".{EXT}")] == [f"checks-strips.{EXT}"]  # one request for every strip
    assert len(pictures) <= 20
    assert f"url(checks-strips.{EXT})" in text
    cells = STRIP_CELL.findall(text)
    assert len(cells) == 2 * len(METHODS) * steps
    assert len({(x, y) for x, y, _ in cells}) == len(cells)  # every tile of the sprite, once
    assert all(label.strip() for _, _, label in cells)
    strips = _strip_cells(page)
    assert set(strips) == {(m, mode) for m in METHODS for mode in ("cascading", "independent")}
    assert text.count('<table class="strip"') == len(METHODS)
    with h5py.File(_store(tmp_path), "r") as f:
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


def test_strip_palettes_follow_the_signed_attribute(site, tmp_path):
    root, _ = site
    page = root / "tiny" / "checks.html"
    strips = _strip_cells(page)
    for method in METHODS:
        rows = {**strips[(method, "cascading")], **{k + 100: v for k, v in strips[(method, "independent")].items()}}
        blue = _blue(_sprite_rows(page, rows, 32))
        assert (blue < 1) if method == "grad_cam" else (blue > 2), method  # sequential, else diverging
    text = page.read_text()
    assert re.search(r"Randomization strip of grad_cam on image \d+: [^<]*sequential palette, unsigned", text)
    assert re.search(r"Randomization strip of gradient on image \d+: [^<]*diverging palette, signed", text)
    # the maps' `signed` attribute decides; without it, the method's name does
    store = _store(tmp_path, name="attrs", methods=("gradient", "grad_cam", "vargrad"))
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


def test_older_store_without_strips_still_renders(tmp_path):
    store = _store(tmp_path, name="nostrips", check_strips=False)
    with h5py.File(store, "r") as f:
        assert "maps" not in f["checks/gradient/randomization/cascading"]
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "nostrips"
    text = (model / "checks.html").read_text()
    assert not (model / f"checks-strips.{EXT}").exists()
    assert 'class="st' not in text and "checks-strips" not in text and '<table class="strip"' not in text
    assert text.count('<section class="method"') == len(METHODS) and text.count("<svg") == 4 * len(METHODS)
    crawl(tmp_path / "site" / "index.html")
    # one method without its strips (or with only one mode) leaves the others' in the sprite
    store = _store(tmp_path, name="somestrips")
    with h5py.File(store, "r+") as f:
        del f["checks/gradient/randomization/cascading/maps"], f["checks/gradient/randomization/independent/maps"]
        del f["checks/grad_cam/randomization/independent/maps"]
    render(store, tmp_path / "site", progress=False)
    page = tmp_path / "site" / "somestrips" / "checks.html"
    strips = _strip_cells(page)
    assert ("gradient", "cascading") not in strips and ("grad_cam", "independent") not in strips
    assert ("grad_cam", "cascading") in strips
    assert Image.open(page.parent / f"checks-strips.{EXT}").size == (7 * 32, (2 * len(METHODS) - 3) * 32)
    assert page.read_text().count('<table class="strip"') == len(METHODS) - 1
    crawl(tmp_path / "site" / "index.html")


def test_synthetic_stores_have_the_real_layout(tmp_path):
    """Strips, `signed` attributes, unit-attribution scales and check settings, as docs/store.md has them."""
    with h5py.File(_store(tmp_path, image_size=96), "r") as f:
        for method in METHODS:
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
    with h5py.File(_store(tmp_path, name="nochecks", checks=()), "r") as f:
        assert "checks" not in f


def test_unit_attribution_scale_is_in_attribution_units(site, tmp_path):
    """Unit maps are stored divided by a per-map scale: the strip puts them back on one scale."""
    root, _ = site
    with h5py.File(_store(tmp_path), "r") as f:
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
        assert f"url(7-attribution.{EXT})" in style and re.search(r"url\(\.\./images/\d+\.jpg\)", style)
        assert f"{k * 50}% 0/" in style  # its tile of the strip
    assert Image.open(unit.parent / f"7-attribution.{EXT}").size == (3 * 16, 16)


def test_about_page_lists_attribution_and_check_settings(site):
    root, _ = site
    text = (root / "tiny" / "about.html").read_text()
    assert 'id="attribution"' in text and 'id="checks"' in text
    for method in METHODS:
        assert f"<h3>{method}</h3>" in text
    assert "&#34;tolerance&#34;: 0.01" in text and "&#34;threshold&#34;: 0.5" in text
    assert "&#34;target&#34;: &#34;channel spatial max&#34;" in text  # unit attribution settings
    for key in ("verdict_step", "target", "order", "mean_replacement", "blur_sigma_fraction_of_side",
                "mass_centre_box_fraction_of_side", "seed"):  # the settings attributes of /checks
        assert f"&#34;{key}&#34;: " in text, key
    assert "&#34;blur_sigma_fraction_of_side&#34;: 0.05" in text


def test_older_store_without_the_new_datasets(tmp_path):
    """A store written before label maps, completeness, unit attributions and checks still renders."""
    store = _store(tmp_path, name="older")
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
    assert Image.open(model / "images" / f"1-maps.{EXT}").size == (len(METHODS) * 32, 32)
    assert "No checks in this store" in (model / "checks.html").read_text()
    assert "Unit attributions have not been computed" in (model / "conv1" / "0.html").read_text()
    crawl(tmp_path / "site" / "index.html")


def test_skipped_methods_say_why(tmp_path):
    store = _store(tmp_path, name="skipping", methods=("gradient",))
    with h5py.File(store, "r+") as f:
        f["attribution"].attrs["skipped"] = json.dumps({"guided_backprop": f"no ReLU to guide {XSS}"})
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "skipping"
    for page in ("images/0.html", "about.html"):
        text = (model / page).read_text()
        assert "guided_backprop" in text and "no ReLU to guide &lt;script&gt;" in text and XSS not in text


def test_partial_checks(tmp_path):
    """Checks of some methods, and a method without some of its checks, leave the rest of the page intact."""
    store = _store(tmp_path, name="partial", checks=("gradient", "integrated_gradients"))
    with h5py.File(store, "r+") as f:
        del f["checks/integrated_gradients/randomization"]
        del f["checks/random"]
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "partial"
    checks = (model / "checks.html").read_text()
    assert checks.count('<section class="method"') == 2 and "Not run for this method." in checks
    assert 'class="ctl"' not in checks  # no control to show
    badges = _badges((model / "images" / "0.html").read_text())
    assert ("ok", "passes randomization") in badges["gradient"]
    assert not [b for b in badges["guided_backprop"] + badges["integrated_gradients"] if "randomization" in b[1]]
    crawl(tmp_path / "site" / "index.html")


def test_pages_stay_small_with_every_method(tmp_path):
    """The full preset's methods and checks (16 methods, 8 images, 8 groups) keep pages under 300 KB."""
    methods = ("gradient", "gradient_x_input", "smoothgrad", "smoothgrad_sq", "vargrad", "guided_backprop",
               "grad_cam", "guided_grad_cam", "integrated_gradients", "ig_max_distance", "ig_blurred",
               "ig_uniform", "ig_gaussian", "expected_gradients", "occlusion", "extremal_perturbation")
    classes = [f"a rather long class name number {i}" for i in range(1000)]
    store = write_synthetic_store(tmp_path / "big.h5", [("conv", 4, 4), ("fc", 1000, 1)], n_images=8, k=10,
                                  fv_size=8, image_size=32, methods=methods, classes=classes, check_images=8,
                                  check_groups=8, unit_size=8, views=())
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "synthetic"
    for page in ("checks.html", "images/1.html", "about.html", "conv/0.html"):
        assert (model / page).stat().st_size < 300_000, page
    assert max(p.stat().st_size for p in model.rglob("*.html")) < 300_000
    pictures = {u for u in refs(model / "checks.html").urls if not u.endswith(".html") and not u.startswith("#")}
    assert len(pictures) <= 20 and f"checks-strips.{EXT}" in pictures  # 8 images, one sprite, css, js, icon, search
    assert Image.open(model / f"checks-strips.{EXT}").size == (9 * 32, 2 * len(methods) * 32)


def test_checks_page_stays_small_with_long_group_labels(tmp_path):
    """Real group labels name two modules each ("layer4.2.conv3 .. layer4.1.bn2"): still under 300 KB."""
    methods = ("gradient", "gradient_x_input", "smoothgrad", "smoothgrad_sq", "vargrad", "guided_backprop",
               "grad_cam", "guided_grad_cam", "integrated_gradients", "ig_max_distance", "ig_blurred",
               "ig_uniform", "ig_gaussian", "expected_gradients", "occlusion", "extremal_perturbation")
    store = write_synthetic_store(tmp_path / "long.h5", [("conv", 4, 4)], n_images=8, k=2, fv_size=8,
                                  image_size=16, methods=methods, check_images=8, check_groups=8, unit_size=8,
                                  views=(), classes=[f"a rather long class name number {i}" for i in range(1000)])
    labels = [f"features.denseblock{g}.denselayer16.conv2 .. features.denseblock{g}.denselayer1.norm1"
              for g in range(8)]
    with h5py.File(store, "r+") as f:
        for method in methods:
            f[f"checks/{method}/randomization"].attrs["labels"] = json.dumps(labels)
    render(store, tmp_path / "site", progress=False)
    page = tmp_path / "site" / "synthetic" / "checks.html"
    assert page.stat().st_size < 300_000
    assert f'title="{labels[3]}">features.<wbr>denseblock3.<wbr>denselayer16.<wbr>conv2</th>' in page.read_text()



def _git(repo: Path, *args: str) -> str:
    import subprocess
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "atlas@example.org")
    _git(repo, "config", "user.name", "Atlas test")
    (repo / "README.md").write_text("project\n")
    _git(repo, "add", "README.md")
    _git(repo, "commit", "-q", "-m", "start")
    (repo / "notes.txt").write_text("uncommitted work\n")  # must survive publishing untouched
    return repo


def test_publish_to_gh_pages_leaves_the_work_tree_alone(site, repo):
    from atlas.site.publish import publish
    root, _ = site
    status = _git(repo, "status", "--porcelain")
    first = publish(root, "gh-pages", repo)
    files = set(_git(repo, "ls-tree", "-r", "--name-only", "gh-pages").split())
    assert files == {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert {".nojekyll", "index.html", "tiny/conv1/index.html"} <= files
    assert _git(repo, "branch", "--show-current").strip() == "main"
    assert _git(repo, "status", "--porcelain") == status
    assert publish(root, "gh-pages", repo) == first  # nothing new to commit
    (root / "extra.txt").write_text("x")
    try:
        second = publish(root, "gh-pages", repo)
    finally:
        (root / "extra.txt").unlink()
    assert _git(repo, "rev-parse", f"{second}^").strip() == first


def test_publish_to_docs(site, repo):
    from atlas.site.publish import publish
    root, _ = site
    (repo / "docs").mkdir()
    (repo / "docs" / "guide.md").write_text("the project's own docs")
    with pytest.raises(AtlasError, match="already holds other files"):
        publish(root, "docs", repo)
    (repo / "docs" / "guide.md").unlink()
    docs = Path(publish(root, "docs", repo))
    assert (docs / "index.html").read_bytes() == (root / "index.html").read_bytes()
    publish(root, "docs", repo)  # replaces its own earlier copy
    assert (docs / "tiny" / "conv1" / "index.html").is_file()
    with pytest.raises(AtlasError, match="unknown publish mode"):
        publish(root, "pages", repo)


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
