"""The rendered site in a real browser (headless Chromium through Playwright).

Every page reachable from index.html is visited, through file:// and through
http under a sub-path (the site's parent is served, so the site lives at
/site/...). No link may be broken, no image missing, no console error logged
and no request may leave the site's folder.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urldefrag

import pytest

from atlas.site import render
from atlas.site.data import slug
from atlas.site.pictures import PICTURE_EXT as EXT
from atlas.testing.synthetic import write_synthetic_store

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # the browser tests need the optional `playwright` package
    sync_playwright = None

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LAYERS = [("conv1", 4, 8), ("block.0.relu@1", 5, 4), ("fc", 3, 1)]
CLASSES = ["tench", "goldfish", "great white shark"]
METHODS = ("gradient", "integrated_gradients", "guided_backprop", "grad_cam")  # every kind of badge and palette


def chromium_path() -> str | None:
    """The system Chromium: $ATLAS_CHROMIUM, /usr/bin/chromium, or the first one on PATH."""
    candidates = [os.environ.get("ATLAS_CHROMIUM"), "/usr/bin/chromium",
                  *(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _missing() -> str | None:
    if sync_playwright is None:
        return "the playwright package is not installed (pip install playwright)"
    if chromium_path() is None:
        return "no Chromium found (apt-get install chromium, or set ATLAS_CHROMIUM)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None and not os.environ.get("CI"), reason=f"browser tests skipped: {_missing()}")

# Waits for every image (lazy ones too) and every CSS background image; returns those that failed.
_BROKEN_IMAGES = """async () => {
  const load = (src) => new Promise((done) => {
    const probe = new Image();
    probe.onload = () => done(probe.naturalWidth > 0);
    probe.onerror = () => done(false);
    probe.src = src;
  });
  const bad = [];
  for (const img of Array.from(document.images)) {
    img.loading = "eager";
    if (!(await load(img.currentSrc || img.src)) || (img.complete && img.naturalWidth === 0)) bad.push(img.src);
  }
  const backgrounds = new Set();
  for (const el of document.querySelectorAll("*")) {
    for (const m of getComputedStyle(el).backgroundImage.matchAll(/url\\("?(.*?)"?\\)/g)) backgrounds.add(m[1]);
  }
  for (const src of backgrounds) if (!(await load(src))) bad.push(src);
  return {bad, images: document.images.length, backgrounds: backgrounds.size};
}"""


def launch(playwright) -> Browser:
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    store = write_synthetic_store(tmp / "tiny.h5", LAYERS, n_images=3, k=2, fv_size=16, image_size=32,
                                  name="tiny", classes=CLASSES, views=("channel", "diversity"), methods=METHODS,
                                  incomplete={"integrated_gradients"}, unit_size=16, check_images=2)
    render(store, tmp / "site", progress=False)
    return tmp / "site"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(site: Path) -> Iterator[str]:
    """The site's parent over http on 127.0.0.1, a free port; yields the site's URL."""
    handler = functools.partial(_QuietHandler, directory=str(site.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/{site.name}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class Crawl:
    """What a visit of every page found: pages, and every problem, as readable strings."""

    def __init__(self, page: Page, prefix: str):
        self.prefix, self.pages = prefix, 0
        self.visited: list[str] = []
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.images = 0
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{page.url}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        page.on("request", lambda r: r.url.startswith(prefix) or self.outside.append(r.url))
        # ERR_ABORTED is a load the browser cancelled because the crawl moved on to the next
        # page (the favicon, typically); a missing file shows as a 4xx response instead
        page.on("requestfailed", lambda r: r.failure == "net::ERR_ABORTED"
                or self.errors.append(f"failed {r.url}: {r.failure}"))
        page.on("response", lambda r: r.status < 400 or self.errors.append(f"{r.status} {r.url}"))


def crawl(page: Page, start: str) -> Crawl:
    """Visits every page reachable from `start`, checking its images and collecting its links."""
    prefix = start.rsplit("/", 1)[0] + "/"
    found = Crawl(page, prefix)
    seen: set[str] = set()
    todo = [start]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        page.goto(url, wait_until="load")
        found.pages += 1
        found.visited.append(url)
        result = page.evaluate(_BROKEN_IMAGES)
        found.errors += [f"{url}: image did not load: {src}" for src in result["bad"]]
        found.images += result["images"] + result["backgrounds"]
        for link in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
            target = urldefrag(link).url
            if not target.startswith(prefix):
                found.outside.append(f"{url} links to {link}")
            elif target.endswith(".html") or target.endswith("/"):
                todo.append(target)
    return found


def _assert_clean(found: Crawl, site: Path) -> None:
    units = sum(channels for _, channels, _ in LAYERS)
    assert found.pages >= 1 + 3 + len(LAYERS) + units + 3, f"only {found.pages} pages reached"
    assert any(url.endswith("/tiny/checks.html") for url in found.visited)
    assert found.images > 0
    assert found.errors == []
    assert found.outside == []


def test_site_over_file_urls(browser: Browser, site: Path) -> None:
    page = browser.new_page()
    found = crawl(page, (site / "index.html").as_uri())
    page.close()
    _assert_clean(found, site)


def test_site_under_a_sub_path(browser: Browser, site: Path, server: str) -> None:
    page = browser.new_page()
    found = crawl(page, server + "index.html")
    page.close()
    _assert_clean(found, site)


def _search(page: Page, query: str) -> list[tuple[str, str]]:
    page.fill("form.search input", query)
    hits = page.eval_on_selector_all("form.search .hits a", "els => els.map(e => [e.textContent, e.href])")
    return [tuple(hit) for hit in hits]


def test_search_box_finds_layers_units_and_classes(browser: Browser, site: Path) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto((site / "tiny" / "conv1" / "2.html").as_uri())  # a page two folders down
    hits = _search(page, "block.0.relu@1:4")
    assert hits[0] == ("block.0.relu@1:4", (site / "tiny" / slug("block.0.relu@1") / "4.html").as_uri())
    assert _search(page, "block.0.relu@1:5") == []  # the layer has 5 units: 0 to 4
    assert ("layer fc, 3 units", (site / "tiny" / "fc" / "index.html").as_uri()) in _search(page, "FC")
    hits = _search(page, "goldf")
    assert ("class goldfish: unit 1 of the output", (site / "tiny" / "fc" / "1.html").as_uri()) in hits
    page.press("form.search input", "Enter")
    page.wait_for_url(hits[0][1])
    page.goto((site / "index.html").as_uri())  # the site index searches every model
    assert _search(page, "conv1:3")[0][1] == (site / "tiny" / "conv1" / "3.html").as_uri()
    page.close()
    assert errors == []


PHONE = {"width": 390, "height": 844}


def test_pages_fit_a_phone(browser: Browser, site: Path) -> None:
    """On a phone-wide screen no page scrolls sideways (wide tables scroll in their own box)."""
    page = browser.new_page(viewport=PHONE)
    wide = []
    for rel in ("tiny/images/0.html", "tiny/checks.html", "tiny/conv1/0.html", "tiny/about.html"):
        page.goto((site / rel).as_uri(), wait_until="load")
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > PHONE["width"]:
            wide.append(f"{rel}: {width} px")
    page.close()
    assert wide == []


def test_heatmaps_draw_over_the_photo(browser: Browser, site: Path) -> None:
    """Every map is a tile of the page's one sprite over the photo; the checkbox takes the photo away."""
    page = browser.new_page()
    page.goto((site / "tiny" / "images" / "1.html").as_uri(), wait_until="load")
    style = page.eval_on_selector(".hm", "el => { const s = getComputedStyle(el); return "
                                  "[s.backgroundImage, s.backgroundBlendMode, el.clientWidth, el.clientHeight]; }")
    assert "1-maps." in style[0] and "1.jpg" in style[0]
    assert style[1].startswith("multiply") and style[2] == style[3] > 0
    page.uncheck("input.under")
    assert page.eval_on_selector(".hm", "el => getComputedStyle(el).backgroundBlendMode").startswith("normal")
    page.close()


def test_randomization_strips_draw_from_one_sprite(browser: Browser, site: Path) -> None:
    """Every strip tile of the checks page is a distinct window onto the checks-strips sprite, with a label."""
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((site / "tiny" / "checks.html").as_uri(), wait_until="load")
    tiles = page.eval_on_selector_all(".st", "els => els.map(el => { const s = getComputedStyle(el); return "
                                      "[s.backgroundImage, s.backgroundPosition, el.clientWidth, el.clientHeight, "
                                      "el.getAttribute('aria-label')]; })")
    page.close()
    groups = 6  # the synthetic store's default
    assert len(tiles) == len(METHODS) * 2 * (groups + 1)
    assert all("checks-strips." in t[0] and t[2] == t[3] == 56 and t[4] for t in tiles)
    assert len({t[1] for t in tiles}) == len(tiles)  # each tile its own place in the sprite
    assert sum("checks-strips." in url for url in requests) == 1
    assert len([url for url in requests if url.endswith((f".{EXT}", ".jpg", ".png", ".svg"))]) <= 20
