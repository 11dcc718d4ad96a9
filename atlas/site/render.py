"""Renders a store to a static site: plain HTML, relative links, no request outside it.

    site/index.html                      every model rendered into this folder
    site/static/atlas.css, atlas.js      shared assets
    site/<model>/index.html              layers with previews
    site/<model>/about.html              how the store was made, what it holds
    site/<model>/<layer>/index.html      every unit, drawn from sprite sheets
    site/<model>/<layer>/<channel>.html  one unit; <channel>-views.avif its other views in one strip
    site/<model>/<layer>/atlas.html      the layer's activation atlas, where it has one; atlas.avif its picture
    site/<model>/<layer>/caricature-<k>.avif  the layer's caricatures, shown on its index.html
    site/<model>/images/<index>.html     one dataset image with its attributions
    site/<model>/checks.html             sanity checks of every attribution method
    site/<model>/checks-strips.avif      its randomization strips, one sprite

    site/<model>/search.js               the search box's index of the model
    site/<model>/compare/<other>/        `atlas compare` with another model (kept by a render)

Every file is written in place through a temporary name and an atomic rename,
and only when its content differs from what is there: a crash never leaves a
half-written file, and re-rendering after a stage added units rewrites only
the pages and images that changed. Files of an earlier render that this one no
longer produces are removed at the end. The site index is rebuilt from the
`summary.json` each model folder holds, which is written last.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import jinja2
import markupsafe
import numpy as np
from tqdm import tqdm

import atlas
from atlas.config import MAX_SITE_MB
from atlas.errors import AtlasError
from atlas.site import about, image_pages, pages
from atlas.site import activation_atlas as site_atlas
from atlas.site import blocks as site_blocks
from atlas.site import caricatures as site_caricatures
from atlas.site import checks as checks_page
from atlas.site import circuits as site_circuits
from atlas.site import labels as site_labels
from atlas.site import pictures as img
from atlas.site.budget import Plan, plan_views
from atlas.site.comparisons import listed_comparisons
from atlas.site.data import (COMPARISONS, Layer, Model, crops, pictures, read_blocks, read_checks, read_dataset,
                             read_layer_arrays, read_model, unit_attribution)
from atlas.site.writer import SiteWriter, folder_bytes, site_sizes, size_table
from atlas.store import open_store
from atlas.store.schema import (ATTRIBUTION, BOTTOMK, DATASET, FEATUREVIS, LAYERS, SECONDARY_VIEWS, TOPK,
                                 UNIT_ATTRIBUTION, view_dataset)

# Nothing but the site's own files may load: no CDN, font, tracker or frame.
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; base-uri 'none'; form-action 'none'")
_CHUNK = 64  # dataset images and maps read per HDF5 slice


def templates_dir() -> Path:
    """The templates folder: inside the installed package, else at the repository root."""
    package = Path(__file__).resolve().parent.parent  # atlas/
    for candidate in (package / "templates", package.parent / "templates"):
        if (candidate / "base.html").is_file():
            return candidate
    raise AtlasError(f"the site templates are missing (looked in {package / 'templates'} and "
                     f"{package.parent / 'templates'}); reinstall Atlas")


def environment() -> jinja2.Environment:
    """The site's jinja2 environment (autoescaped, strict): a render's pages and those written beside them."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir()), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = pages.fmt
    env.filters["num3"] = lambda value: pages.fmt(value, 3)
    env.globals.update(csp=markupsafe.Markup(CSP), version=atlas.__version__)  # a constant, safe as is
    return env


