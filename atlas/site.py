"""Renders a store to a static site: plain HTML, relative links, no request outside it.

    site/index.html                      every model rendered into this folder
    site/static/atlas.css, atlas.js      shared assets
    site/<model>/index.html              layers with previews
    site/<model>/about.html              how the store was made, what it holds
    site/<model>/<layer>/index.html      every unit, drawn from sprite sheets
    site/<model>/<layer>/<channel>.html  one unit
    site/<model>/images/<index>.html     one dataset image with its attributions

A model is rendered into a temporary folder and swapped into place when
complete, so a crash never leaves a half-written model behind. The site index
is rebuilt from the `summary.json` each model folder holds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import h5py
import jinja2
import markupsafe
import numpy as np
from tqdm import tqdm

import atlas
from atlas import site_images as img
from atlas import site_pages as pages
from atlas.errors import AtlasError
from atlas.site_data import Layer, Model, pictures, read_dataset, read_layer_arrays, read_model, slug
from atlas.store import open_store

# Nothing but the site's own files may load: no CDN, font, tracker or frame.
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; base-uri 'none'; form-action 'none'")
_CHUNK = 64  # dataset images and maps read per HDF5 slice


def templates_dir() -> Path:
    """The templates folder: inside the installed package, else at the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "base.html").is_file():
            return candidate
    raise AtlasError(f"the site templates are missing (looked in {here / 'templates'} and "
                     f"{here.parent / 'templates'}); reinstall Atlas")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir()), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = pages.fmt
    env.globals.update(csp=markupsafe.Markup(CSP), version=atlas.__version__)  # a constant, safe as is
    return env


class SiteWriter:
    """Writes files under one folder, counting pages and bytes per part of the site."""

    def __init__(self, base: Path, env: jinja2.Environment, depth: int, bar: tqdm | None = None):
        """
        Args:
            base: the folder written into.
            env: the jinja2 environment.
            depth: how many folders `base` lies below the site root.
            bar: progress bar advanced once per page.
        """
        self.base, self.env, self.depth, self.bar = base, env, depth, bar
        self.bytes: Counter[str] = Counter()
        self.pages = 0
        self._folders: set[Path] = set()

    def path(self, rel: str) -> Path:
        """The file for a relative path; refuses anything that could leave `base`."""
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise AtlasError(f"refusing to write {rel!r}: not a plain relative path inside {self.base}")
        return self.base.joinpath(*parts)

    def write(self, rel: str, data: bytes, part: str) -> None:
        """Writes bytes to `rel`, counted under `part` (html, featurevis, ...)."""
        path = self.path(rel)
        if path.parent not in self._folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(path.parent)
        path.write_bytes(data)
        self.bytes[part] += len(data)

    def page(self, rel: str, template: str, **context: object) -> None:
        """Renders `template` to `rel`, giving it `root`, the relative path up to the site root."""
        context.setdefault("root", "../" * (rel.count("/") + self.depth))
        html = self.env.get_template(template).render(**context)
        self.write(rel, html.encode(), "html")
        self.pages += 1
        if self.bar is not None:
            self.bar.update()


def render(store_path: str | Path, site_dir: str | Path, progress: bool = True) -> dict:
    """Renders one store into `site_dir/<model>/` and rewrites the site's index.

    Args:
        store_path: a consolidated store (.h5).
        site_dir: the site folder; other models already rendered there are kept
            and listed in its index.
        progress: show a progress bar over pages.

    Returns:
        A report: model name, folder, pages written, bytes per part of the site
        (html, featurevis, sprites, dataset, attributions) and seconds taken.

    Raises:
        AtlasError: the store is missing, unreadable, or not an Atlas store.
    """
    start = time.perf_counter()
    site_dir = Path(site_dir)
    env = _environment()
    with open_store(store_path) as f:
        model = read_model(f)
        final = site_dir / model.slug
        tmp = site_dir / f".{model.slug}.rendering"
        shutil.rmtree(tmp, ignore_errors=True)
        with tqdm(total=_page_count(model), disable=not progress, unit="page",
                  desc=f"site {model.name}") as bar:
            writer = SiteWriter(tmp, env, depth=1, bar=bar)
            try:
                _render_model(f, model, writer)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    _swap(tmp, final)
    root_pages = write_site_root(site_dir, env)
    return {"model": model.name, "folder": str(final), "pages": writer.pages + root_pages,
            "bytes": dict(sorted(writer.bytes.items())), "seconds": round(time.perf_counter() - start, 2)}


def _page_count(model: Model) -> int:
    units = sum(layer.channels for layer in model.layers)
    return units + len(model.layers) + model.n_images + pages.image_index_count(model.n_images) + 2


