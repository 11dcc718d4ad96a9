"""Site benchmark: the static site of a full ResNet-50 atlas, from a synthetic store.

The store has ResNet-50's real default layers (names and channel counts from
`atlas.layers` on torchvision's `resnet50()` at 224 px: 69 layers, 41,664
units), synthetic pixels for every view of the full preset, 10 top and 10
bottom dataset examples per unit (with their crops, as the dataset stage
stores them) found among 50,000 search images (ImageNet's validation set),
1,000 explained images with the maps of every attribution method of the full
preset, and three unit-attribution maps per unit. The site is rendered into a temporary folder and measured against what
GitHub Pages allows: a published site of at most 1 GB.

The synthetic pixels are made to compress like real ones (see
`atlas.testing.synthetic`): feature visualizations like 128 px renders of
EfficientNet-Lite0 (3.6 KB each as the site encodes them), photos like the
sample photos (16 KB at 224 px), attribution maps like that model's real maps
(2.1 KB each at 112 px), so the measured size stands for a real atlas's.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

from atlas.config import preset
from atlas.site import render, site_sizes
from atlas.testing.synthetic import write_synthetic_store

URL = re.compile(r"""url\(([^)]*)\)|<img[^>]*\ssrc="([^"]*)\"""")
TARGETS = {"resnet50_site_mb": 1000, "largest_page_kb": 300, "layer_grid_requests": 20}


def resnet50_layers(size: int = 224) -> list[tuple[str, int, int]]:
    """(name, channels, spatial side) of ResNet-50's default layers, in forward order."""
    import torchvision

    from atlas import layers

    model = torchvision.models.resnet50().eval()  # random weights: only the shapes matter
    chosen = layers.select(model, layers.discover(model, size))
    return [(l.name, l.channels, l.height) for l in chosen]


def grid_requests(page: Path) -> int:
    """Distinct images a layer page loads to show its grid: sprite sheets and <img> sources."""
    html = page.read_text(encoding="utf-8")
    return len({a or b for a, b in URL.findall(html)})


KINDS = {  # what each file of a model folder is, by its path relative to the folder (first match)
    "image page": re.compile(r"images/\d+\.html"), "photo": re.compile(r"images/\d+\.jpg"),
    "attribution maps": re.compile(r"images/\d+-maps\.\w+"),
    "unit page": re.compile(r"[^/]+/\d+\.html"), "channel picture": re.compile(r"[^/]+/\d+\.\w+"),
    "other views strip": re.compile(r"[^/]+/\d+-views\.\w+"),
    "unit attribution strip": re.compile(r"[^/]+/\d+-attribution\.\w+"),
    "example crops strip": re.compile(r"[^/]+/\d+-examples\.\w+"),
    "grid sprite sheet": re.compile(r"[^/]+/sprite-\d+\.\w+"),
}


def per_kind(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(files, bytes) of each kind of file in a model's folder (see KINDS); the rest as "other"."""
    out: dict[str, list[int]] = {kind: [0, 0] for kind in [*KINDS, "other"]}
    for path in model_dir.rglob("*"):
        if path.is_file():
            rel = path.relative_to(model_dir).as_posix()
            kind = next((k for k, pattern in KINDS.items() if pattern.fullmatch(rel)), "other")
            out[kind][0] += 1
            out[kind][1] += path.stat().st_size
    return {k: (n, b) for k, (n, b) in out.items()}


def largest_page(site: Path) -> tuple[Path, int]:
    pages = [(p.stat().st_size, p) for p in site.rglob("*.html")]
    size, path = max(pages)
    return path, size


def run(n_images: int = 50_000, explained: int = 1000, k: int = 10, fv_size: int | None = None,
        views: tuple[str, ...] | None = None, max_layers: int | None = None, keep: Path | None = None) -> dict:
    """Renders the synthetic ResNet-50 atlas and measures its site.

    Args:
        n_images: search-set images (every unit's examples are among them).
        explained: explained images (a page, a photo and the maps of every method each).
        k: top and bottom examples per unit.
        fv_size: feature-visualization side; the full preset's by default.
        views: feature-visualization views; the full preset's by default.
        max_layers: only the first N layers plus the widest one (a quicker, partial run).
        keep: render into this folder instead of a temporary one, and keep it.

    Returns:
        resnet50_site_mb, largest_page_kb, layer_grid_requests, the size of each
        part of the site in MB, pages, and seconds to write the store and render.
    """
    full = preset("full")
    layers = resnet50_layers()
    if max_layers is not None:
        widest = max(layers, key=lambda l: l[1])
        layers = layers[:max_layers] + ([widest] if widest not in layers[:max_layers] else [])
    with tempfile.TemporaryDirectory(prefix="atlas-bench-site-") as tmp:
        folder = Path(keep) if keep else Path(tmp)
        start = time.perf_counter()
        store = write_synthetic_store(folder / "resnet50.h5", layers, n_images, k=k, explained=explained,
                                      fv_size=fv_size or full.fv_size, views=views or full.fv_views,
                                      methods=full.attr_methods, name="resnet50")
        store_s = time.perf_counter() - start
        report = render(store, folder / "site", progress=sys.stderr.isatty())
        sizes = site_sizes(folder / "site")
        kinds = per_kind(folder / "site" / "resnet50")
        page, page_bytes = largest_page(folder / "site")
        widest = max(layers, key=lambda l: l[1])
        grid = folder / "site" / "resnet50" / widest[0] / "index.html"
        out = {"resnet50_site_mb": round(sum(sizes.values()) / 1e6, 1),
               "largest_page_kb": round(page_bytes / 1e3, 1),
               "largest_page": str(page.relative_to(folder / "site")),
               "layer_grid_requests": grid_requests(grid),
               "parts_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
               "layers": len(layers), "units": sum(l[1] for l in layers), "pages": report["pages"],
               "view_scale": report["view_scale"], "crop_side": report["crop_side"],
               "search_images": n_images, "explained": explained,
               "estimated_mb": {"x".join(f"{s:g}" for s in key): round(v / 1e6, 1)
                                for key, v in report["estimates"].items()},
               "store_s": round(store_s, 1), "render_s": report["seconds"],
               "kinds": {k: {"files": n, "mean_kb": round(b / max(n, 1) / 1e3, 2), "mb": round(b / 1e6, 1)}
                         for k, (n, b) in kinds.items()}}
    for kind, row in out["kinds"].items():
        print(f"  {kind:23s} {row['files']:7d} files x {row['mean_kb']:6.2f} KB = {row['mb']:7.1f} MB")
    for part, mb in out["parts_mb"].items():
        print(f"  {part:13s} {mb:9.1f} MB")
    if out["estimated_mb"]:
        print(f"  secondary views at {out['view_scale']:g} of their side, example crops at "
              f"{out['crop_side'] or 'their stored'} px; estimated MB by (view x crop scale): {out['estimated_mb']}")
    print(f"  {'total':13s} {out['resnet50_site_mb']:9.1f} MB; largest page {out['largest_page']} "
          f"{out['largest_page_kb']} KB; {out['pages']} pages; store {out['store_s']} s, render {out['render_s']} s")
    for key, limit in TARGETS.items():
        if out[key] > limit:
            print(f"  over target: {key}={out[key]} > {limit}")
    return out