def render(store_path: str | Path, site_dir: str | Path, progress: bool = True,
           max_site_mb: float = MAX_SITE_MB) -> dict:
    """Renders one store into `site_dir/<model>/` and rewrites the site's index.

    Args:
        store_path: a consolidated store (.h5).
        site_dir: the site folder; other models already rendered there are kept
            and listed in its index.
        progress: show a progress bar over pages.
        max_site_mb: the size budget of the whole site folder: the secondary
            views shrink to fit it, and the report says whether the site does.

    Returns:
        A report: model name, folder, pages, files changed, files removed,
        bytes per part of the model (html, featurevis, sprites, dataset,
        attributions, search), bytes of the whole site, how the secondary
        views were sized (`views_note`, None when at their stored side),
        whether the site is over its budget, and seconds taken.

    Raises:
        AtlasError: the store is missing, unreadable, or not an Atlas store.
    """
    start = time.perf_counter()
    site_dir = Path(site_dir)
    env = environment()
    with open_store(store_path) as f:
        model = read_model(f)
        final = site_dir / model.slug
        shutil.rmtree(site_dir / f".{model.slug}.rendering", ignore_errors=True)  # left by older versions
        others = sum(folder_bytes(site_dir, skip=model.slug).values())
        with tqdm(total=_page_count(model), disable=not progress, unit="page",
                  desc=f"site {model.name}") as bar:
            writer = SiteWriter(final, env, depth=1, search=[f"{model.slug}/search.js"], bar=bar)
            plan, note = _render_model(f, model, writer, others, int(max_site_mb * 1e6))
    removed = writer.remove_others(keep=COMPARISONS)  # written by `atlas compare`, not by a render
    root = write_site_root(site_dir, env)
    site_bytes = site_sizes(site_dir)
    return {"model": model.name, "folder": str(final), "pages": writer.pages + root["pages"],
            "changed": writer.changed + root["changed"], "removed": removed,
            "bytes": dict(sorted(writer.bytes.items())), "site_bytes": site_bytes,
            "view_scale": plan.scale, "crop_side": plan.crop_side, "estimates": plan.estimates, "views_note": note,
            "max_site_mb": max_site_mb, "over_budget": sum(site_bytes.values()) > max_site_mb * 1e6,
            "seconds": round(time.perf_counter() - start, 2)}


def report_lines(report: dict, site_dir: str | Path) -> tuple[list[str], str | None]:
    """What the command line prints of a render report: the size table (and how the views were
    sized), and a warning when the site is over its budget (None if it is not)."""
    lines = size_table(report["site_bytes"]).splitlines()
    if report["views_note"]:
        lines.append(f"  {report['views_note']}")
    warning = None
    if report["over_budget"]:
        total_mb = sum(report["site_bytes"].values()) / 1e6
        warning = (f"warning: the site in {site_dir} is {total_mb:.0f} MB, over its budget of "
                   f"{report['max_site_mb']:g} MB (GitHub Pages publishes at most 1 GB); render fewer views, "
                   f"layers or images")
    return lines, warning


def _page_count(model: Model) -> int:
    units = sum(layer.channels for layer in model.layers)
    n = len(model.explained)
    return units + len(model.layers) + n + image_pages.image_index_count(n) + 3