def _swap(tmp: Path, final: Path) -> None:
    """Replaces `final` by `tmp`; the old folder is removed only once the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _render_model(f: h5py.File, model: Model, w: SiteWriter) -> None:
    dataset = read_dataset(f) if model.n_images else None
    if dataset is not None:
        _render_images(f, model, dataset, w)
    extra: dict[str, dict] = {}
    for i, layer in enumerate(model.layers):
        group = f["layers"][layer.name]
        arrays = read_layer_arrays(group)
        if model.n_images == 0:  # examples point into /dataset: without it they cannot be shown
            arrays = {k: v for k, v in arrays.items() if not k.startswith(("topk/", "bottomk/"))}
        sheets = _render_pictures(layer, arrays, pictures(group), w)
        preview = f"{layer.slug}/preview.{img.PICTURE_EXT}" if sheets else None
        extra[layer.name] = pages.layer_summary(arrays, preview)
        _render_layer(model, i, arrays, sheets, dataset, w)
    w.page("index.html", "model.html", **pages.model_context(model, extra))
    w.page("about.html", "about.html", **pages.about_context(f, model, dataset))
    summary = pages.summary(model, extra)
    w.write("summary.json", json.dumps(summary, indent=1, sort_keys=True).encode(), "html")


def _done(arrays: dict, view: str, channels: int) -> np.ndarray:
    return arrays.get(f"featurevis/{view}_done", np.ones(channels, bool)).astype(bool)


def _render_pictures(layer: Layer, arrays: dict, stored: dict[str, h5py.Dataset], w: SiteWriter) -> list[dict]:
    """Writes a layer's visualizations of every view, sprite sheets and preview; returns the sheets.

    Pictures are read SHEET_UNITS channels at a time, so a wide layer never
    sits in memory whole.
    """
    ext = img.PICTURE_EXT
    for view in ("negative", "neuron", "diversity"):
        if view not in stored:
            continue
        done = _done(arrays, view, layer.channels)
        for start in range(0, layer.channels, img.SHEET_UNITS):
            chunk = stored[view][start:start + img.SHEET_UNITS]
            for j in np.flatnonzero(done[start:start + len(chunk)]):
                pixels = img.strip(chunk[j]) if view == "diversity" else chunk[j]
                w.write(f"{layer.slug}/{start + j}-{view}.{ext}", img.encode(pixels), "featurevis")
    if "channel" not in stored or not layer.channels:
        return []
    done = _done(arrays, "channel", layer.channels)
    sheets = []
    for n, start in enumerate(range(0, layer.channels, img.SHEET_UNITS)):
        chunk, ok = stored["channel"][start:start + img.SHEET_UNITS], done[start:start + img.SHEET_UNITS]
        for j in np.flatnonzero(ok):
            w.write(f"{layer.slug}/{start + j}.{ext}", img.encode(chunk[j]), "featurevis")
        pixels, sheet = img.sprite_sheet(chunk, ok)
        w.write(f"{layer.slug}/sprite-{n}.{ext}", img.encode(pixels, quality=80), "sprites")
        sheets.append({"href": f"sprite-{n}.{ext}", "size": sheet.css_size()})
        if start == 0:
            w.write(f"{layer.slug}/preview.{ext}", img.encode(img.preview_strip(chunk, ok), quality=80),
                    "sprites")
    return sheets


def _render_layer(model: Model, i: int, arrays: dict, sheets: list[dict], dataset: dict | None,
                  w: SiteWriter) -> None:
    layer = model.layers[i]
    w.page(f"{layer.slug}/index.html", "layer.html", **pages.layer_context(model, i, arrays, sheets))
    for c in range(layer.channels):
        w.page(f"{layer.slug}/{c}.html", "unit.html", **pages.unit_context(model, i, c, arrays, dataset))


def _render_images(f: h5py.File, model: Model, dataset: dict, w: SiteWriter) -> None:
    """Writes each dataset image once (JPEG), its attribution heatmaps, and its page."""
    images, n = f["dataset/images"], model.n_images
    for start in range(0, n, _CHUNK):
        pixels = images[start:start + _CHUNK]
        maps = {m: f["attribution"][m]["maps"][start:start + _CHUNK] for m in model.methods}
        for j, picture in enumerate(pixels):
            i = start + j
            w.write(f"images/{i}.jpg", img.encode(picture, "jpg", quality=88), "dataset")
            heat = {}
            for method, values in maps.items():
                colours, scale = img.heatmap(values[j])
                heat[method] = scale
                w.write(f"images/{i}-{slug(method)}.{img.PICTURE_EXT}", img.encode(colours, quality=80),
                        "attributions")
            w.page(f"images/{i}.html", "image.html", **pages.image_context(model, dataset, i, heat))
    for number, context in enumerate(pages.image_index_contexts(model, dataset)):
        w.page(pages.image_index_name(number), "images.html", **context)


def write_site_root(site_dir: str | Path, env: jinja2.Environment | None = None) -> int:
    """(Re)writes the site's index of models, shared assets, `.nojekyll` and `404.html`.

    The index lists every `<model>/summary.json` found in `site_dir`.

    Args:
        site_dir: the site folder.
        env: the jinja2 environment; a new one by default.

    Returns:
        The number of pages written.
    """
    site_dir = Path(site_dir)
    env = env or _environment()
    w = SiteWriter(site_dir, env, depth=0)
    for asset in sorted((templates_dir() / "static").iterdir()):
        if asset.is_file():
            w.write(f"static/{asset.name}", asset.read_bytes(), "html")
    w.write(".nojekyll", b"", "html")
    models = []
    for path in sorted(site_dir.glob("*/summary.json")):
        if path.parent.name.startswith("."):
            continue  # a model being rendered or swapped out
        try:
            models.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a folder that is not a rendered model: leave it out of the index
    models.sort(key=lambda m: m.get("name", ""))
    w.page("index.html", "index.html", models=models, crumbs=[], title="Model atlases")
    w.page("404.html", "404.html")
    return w.pages
