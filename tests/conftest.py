"""What the tests share, as fixtures: the tiny models, image folders, quick configs, store readers,
the command line, and the synthetic stores and page crawler of the site tests.

No test module imports another (nor this file): each takes what it needs as a fixture.
The helpers are plain functions below; their fixtures hand them out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))
ROOT = Path(__file__).resolve().parent.parent


# --- the command line ---

def _run_atlas(*args: str, cwd: Path, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Runs the `atlas` command line in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "atlas", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"atlas {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def run_atlas():
    """`run_atlas(*args, cwd=..., check=False)`: the command line in a subprocess."""
    return _run_atlas


# --- models ---

@pytest.fixture
def tiny():
    """A fresh atlas:tiny_convnet (the loaded model, with its preprocessing)."""
    from atlas import models
    return models.load("atlas:tiny_convnet")


@pytest.fixture(scope="module")
def convnet() -> torch.nn.Module:
    """atlas:tiny_convnet's module, one per test module: 32 x 32 inputs, 10 classes, in-place ReLUs,
    a ReLU called twice; in eval mode, its weights frozen."""
    from atlas import models
    return models.load("atlas:tiny_convnet").model


# --- image folders ---

def _make_images(folder: Path, n: int = 14) -> Path:
    """`n` random PNGs of varied heights, odd ones in `class 3/`, and two bad files (empty, text)."""
    gen = np.random.default_rng(0)
    for i in range(n):
        sub = folder / ("class 3" if i % 2 else "unlabelled")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = gen.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i:02d}.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    return folder


@pytest.fixture(scope="session")
def make_images():
    """`make_images(folder, n=14)`: a folder of n images and two bad files."""
    return _make_images


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """14 images and 2 bad files, shared by every test that only reads them."""
    return _make_images(tmp_path_factory.mktemp("images"))


def _hostile_folder(root: Path) -> Path:
    """Every image mode, broken and hostile files (truncated, empty, text, a decompression bomb, a name with
    markup) and a file that is not an image: 8 decode, 4 are skipped, 1 is not listed."""
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(rgb).convert("L").save(root / "gray.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(root / "palette.gif")
    rgba = Image.fromarray(np.dstack([rgb, np.full((20, 24), 128, np.uint8)]), "RGBA")
    rgba.save(root / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((np.arange(20 * 24).reshape(20, 24) * 100).astype(np.uint16)).save(root / "deep16.png")
    Image.fromarray(rgb).save(root / "good.jpg", quality=90)
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("<html>not an image</html>")
    Image.new("1", (9000, 9000)).save(root / "bomb.png")  # 81 Mpixel, a few kB on disk
    (root / 'name "<img src=x onerror=alert(1)>".png').write_bytes((root / "rgb.png").read_bytes())
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


@pytest.fixture(scope="session")
def hostile_folder():
    """`hostile_folder(root)`: fills an existing folder with odd and hostile files."""
    return _hostile_folder


# --- builds on the tiny model ---

def _quick_config(tmp_path: Path, data: Path, **kw):
    """The quick preset on the tiny model, small and on the CPU; one attribution method, no checks and
    no activation atlas unless `kw` says otherwise (tests/test_attribution_stage.py asks for more)."""
    from atlas.config import preset
    kw = {"attr_methods": ("gradient",), "attr_check_images": 0, "attr_unit_topk": 0, "atlas_layers": 0, **kw}
    settings = dict(model="atlas:tiny_convnet", data=str(data), store_dir=tmp_path / "store",
                    site_dir=tmp_path / "site", fv_steps=4, fv_size=32, workers=0, topk=4, device="cpu")
    return preset("quick").replace(**{**settings, **kw})


@pytest.fixture(scope="session")
def config():
    """`config(tmp_path, data, **changes)`: a quick Config writing under tmp_path."""
    return _quick_config


def _build_stages(cfg, stages=("dataset", "attribution")):
    from atlas import pipeline
    ctx = pipeline.prepare(cfg, progress=False)
    return ctx, pipeline.run_stages(ctx, stages)


@pytest.fixture(scope="session")
def build_stages():
    """`build_stages(cfg, stages=("dataset", "attribution"))` -> (context, consolidated store path)."""
    return _build_stages


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file; variable-length bytes (encoded pictures) as an object array of bytes."""
    out: dict[str, np.ndarray] = {}

    def read(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            value = obj[()]
            if value.dtype == object and value.size and isinstance(value.flat[0], np.ndarray):
                value = np.array([v.tobytes() for v in value.flat], dtype=object).reshape(value.shape)
            out[name] = value
    with h5py.File(path, "r") as f:
        f.visititems(read)
    return out


@pytest.fixture(scope="session")
def store_arrays():
    """`store_arrays(path)`: every dataset of an HDF5 file, by its path inside it."""
    return _store_arrays


# --- the site: synthetic stores and what their pages refer to ---

SITE = SimpleNamespace(
    XSS="<script>alert(1)</script>",
    LAYERS=[("conv1", 6, 16), ("block.0.relu@1", 300, 8), ('head."q"<i>', 3, 4), ("fc", 4, 1)],
    N_IMAGES=6,
    # a signed method of no known family, the gradients, a path method (incomplete on even images),
    # the insensitive guided backprop and an unsigned CAM
    METHODS=("gradient", "grad×input", "integrated_gradients", "guided_backprop", "grad_cam"),
)
URL_IN_CSS = re.compile(r"url\(([^)]*)\)")


@pytest.fixture(scope="session")
def spec() -> SimpleNamespace:
    """What `site_store` puts in a store: XSS (in class names and paths), LAYERS, N_IMAGES, METHODS."""
    return SITE


def _site_store(tmp: Path, name: str = "tiny", **kwargs) -> Path:
    from atlas.testing.synthetic import write_synthetic_store
    classes = [f'{SITE.XSS} "quoted" \'single\' & class {i}' for i in range(20)]
    paths = [f"photos/{SITE.XSS}\"'{i}.jpg" for i in range(SITE.N_IMAGES)]
    args = {**dict(n_images=SITE.N_IMAGES, k=4, fv_size=16, image_size=32, methods=SITE.METHODS,
                   incomplete={"integrated_gradients"}, name=name, no_featurevis={"fc"}, classes=classes,
                   paths=paths, unit_size=16, check_images=3), **kwargs}
    return write_synthetic_store(tmp / f"{name}.h5", SITE.LAYERS, **args)


@pytest.fixture(scope="session")
def site_store():
    """`site_store(tmp, name="tiny", **changes)`: a synthetic store of `spec`'s layers and methods, with
    hostile strings in its class names, image paths and a layer name."""
    return _site_store


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


def _refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _html_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.html"))


def _crawl(start: Path) -> set[Path]:
    """Every file reachable from `start` through href, src and CSS url(); asserts each exists, anchors too."""
    seen: set[Path] = set()
    todo = [start.resolve()]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for url in _refs(page).urls:
            path, _, anchor = url.partition("#")
            target = (page.parent / path.split("?")[0]).resolve() if path else page
            assert target.is_file(), f"{page} links to missing {url}"
            if anchor and target.suffix == ".html":
                assert anchor in _refs(target).ids, f"{page} links to {url}: no such anchor"
            if target.suffix == ".html":
                todo.append(target)
            else:
                seen.add(target)
    return seen


@pytest.fixture(scope="session")
def refs():
    """`refs(page)`: the page's URLs (.urls), element ids (.ids), images (.imgs) and those without alt text."""
    return _refs


@pytest.fixture(scope="session")
def html_files():
    """`html_files(root)`: every page under root, sorted."""
    return _html_files


@pytest.fixture(scope="session")
def crawl():
    """`crawl(start)`: every file reachable from a page; fails on a missing file or anchor."""
    return _crawl


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The site of the default `site_store` ("tiny", quick views), rendered once: (site folder, report).

    Tests may read it; one that adds a file removes it again."""
    from atlas.site import render
    tmp = tmp_path_factory.mktemp("site")
    report = render(_site_store(tmp), tmp / "site", progress=False)
    return tmp / "site", report


@pytest.fixture(scope="session")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A site rendered from a store holding every view; returns (model folder, store)."""
    from atlas.site import render
    from atlas.store.schema import VIEWS
    tmp = tmp_path_factory.mktemp("full")
    store = _site_store(tmp, name="full", views=VIEWS)
    render(store, tmp / "site", progress=False)
    return tmp / "site" / "full", store


def _badges(page: str) -> dict[str, list[tuple[str, str]]]:
    """Per method of an image page: the (state, text) of each badge in its caption."""
    out = {}
    for caption in re.findall(r"<figcaption><strong>(.*?)</figcaption>", page, re.S):
        name = re.sub(r"<wbr>", "", caption.split("</strong>")[0])
        out[name] = re.findall(r'class="flag (\w+)"[^>]*>([^<]+)<', caption)
    return out


@pytest.fixture(scope="session")
def badges_of():
    """`badges_of(page_text)`: per method of an image page, the (state, text) of each badge in its caption."""
    return _badges


@pytest.fixture(scope="module")
def one_thread():
    """Convolutions this small only lose time to a second thread on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