def _render_model(f: h5py.File, model: Model, w: SiteWriter, others: int,
                  budget: int) -> tuple[Plan, str | None]:
    """Writes every page and picture of one model; returns the plan that sized its secondary views
    and the line that says so (None when they keep their stored side).

    Args:
        others: bytes of the rest of the site (other models).
        budget: bytes the whole site may take.
    """
    dataset = read_dataset(f) if model.n_images else None
    checks = read_checks(f)
    if dataset is not None:
        _render_images(f, model, dataset, checks, w)
    w.wait()
    plan = plan_views(f, model, others + sum(w.bytes.values()), budget)
    note = plan.describe(_stored_side(model))
    views_line = pages.views_line(model, note)
    extra: dict[str, dict] = {}
    labelled: list[dict] = []  # each layer's labelled units, for the search index
    drawn = {l.name: site_circuits.rendered(f[LAYERS][l.name]) for l in model.layers}
    after = site_circuits.read_circuits(f[LAYERS][model.layers[0].name]) if model.layers else None
    for i, layer in enumerate(model.layers):
        group = f[LAYERS][layer.name]
        here = after  # each layer's circuits are read once: as its inputs, then as the layer before's outputs
        after = site_circuits.read_circuits(f[LAYERS][model.layers[i + 1].name]) if i + 1 < len(model.layers) else None
        arrays = read_layer_arrays(group)
        if model.n_images == 0:  # examples point into /dataset: without it they cannot be shown
            arrays = {k: v for k, v in arrays.items() if not k.startswith((f"{TOPK}/", f"{BOTTOMK}/"))}
        sheets = _render_pictures(layer, arrays, pictures(group), w, plan.scale)
        preview = f"{layer.slug}/preview.{img.PICTURE_EXT}" if sheets else None
        extra[layer.name] = pages.layer_summary(arrays, preview)
        extra[layer.name]["atlas"] = site_atlas.render_atlas(model, i, group, w)  # its page, or None
        labelled.append(site_labels.search_entries(model, i, arrays))
        _render_layer(model, i, arrays, sheets, dataset, group, w, views_line, plan.crop_side,
                      lambda c: site_circuits.unit_circuits(model, i, c, here, after, drawn))
    w.page("index.html", "model.html", **pages.model_context(model, extra, checks))
    w.page("about.html", "about.html", **about.about_context(f, model, dataset, checks, note))
    strips = checks_page.strip_sprite(checks, dataset)
    if strips is not None:  # every randomization strip of the page in one file
        w.write(strips[1]["src"], img.encode(strips[0], "strip"), "attributions")
    w.page("checks.html", "checks.html",
           **checks_page.checks_context(model, checks, dataset, pages.model_crumbs(model, "sanity checks"),
                                        strips[1] if strips is not None else None))
    w.write("search.js", about.search_script(model, dataset, site_labels.search_index(labelled, len(model.layers))),
            "search")
    summary = about.summary(model, extra)
    w.write("summary.json", json.dumps(summary, indent=1, sort_keys=True).encode(), "html")
    w.wait()
    return plan, note


def _stored_side(model: Model) -> int | None:
    """The stored side of the secondary views, when every layer renders them at the same side."""
    sides = {l.view_params[v].get("size") for l in model.layers for v in SECONDARY_VIEWS if v in l.view_params}
    side = sides.pop() if len(sides) == 1 else None
    return int(side) if isinstance(side, (int, np.integer)) else None


def _done(arrays: dict, view: str, channels: int) -> np.ndarray:
    return arrays.get(f"{FEATUREVIS}/{view_dataset(view, 'finite')}", np.ones(channels, bool)).astype(bool)


def _render_pictures(layer: Layer, arrays: dict, stored: dict[str, h5py.Dataset], w: SiteWriter,
                     scale: float = 1.0) -> list[dict]:
    """Writes a layer's visualizations of every view, sprite sheets and preview; returns the sheets.

    The views other than `channel` are written at `scale` of their stored side.

    Pictures are read SHEET_UNITS channels at a time, so a wide layer never
    sits in memory whole.
    """
    ext = img.PICTURE_EXT
    secondary = [v for v in SECONDARY_VIEWS if v in stored]
    if secondary:
        done = {v: _done(arrays, v, layer.channels) for v in secondary}
        for start in range(0, layer.channels, img.SHEET_UNITS):
            chunks = {v: stored[v][start:start + img.SHEET_UNITS] for v in secondary}
            for j in range(len(chunks[secondary[0]])):
                views = [chunks[v][j] for v in secondary if done[v][start + j]]
                if views:
                    w.write(f"{layer.slug}/{start + j}-views.{ext}", img.encode(img.views_strip(views, scale)),
                            "featurevis")
    if "channel" not in stored or not layer.channels:
        return []
    done = _done(arrays, "channel", layer.channels)
    sheets = []
    for n, start in enumerate(range(0, layer.channels, img.SHEET_UNITS)):
        chunk, ok = stored["channel"][start:start + img.SHEET_UNITS], done[start:start + img.SHEET_UNITS]
        for j in np.flatnonzero(ok):
            w.write_later(f"{layer.slug}/{start + j}.{ext}", lambda p=chunk[j]: img.encode(p), "featurevis")
        pixels, sheet = img.sprite_sheet(chunk, ok)
        w.write_later(f"{layer.slug}/sprite-{n}.{ext}", lambda p=pixels: img.encode(p, "sprite"), "sprites")
        sheets.append({"href": f"sprite-{n}.{ext}", "size": sheet.css_size()})
        if start == 0:
            w.write(f"{layer.slug}/preview.{ext}", img.encode(img.preview_strip(chunk, ok), "sprite"),
                    "sprites")
    return sheets


