"""Screenshots of a rendered atlas for the README: index, layer, unit, image and checks pages, a unit's
circuits, an image's building blocks, an activation atlas, and a comparison (where `atlas compare` has
written one).

    atlas render atlas-data/efficientnet_lite0.h5 --out site
    python docs/screenshots/make.py site docs/screenshots

One page of any site, from a section down (a CSS selector) where one is given; the README's ViT unit page:

    python docs/screenshots/make.py --page site/vit_b_16/encoder.layers.encoder_layer_11/0.html \
        docs/screenshots/vit-unit.png section.fv

Needs the `playwright` package and a system Chromium (/usr/bin/chromium, or
$ATLAS_CHROMIUM). Each PNG is a 1000x700 view reduced to a palette of at most 256 colours
(and scaled down where a busy page needs it) so it stays under 150 KB.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_browser import launch  # noqa: E402  (the browser settings the tests use)

SIZE = {"width": 1000, "height": 700}


def pages(site: Path) -> dict[str, Path | tuple[Path, str]]:
    """The pages to shoot: the site index, and of the first model a middle layer, its unit 0, image 0,
    checks; (page, selector) shoots from that section of a page down."""
    summary = json.loads(next(iter(sorted(site.glob("*/summary.json")))).read_text())
    model = site / summary["slug"]
    layers = sorted((p for p in model.iterdir() if (p / "index.html").is_file() and p.name != "images"),
                    key=lambda p: p.name)
    layer = layers[len(layers) // 2]
    shots = {"index": site / "index.html", "layer": layer / "index.html", "unit": layer / "0.html",
             "image": model / "images" / "0.html", "checks": model / "checks.html",
             "circuits": (layer / "0.html", "section.circuits"),
             "blocks": (model / "images" / "0.html", "section.blocks")}
    atlas = next(iter(sorted(model.glob("*/atlas.html"))), None)
    if atlas is not None:  # the first layer with an activation atlas (the default atlas: only the deepest)
        shots["activation-atlas"] = (atlas, ".aa-tools")
    comparison = next(iter(sorted(model.glob("compare/*/index.html"))), None)
    if comparison is not None:
        pages_of = sorted(p for p in comparison.parent.glob("*.html") if p.name != "index.html")
        shots["compare"] = comparison
        if pages_of:
            shots["compare-layer"] = pages_of[len(pages_of) // 2]
    return shots


MAX_BYTES = 150_000


def optimize(png: bytes) -> bytes:
    """A palette PNG under MAX_BYTES: fewer colours first, then a smaller picture (busy grids)."""
    rgb = Image.open(io.BytesIO(png)).convert("RGB")
    for scale, colours in ((1, 256), (1, 128), (1, 64), (0.8, 128), (0.8, 64), (0.7, 64), (0.6, 64)):
        small = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        small.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
        if out.tell() <= MAX_BYTES:
            break
    return out.getvalue()


def shoot(shots: dict[str, Path | tuple[Path, str]], out: Path, root: Path) -> None:
    """Writes `out/<name>.png` for each (page, optional section to scroll to) of `shots`."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport=SIZE)
        for name, where in shots.items():
            path, section = where if isinstance(where, tuple) else (where, None)
            page.goto(path.resolve().as_uri(), wait_until="load")
            if section is not None:
                found = page.evaluate(f"(e => e && (e.scrollIntoView(), true))"
                                      f"(document.querySelector({json.dumps(section)}))")
                if not found:  # a site without that section (a one-layer atlas has no circuits)
                    print(f"{name}.png skipped: no {section} on {path.name}")
                    continue
            data = optimize(page.screenshot())
            (out / f"{name}.png").write_bytes(data)
            print(f"{name}.png {len(data) // 1024} KB  ({path.resolve().relative_to(root.resolve())})")
        browser.close()


def main(argv: list[str]) -> None:
    if argv[:1] == ["--page"]:
        if len(argv) not in (3, 4) or not Path(argv[1]).is_file():
            sys.exit("usage: make.py --page PAGE.html OUT.png [SELECTOR] (PAGE.html: a page of a rendered site)")
        page, png = Path(argv[1]), Path(argv[2])
        shoot({png.stem: (page, argv[3]) if len(argv) == 4 else page}, png.parent, page.parent)
        return
    site = Path(argv[0] if argv else "site")
    shoot(pages(site), Path(argv[1] if len(argv) > 1 else "docs/screenshots"), site)


if __name__ == "__main__":
    main(sys.argv[1:])
