"""The static site: links, escaping, sprites, missing stages, determinism, re-rendering, publishing.

The pages of units, layers, images and the about page are tested in test_site_pages.py, the checks
page in test_site_checks.py, sizes and budgets in test_site_budget.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from atlas.errors import AtlasError
from atlas.site import render
from atlas.site.data import slug
from atlas.site.pictures import PICTURE_EXT as EXT
from atlas.site.writer import SiteWriter
from atlas.testing.synthetic import add_featurevis, write_synthetic_store


def test_every_link_from_the_index_exists(site, crawl, html_files, spec):
    root, report = site
    reached = crawl(root / "index.html")
    pages = {p for p in reached if p.suffix == ".html"}
    # Every page except 404.html is reachable from the index.
    assert pages == {p.resolve() for p in html_files(root)} - {(root / "404.html").resolve()}
    assert len(pages) + 1 == report["pages"]
    units = sum(c for _, c, _ in spec.LAYERS)
    assert len(pages) >= units + len(spec.LAYERS) + spec.N_IMAGES


def test_no_absolute_or_external_urls(site, refs, html_files):
    root, _ = site
    for page in html_files(root):
        for url in refs(page).urls:
            assert not url.startswith(("/", "http:", "https:", "//", "data:", "file:")), (page, url)
            assert "://" not in url and not url.startswith("//"), (page, url)


def test_every_img_has_alt(site, refs, html_files, spec):
    root, _ = site
    counted = 0
    for page in html_files(root):
        r = refs(page)
        counted += r.imgs
        assert r.imgs_without_alt == 0, page
    assert counted > spec.N_IMAGES


def test_root_files(site):
    root, report = site
    assert (root / ".nojekyll").is_file()
    assert "not found" in (root / "404.html").read_text().lower()
    assert (root / "static" / "atlas.css").is_file() and (root / "static" / "atlas.js").is_file()
    assert set(report["bytes"]) == {"html", "featurevis", "sprites", "dataset", "examples", "attributions", "search"}
    assert set(report["site_bytes"]) == set(report["bytes"]) | {"static"}
    assert all(v > 0 for v in report["bytes"].values())


def test_csp_and_no_remote_loads(site, html_files):
    root, _ = site
    for page in html_files(root):
        text = page.read_text()
        assert "Content-Security-Policy" in text and "default-src 'none'" in text, page
        assert "@import" not in text and "<iframe" not in text


def test_store_strings_are_escaped(site, html_files, spec):
    root, _ = site
    texts = {p: p.read_text() for p in html_files(root)}
    for page, text in texts.items():
        assert spec.XSS not in text, page
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


def test_layer_grid_uses_sprites(site, refs):
    root, _ = site
    page = root / "tiny" / "block.0.relu-401" / "index.html"
    r = refs(page)
    pictures = {u for u in r.urls if u.endswith((f".{EXT}", ".jpg", ".png"))}
    assert pictures == {f"sprite-0.{EXT}", f"sprite-1.{EXT}"}  # 300 units: two sheets of 256
    assert r.imgs == 0
    assert len(re.findall(r'href="\d+\.html" class="u ', page.read_text())) == 300
    assert len(list(page.parent.glob("sprite-*"))) == 2


def test_crops_come_from_one_strip_per_unit(site, spec):
    root, _ = site
    images = root / "tiny" / "images"
    assert len(list(images.glob("*.jpg"))) == spec.N_IMAGES
    assert len(list(images.glob(f"*.{EXT}"))) == spec.N_IMAGES  # one sprite of every method's maps per image
    unit = (root / "tiny" / "conv1" / "0.html").read_text()
    crops = re.findall(r'class="crop" role="img" aria-label="image \d+" style="--i:(\d+)"', unit)
    assert sorted(map(int, crops)) == list(range(8))  # k=4 highest and 4 lowest: the strip's 8 tiles
    assert unit.count('class="crops ex" style="--n:8"') == 2  # both lists index one strip ...
    assert f"<style>.crops.ex .crop {{ background-image: url(0-examples.{EXT}); }}</style>" in unit  # ... this one
    fired = re.findall(r'class="crop hu" role="img" aria-label="[^"]+" style="([^"]+)"', unit)
    assert len(fired) == 3 and all(f"url(0-examples.{EXT}) " in c and "/800% 100%" in c for c in fired)
    assert (root / "tiny" / "conv1" / f"0-examples.{EXT}").is_file()


def test_missing_featurevis_is_explained(site):
    root, _ = site
    for page in (root / "tiny" / "fc" / "index.html", root / "tiny" / "fc" / "0.html"):
        assert "Feature visualization has not run for this layer" in page.read_text()
    assert not [p for p in (root / "tiny" / "fc").glob(f"*.{EXT}") if not p.stem.endswith(("-attribution", "-examples"))]
    assert "Feature visualization has not run" not in (root / "tiny" / "conv1" / "0.html").read_text()


def test_partial_featurevis(tmp_path, site_store):
    store = site_store(tmp_path, name="partial")
    with h5py.File(store, "r+") as f:
        f["layers/conv1/featurevis/channel_done"][2] = False
    render(store, tmp_path / "site", progress=False)
    layer = tmp_path / "site" / "partial" / "conv1"
    assert "partial: grey units are not rendered yet" in (layer / "index.html").read_text()
    assert re.search(r'href="2\.html" class="u nofv', (layer / "index.html").read_text())
    assert "has not been rendered yet" in (layer / "2.html").read_text()
    assert not (layer / f"2.{EXT}").exists() and (layer / f"1.{EXT}").exists()


def test_store_without_dataset_or_attribution(tmp_path, crawl, site_store):
    store = site_store(tmp_path, name="nodata", n_images=0)
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "nodata"
    assert "The dataset stage has not run" in (model / "index.html").read_text()
    assert "Dataset examples have not been computed" in (model / "conv1" / "0.html").read_text()
    assert not (model / "images").exists()
    crawl(tmp_path / "site" / "index.html")

    assert "No checks in this store: run <code>atlas attribute</code>" in (model / "checks.html").read_text()

    store = site_store(tmp_path, name="noattr", methods=())
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "noattr"
    assert "Attribution has not run" in (model / "images" / "0.html").read_text()
    assert "No checks in this store" in (model / "checks.html").read_text()
    assert "Unit attributions have not been computed" in (model / "conv1" / "0.html").read_text()
    crawl(tmp_path / "site" / "index.html")


def test_rendering_twice_gives_the_same_files(site, tmp_path, site_store):
    root, _ = site
    store = site_store(tmp_path)
    again = tmp_path / "again"
    render(store, again, progress=False)
    render(store, again, progress=False)  # over an existing render: replaced, not merged
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}  # noqa: E731
    first, second = files(root), files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_index_lists_every_rendered_model(tmp_path, refs, crawl, site_store):
    site_dir = tmp_path / "site"
    for name in ("alpha", "beta"):
        render(site_store(tmp_path, name=name, n_images=2), site_dir, progress=False)
    index = refs(site_dir / "index.html").urls
    assert "alpha/index.html" in index and "beta/index.html" in index
    crawl(site_dir / "index.html")


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
    writer = SiteWriter(tmp_path, env=None, depth=0, search=[])  # type: ignore[arg-type]
    for bad in ("../x.html", "/etc/x", "a/../../x", "a//b", "a\\..\\b"):
        with pytest.raises(AtlasError):
            writer.path(bad)
    assert writer.path("a/b.html") == tmp_path / "a" / "b.html"


def test_writer_finishes_what_its_workers_encode_and_passes_on_their_errors(tmp_path):
    writer = SiteWriter(tmp_path, env=None, depth=0, search=[])  # type: ignore[arg-type]
    n = writer._workers * writer.PENDING_PER_WORKER * 3  # more than may be queued at once
    for i in range(n):
        writer.write_later(f"d/{i}.bin", lambda i=i: bytes([i % 256]) * (i + 1), "featurevis")
    writer.write("d/page.html", b"<p>", "html")
    writer.wait()
    assert writer.bytes == {"featurevis": n * (n + 1) // 2, "html": 3}
    assert writer.changed == n + 1 and len(writer.kept) == n + 1
    assert (tmp_path / "d" / f"{n - 1}.bin").read_bytes() == bytes([(n - 1) % 256]) * n
    with pytest.raises(AtlasError):
        writer.write_later("../x.bin", lambda: b"", "featurevis")

    def broken() -> bytes:
        raise ValueError("codec failed")
    writer.write_later("d/bad.bin", broken, "featurevis")
    with pytest.raises(ValueError, match="codec failed"):
        writer.wait()
    assert not (tmp_path / "d" / "bad.bin").exists()


def test_not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(AtlasError, match="no store file"):
        render(tmp_path / "missing.h5", tmp_path / "site", progress=False)


def test_sprite_cells_show_their_own_unit(site, tmp_path, site_store):
    root, _ = site
    with h5py.File(site_store(tmp_path), "r") as f:
        fv = f["layers/block.0.relu@1/featurevis/channel"][()].astype(float)
    sheet = np.asarray(Image.open(root / "tiny" / "block.0.relu-401" / f"sprite-1.{EXT}").convert("RGB"), float)
    unit = 256 + 2 * 16 + 5  # sheet 1, row 2, column 5; cells are 16 px (the fv size)
    cell = sheet[2 * 16:3 * 16, 5 * 16:6 * 16]
    distance = np.abs(cell[None] - fv).mean(axis=(1, 2, 3))
    assert distance.argmin() == unit  # lossy, but nearer its own unit than any other


def test_search_index_is_small_and_escaped(site):
    root, _ = site
    text = (root / "tiny" / "search.js").read_text()
    assert "<" not in text and text.isascii()
    assert '"block.0.relu@1",' in text and "class 3" in text
    for page in (root / "index.html", root / "tiny" / "conv1" / "0.html"):
        assert "search.js" in page.read_text()



def test_rerender_rewrites_only_what_changed(tmp_path, site_store):
    """Adding featurevis to one layer rewrites that layer's files and the pages that summarize it."""
    store = site_store(tmp_path)
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


def test_rerender_removes_files_no_longer_produced(tmp_path, site_store, spec):
    out = tmp_path / "site"
    render(site_store(tmp_path), out, progress=False)
    render(write_synthetic_store(tmp_path / "tiny.h5", spec.LAYERS[:1], 2, name="tiny"), out, progress=False)
    assert not (out / "tiny" / "fc").exists()
    assert (out / "tiny" / "conv1" / "0.html").is_file()


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


def test_a_strip_cut_with_fewer_images_than_k_decodes_with_grey_tiles():
    import io

    from atlas.site import pictures
    tiles = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (20, 200)])
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(list(tiles), axis=1)).save(buffer, "PNG")
    out = pictures.decode_crops(np.frombuffer(buffer.getvalue(), np.uint8), 4)
    assert out.shape == (4, 8, 8, 3)
    assert np.array_equal(out[:2], tiles) and (out[2:] == pictures.EMPTY).all()