def _render_layer(model: Model, i: int, arrays: dict, sheets: list[dict], dataset: dict | None,
                  group: h5py.Group, w: SiteWriter, views_line: str | None, crop_side: int | None = None,
                  circuits=lambda c: None) -> None:
    """Writes the layer's grid page, and each unit's page with its example and attribution strips.

    Unit-attribution maps and example crops are read SHEET_UNITS channels at a time.

    Args:
        crop_side: pixels of one example crop in the site (None: as stored).
        circuits: channel -> the unit's circuits section (site/circuits.py), or None.
    """
    layer = model.layers[i]
    w.page(f"{layer.slug}/index.html", "layer.html", **pages.layer_context(model, i, arrays, sheets),
           atlas=site_atlas.page_of(group), caricatures=site_caricatures.render_caricatures(model, i, group, w))
    maps, params = unit_attribution(group) if dataset is not None else (None, {})
    scale = group[UNIT_ATTRIBUTION].get("scale") if maps is not None else None
    if not isinstance(scale, h5py.Dataset) or scale.shape != maps.shape[:2]:
        scale = None  # stores written before scales kept the maps unscaled
    stored = crops(group) if dataset is not None else {}
    facet_pictures = site_labels.read_facet_pictures(group)
    for start in range(0, layer.channels, img.SHEET_UNITS):
        chunk = maps[start:start + img.SHEET_UNITS] if maps is not None else None
        if chunk is not None and scale is not None:  # back to attribution units, so one scale fits the strip
            chunk = chunk.astype(np.float32) * scale[start:start + img.SHEET_UNITS][..., None, None]
        strips = {name: ds[start:start + img.SHEET_UNITS] for name, ds in stored.items()}
        for c in range(start, min(start + img.SHEET_UNITS, layer.channels)):
            fired = _unit_strip(layer, c, chunk[c - start], w) if chunk is not None else None
            if fired is not None:
                fired["params"] = params
            strip = _examples_strip(layer, c, {n: s[c - start] for n, s in strips.items()}, arrays, w, crop_side)
            w.page(f"{layer.slug}/{c}.html", "unit.html",
                   **pages.unit_context(model, i, c, arrays, dataset, views_line, fired, maps is not None, strip),
                   circuits=circuits(c), facet_fv=site_labels.write_facet_pictures(layer.slug, c, facet_pictures, w))


def _examples_strip(layer: Layer, c: int, stored: dict[str, np.ndarray], arrays: dict, w: SiteWriter,
                    side: int | None) -> dict | None:
    """Writes unit c's example crops (top, then bottom) as one strip; returns its layout, or None."""
    if not stored:
        return None
    lists = {name: img.decode_crops(data, int(arrays[f"{name}/index"].shape[1])) for name, data in stored.items()}
    first, total = {}, 0
    for name, tiles in lists.items():
        first[name], total = total, total + len(tiles)
    side = min(side or 10**6, next(iter(lists.values())).shape[1])
    src = f"{c}-examples.{img.PICTURE_EXT}"
    tiles = list(lists.values())
    w.write_later(f"{layer.slug}/{src}", lambda: img.encode(img.examples_strip(tiles, side), "crops"), "examples")
    return {"src": src, "total": total, "first": first}


def _unit_strip(layer: Layer, c: int, maps: np.ndarray, w: SiteWriter) -> dict | None:
    """Writes unit c's attribution maps [Ku, R, R] as one strip; returns what its page needs, or None."""
    side = min(img.UNIT_HEAT_SIDE, maps.shape[-1])
    pixels, scale = img.unit_strip(maps, side)
    if pixels is None:
        return None
    src = f"{c}-attribution.{img.PICTURE_EXT}"
    w.write_later(f"{layer.slug}/{src}", lambda: img.encode(pixels, "heat"), "attributions")
    return {"src": src, "scale": scale, "finite": [bool(np.isfinite(m).any()) for m in maps]}


