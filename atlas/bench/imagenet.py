"""ImageNet-scale benchmark: search N and 4N images, explain a fixed set, measure what grows.

An atlas of ImageNet's 50,000 validation images should cost, beyond the
search pass itself, nothing that grows with the search set: attributions,
checks and image pages go to a fixed `explain` set, and the store and the
site keep only a few bytes per searched image. This benchmark checks that on
a smaller scale: it builds the dataset and attribution stages of the default
model at the quick preset on N and on 4N images, each in its own store,
renders each store's site, and measures

- attribution time at 4N over attribution time at N (target: at most 1.15),
- store and site bytes per added search image, (bytes(4N) - bytes(N)) / 3N
  (targets: at most 4 KB and 1 KB),
- the search pass's images per second at 4N (the streaming pass the dataset
  stage times and records; not the crops or the consolidation) over a plain
  `model(x)` pass's over the same images, read through the same DataLoader
  settings, timed just before and just after the search pass, the mean of
  the two (target: at least 0.8).

The images are synthetic: procedural JPEGs from `atlas.testing.photos` that
compress like photos (about 25 KB each at 256 px), in class folders named
after ImageNet's WordNet ids, so every image has an ImageNet label. They are
not real photos, so the model's predictions on them mean nothing; the
measured costs are those of real images of that size.

Path methods run at their configured points (no completeness-driven
increase): how often Expected Gradients doubles its samples depends on which
images the two builds explain, which differ, and that is not a cost of the
search set's size (the two builds of one run differed by up to 15 % from it).

What takes the time on a CPU is the attribution stage, which does not depend
on N: the maps of the explained set (about 12 s per image at the quick preset
on a 2-core CPU), one unit attribution per unit and the sanity checks. The
default explains 8 images, so the whole run (1,250 images searched, 2,000 in
the plain passes) takes about a quarter of an hour there. A GPU (--device cuda)
shortens both parts.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import ImageNetInfo

from atlas import pipeline, site
from atlas.bench.common import sync
from atlas.config import Config, preset
from atlas.dataset.images import ImageRecord, image_loader
from atlas.dataset.topk import KINDS, reduce_positions
from atlas.errors import AtlasError
from atlas.testing.photos import write_photos

PHOTO_SIZE = 256  # side of each synthetic photo; the default model reads them resized to 224
UPPER = {"attribution_time_ratio_4x": 1.15, "store_kb_per_search_image": 4.0, "site_kb_per_search_image": 1.0}
LOWER = {"search_throughput_vs_plain_forward": 0.8}
SUMMARY = {"attribution_time_ratio_4x": ".2f", "store_kb_per_search_image": ".2f",
           "site_kb_per_search_image": ".2f", "search_throughput_vs_plain_forward": ".3f"}


@dataclass(frozen=True)
class Build:
    """What one build over a search set cost."""

    images: int  # search images
    dataset_s: float  # the dataset stage, consolidation included
    pass_s: float  # of it, the streaming pass over the search set (as the stage records it)
    attribution_s: float  # the attribution stage, consolidation included
    store_bytes: int  # everything under the store folder: the .h5 and the parts
    site_bytes: int  # everything under the site folder


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def summarize(small: Build, large: Build, plain_s: float) -> dict:
    """The benchmark's four numbers from the two builds and the plain pass over the large one's images.

    Args:
        small: the build over N images.
        large: the build over more images (4N).
        plain_s: seconds of a plain forward pass over the large build's images.

    Returns:
        attribution_time_ratio_4x, store_kb_per_search_image, site_kb_per_search_image
        (KB of 1,000 bytes per image added) and search_throughput_vs_plain_forward.
    """
    added = large.images - small.images
    return {"attribution_time_ratio_4x": large.attribution_s / small.attribution_s,
            "store_kb_per_search_image": (large.store_bytes - small.store_bytes) / added / 1e3,
            "site_kb_per_search_image": (large.site_bytes - small.site_bytes) / added / 1e3,
            "search_throughput_vs_plain_forward": plain_s / large.pass_s}


def over_target(result: dict) -> list[str]:
    """One line per number that misses its target."""
    lines = [f"over target: {k}={result[k]:{SUMMARY[k]}} > {limit}" for k, limit in UPPER.items()
             if result[k] > limit]
    return lines + [f"over target: {k}={result[k]:{SUMMARY[k]}} < {limit}" for k, limit in LOWER.items()
                    if result[k] < limit]


def _timed(fn) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def _warm_up(ctx: pipeline.Context) -> None:
    """One forward and backward pass, and the pass's fused reductions compiled, so that the first build
    does not pay alone for the first calls (the throughput compared is the pass's steady state)."""
    size = ctx.loaded.input_size
    x = torch.rand(ctx.config.attr_batch, 3, size, size, device=ctx.device, requires_grad=True)
    torch.autograd.grad(ctx.loaded.model(x).max(1).values.sum(), x)
    with torch.no_grad():  # as the pass calls them: without autograd, on small maps and on maps over 4,096 positions
        for side in (8, size):
            for kind in KINDS:
                reduce_positions(x.detach()[:, :, :side, :side].contiguous(memory_format=torch.channels_last),
                                 ctx.config.fuse, kind)


def _build(config: Config, images: int, root: Path, plain: list[Path] | None = None) -> tuple[Build, list[float]]:
    """The dataset and attribution stages over the first `images` photos, then the site; with `plain`
    photos, the seconds of a plain pass over them just before the dataset stage and just after it."""
    config = config.replace(max_images=images, store_dir=root / f"store-{images}", site_dir=root / f"site-{images}")
    ctx = pipeline.prepare(config, progress=False)
    _warm_up(ctx)
    plain_s = [_plain_s(ctx, plain)] if plain else []
    dataset_s, _ = _timed(lambda: pipeline.run_stages(ctx, ["dataset"]))
    plain_s += [_plain_s(ctx, plain)] if plain else []
    attribution_s, store = _timed(lambda: pipeline.run_stages(ctx, ["attribution"]))
    site.render(store, config.site_dir, progress=False)
    pass_s = sum(float(part.attrs.get("pass_seconds", 0.0)) for _, part in ctx.store.units("dataset", "summary/"))
    build = Build(images, dataset_s, pass_s, attribution_s, folder_bytes(config.store_dir),
                  folder_bytes(config.site_dir))
    print(f"{images:7d} images: dataset {dataset_s:7.1f} s (its pass {pass_s:.1f} s, {images / pass_s:6.1f} img/s), "
          f"attribution "
          f"{attribution_s:7.1f} s, store {build.store_bytes / 1e6:8.2f} MB, site {build.site_bytes / 1e6:8.2f} MB",
          flush=True)
    return build, plain_s


def _plain_s(ctx: pipeline.Context, photos: list[Path]) -> float:
    """Seconds of a plain `model(x)` pass over `photos`, decoded as the dataset stage decodes them."""
    records = [ImageRecord(str(p)) for p in photos]
    loader = image_loader(records, ctx.loaded.preprocess, range(len(records)), ctx.config.workers,
                          batch_size=ctx.config.data_batch)

    def forward(batches: int | None) -> None:
        with torch.no_grad():
            for i, (pixels, _, _) in enumerate(loader):
                if i == batches:
                    break
                ctx.loaded.model(ctx.loaded.preprocess.from_uint8(pixels).to(ctx.device))
    forward(1)  # warm-up: worker start, first-call allocations
    seconds, _ = _timed(lambda: forward(None))
    return seconds


def _photos(folder: Path, n: int, workers: int) -> list[Path]:
    """Writes the n synthetic photos, spread over ImageNet's 1,000 classes (WordNet ids shipped with timm)."""
    start = time.perf_counter()
    paths = write_photos(folder, n, ImageNetInfo().label_names(), size=PHOTO_SIZE, workers=max(1, workers))
    mean_kb = sum(p.stat().st_size for p in paths) / n / 1e3
    print(f"synthetic photos (procedural, not real images): {n} JPEGs of {PHOTO_SIZE} px, mean {mean_kb:.1f} KB, "
          f"in ImageNet WordNet-id class folders; written in {time.perf_counter() - start:.1f} s", flush=True)
    return paths


def run(images: int = 250, explain: int = 8, device: str = "cpu", workers: int = 2, keep: str | None = None,
        layers: tuple[str, ...] = (), methods: tuple[str, ...] = (), model: str = Config.model) -> dict:
    """Builds the default model's dataset and attribution stages over `images` and 4x `images` photos.

    Args:
        images: search images of the smaller build (N); the larger one searches 4N.
        explain: images of each search set that get attributions.
        device: where the model runs.
        workers: image-decoding processes (also the processes that write the photos).
        keep: build in this new or empty folder and keep it, instead of a temporary folder.
        layers: glob patterns of the layers to hook (default: the model's default selection).
        methods: attribution methods (default: the quick preset's).
        model: the model spec.

    Returns:
        The four numbers of `summarize`, plus each build's costs and the plain pass's seconds.

    Raises:
        AtlasError: `keep` is a folder that is not empty.
    """
    if keep and Path(keep).exists() and any(Path(keep).iterdir()):
        raise AtlasError(f"--keep folder {keep} is not empty; give a new or empty folder, so that no earlier "
                         f"store is resumed instead of built")
    with tempfile.TemporaryDirectory(prefix="atlas-bench-imagenet-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        photos = _photos(root / "photos", 4 * images, workers)
        chosen = {"attr_methods": tuple(methods)} if methods else {}
        config = preset("quick").replace(model=model, data=str(root / "photos"), explain=explain, workers=workers,
                                         device=device, layers=tuple(layers), attr_tolerance=float("inf"), **chosen)
        print(f"{model}, quick preset (path methods at fixed points), explain {explain}, {workers} decoding "
              f"workers, device {device}; "
              f"search sets of {images} and {4 * images} images", flush=True)
        small, _ = _build(config, images, root)
        large, around = _build(config, 4 * images, root, plain=photos)
    # the machine's speed drifts over minutes: the plain pass runs just before and just after the search
    # pass it is compared with, and their mean is the reference
    plain_s = sum(around) / len(around)
    print(f"plain forward over {4 * images} images: {around[0]:.1f} s before the search pass, {around[1]:.1f} s "
          f"after ({4 * images / plain_s:.1f} img/s)", flush=True)
    result = summarize(small, large, plain_s)
    for line in over_target(result):
        print(line)
    return {**result, "builds": [small.__dict__, large.__dict__], "plain_s": plain_s}
