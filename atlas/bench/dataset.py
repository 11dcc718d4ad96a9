"""Dataset-pass benchmark: Atlas's hooked streaming pass against a plain `model(x)` pass.

Both passes read the same images through the same DataLoader settings, so the
ratio isolates what hooking every selected layer, folding it into top-k lists
and statistics, and writing the work unit cost on top of inference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from atlas import models
from atlas.bench.common import best_time, child_peak, repeated_samples
from atlas.config import preset
from atlas.dataset import stage as dataset
from atlas.dataset.images import image_loader
from atlas.dataset.reader import span_key
from atlas.devices import keep_host_memory, resolve_device
from atlas.layers import discover, select
from atlas.pipeline import Context
from atlas.store import Store


def _context(model: str, weights: str, n: int, batch: int, workers: int, device: str, root: Path) -> Context:
    dev = resolve_device(device)
    if dev.type == "cpu":  # as a build does (pipeline.prepare)
        keep_host_memory()
    loaded = models.load(model, weights).to(dev)
    layers = select(loaded.model, discover(loaded.model, loaded.input_size, dev))
    cfg = preset("quick").replace(model=model, data_batch=batch, workers=workers, data_unit=max(n, 1),
                                  store_dir=root)
    store = Store(root, loaded.name)
    store.open({"spec": loaded.spec, "name": loaded.name, "weights_id": loaded.weights_id})
    store.begin(dataset.STAGE, {})
    return Context(cfg, loaded, dev, layers, store, progress=False)


def _plain(ctx: Context, records) -> None:
    loader = image_loader(records, ctx.loaded.preprocess, range(len(records)), ctx.config.workers,
                          batch_size=ctx.config.data_batch)
    with torch.no_grad():
        for pixels, _, _ in loader:
            ctx.loaded.model(ctx.loaded.preprocess.from_uint8(pixels).to(ctx.device))


def _atlas(ctx: Context, records) -> None:
    """One range of the dataset pass as the stage streams it: the hooked pass, its bookkeeping part and
    the running summary written once."""
    for old in (ctx.store.parts / dataset.STAGE).glob("summary*.h5"):
        old.unlink()  # each timed pass starts afresh, as a new build does
    running = dataset._Running(ctx, {"k": ctx.config.topk}, ctx.config.fuse)
    spans = [(0, len(records))]
    loader = dataset._Loader(ctx, records, spans, ctx.config.data_batch)
    book = dataset._run_range(ctx, records, running.layers, loader.batches(0, len(records), ctx.config.data_batch),
                              tqdm(disable=True))
    ctx.store.write_unit(dataset.STAGE, span_key(0, len(records)), book)
    running.save(force=True)


def peak(model: str, weights: str, images: int, batch: int, workers: int, device: str) -> dict:
    """One Atlas pass over `images` images (run in a child process by `child_peak`)."""
    with tempfile.TemporaryDirectory() as root:
        ctx = _context(model, weights, images, batch, workers, device, Path(root))
        _atlas(ctx, repeated_samples(images))
    cuda = torch.cuda.max_memory_allocated() if ctx.device.type == "cuda" else 0
    return {"cuda_peak_bytes": cuda}


def run(model: str = "resnet50", weights: str = models.RANDOM, images: int = 128, batch: int = 32,
        workers: int = 2, device: str = "cpu") -> dict:
    """Times both passes on the same images, then measures peak memory at 1x and 4x the images."""
    records = repeated_samples(images)
    with tempfile.TemporaryDirectory() as root:
        ctx = _context(model, weights, images, batch, workers, device, Path(root))
        print(f"{model} ({ctx.loaded.weights_id}), {len(ctx.layers)} layers hooked, "
              f"{sum(l.channels for l in ctx.layers)} channels, {images} images, batch {batch}, "
              f"{workers} workers, {ctx.device}", flush=True)
        _plain(ctx, records[:batch]), _atlas(ctx, records[:batch])  # warm-up
        plain = best_time(lambda: _plain(ctx, records))
        hooked = best_time(lambda: _atlas(ctx, records))
    print(f"plain forward: {images / plain:.1f} img/s; atlas pass: {images / hooked:.1f} img/s", flush=True)
    args = {"model": model, "weights": weights, "batch": batch, "workers": workers, "device": device}
    one, four = child_peak(__name__, {**args, "images": images}), child_peak(__name__, {**args, "images": 4 * images})
    key = "cuda_peak_bytes" if one["cuda_peak_bytes"] else "maxrss_kb"
    print(f"peak memory ({key}): {one[key]} with {images} images, {four[key]} with {4 * images}", flush=True)
    return {"throughput_vs_plain_forward": plain / hooked, "peak_mem_ratio_4x_images": four[key] / one[key]}