def _render_images(f: h5py.File, model: Model, dataset: dict, checks: dict | None, w: SiteWriter) -> None:
    """Writes each explained image once (JPEG), one sprite of all its attribution maps, and its page.

    Pages are named by the image's /dataset row; the pixels and maps are read by
    its place in the explained set.
    """
    rows = model.explained
    methods = checks_page.ordered(model.methods)
    signed = [checks_page.is_signed(m, dataset["attribution"][m]["params"]) for m in methods]
    groups = {m: f[ATTRIBUTION][m] for m in methods}
    images = f[DATASET]["images"] if rows else None
    blocks = read_blocks(f)
    for start in range(0, len(rows), _CHUNK):
        pixels = images[start:start + _CHUNK]
        maps = {m: g["maps"][start:start + _CHUNK] for m, g in groups.items()}
        label_maps = {m: g["label_maps"][start:start + _CHUNK] for m, g in groups.items()
                      if dataset["attribution"][m]["has_label_maps"]}
        for j, picture in enumerate(pixels):
            i, pos = rows[start + j], start + j
            w.write(f"images/{i}.jpg", img.encode(picture, "photo", "jpg"), "dataset")
            sprite = None
            if methods:
                shown = image_pages.label_methods(dataset, methods, pos, label_maps)
                cells = [[maps[m][j] for m in methods]]
                if shown:
                    cells.append([label_maps[m][j] if m in shown else None for m in methods])
                side = min(img.HEAT_SIDE, picture.shape[0])
                sheet, scales = img.map_sprite(cells, signed, side)
                sprite = {"src": f"{i}-maps.{img.PICTURE_EXT}", "scales": scales, "rows": len(cells)}
                w.write(f"images/{sprite['src']}", img.encode(sheet, "heat"), "attributions")
            building = site_blocks.image_blocks(model, blocks, pos, i, picture, w)
            w.page(f"images/{i}.html", "image.html",
                   **image_pages.image_context(model, dataset, checks, i, methods, sprite, building))
    for number, context in enumerate(image_pages.image_index_contexts(model, dataset)):
        w.page(image_pages.image_index_name(number), "images.html", **context)


def write_site_root(site_dir: str | Path, env: jinja2.Environment | None = None) -> dict:
    """(Re)writes the site's index of models, shared assets, `.nojekyll` and `404.html`.

    The index lists every `<model>/summary.json` found in `site_dir`, and every comparison
    (`<model>/compare/<other>/compare.json`, written by `atlas compare`).

    Args:
        site_dir: the site folder.
        env: the jinja2 environment; a new one by default.

    Returns:
        pages: pages written; changed: files whose content changed.
    """
    site_dir = Path(site_dir)
    env = env or environment()
    models = _rendered_models(site_dir)
    search = [f"{m['slug']}/search.js" for m in models
              if isinstance(m.get("slug"), str) and (site_dir / m["slug"] / "search.js").is_file()]
    w = SiteWriter(site_dir, env, depth=0, search=search)
    for asset in sorted((templates_dir() / "static").iterdir()):
        if asset.is_file():
            w.write(f"static/{asset.name}", asset.read_bytes(), "html")
    w.write(".nojekyll", b"", "html")
    w.page("index.html", "index.html", models=models, comparisons=listed_comparisons(site_dir), crumbs=[],
           title="Model atlases")
    w.page("404.html", "404.html")
    return {"pages": w.pages, "changed": w.changed}


def _rendered_models(site_dir: Path) -> list[dict]:
    """The summary of every model rendered into the site folder, by name."""
    models = []
    for path in sorted(site_dir.glob("*/summary.json")):
        if path.parent.name.startswith("."):
            continue  # a model being rendered or swapped out
        try:
            models.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a folder that is not a rendered model: leave it out of the index
    return sorted(models, key=lambda m: m.get("name", ""))
