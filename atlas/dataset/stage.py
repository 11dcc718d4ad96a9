"""The dataset stage: one streaming pass over the search set, then one read of the example images.

The pass hooks every selected layer at once. Inside each hook the activation
is folded into per-channel summaries (topk.py) the moment the layer produces
it, so memory never holds more than one batch of feature maps and does not
grow with the number of images. Each rank keeps one running summary over all
the image ranges it streams and writes it as one part (`summary/<rank>`),
rewritten as ranges finish, so the parts hold one summary per rank, not one
per range; each range leaves only its bookkeeping (`images/<range>`: names,
labels, predictions; a few bytes per image). Summaries of any ranks, merged
in any order, equal a single pass's (ties broken by image index).

After the pass, examples.py chooses the explained set and reads just the
images it needs again: every unit's top and bottom examples, cut to crops,
and the explained images' pixels.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from atlas import devices, distributed
from atlas.dataset import examples, labelling
from atlas.dataset.concepts import EMBED_DIMS, project
from atlas.dataset.images import image_loader
from atlas.dataset.reader import STAGE, SUMMARY, decoding_workers, done_spans, source_records, span_key
from atlas.dataset.topk import LayerSummary
from atlas.dataset.fields import field_centres, receptive_field
from atlas.layers import Capture, embedding_layer
from atlas.store import read_attrs

CHECKPOINT_SHARE = 0.1  # at most this share of the pass's time goes to rewriting the running summary
# Compiling the fused reductions costs up to 15 s on a 2-core CPU (less once the compiler's disk cache
# holds them) and saves 15 to 70 ms per image there; a pass over fewer images runs them eagerly.
FUSE_FROM_IMAGES = 128


def run(ctx) -> None:
    """Streams the images the store has not seen through the model, then cuts the examples."""
    cfg = ctx.config
    records = source_records(cfg, ctx.loaded.class_names)
    # the layers are part of the settings: each summary holds exactly these layers
    done = ctx.begin(STAGE, {**cfg.stage_params(STAGE), "layers": [l.name for l in ctx.layers]})
    spans = [(a, min(a + cfg.data_unit, len(records))) for a in range(0, len(records), cfg.data_unit)]
    finished = distributed.on_main(lambda: done_spans(ctx.store, done))
    todo = ctx.ranks.shard([s for s in spans if span_key(*s) not in finished])
    size = ctx.loaded.input_size
    rf = {l.name: receptive_field(ctx.loaded.model, l, size, ctx.device) for l in ctx.layers}
    centres = {l.name: field_centres(ctx.loaded.model, l, size, ctx.device) for l in ctx.layers}
    attrs = {"rf": rf, "centres": centres, "k": cfg.topk, "pool": cfg.label_pool, "source": "embedded sample photos" if cfg.data is None else Path(cfg.data).name,
             "total": len(records), "layers": [l.name for l in ctx.layers]}
    if todo:
        _stream(ctx, records, todo, attrs)
    distributed.barrier()  # every rank's summary is written before the examples are chosen
    examples.run(ctx, records, attrs)
    labelling.run(ctx)


class _Running:
    """This rank's running summary of every layer, and the ranges it covers; saved as one part."""

    def __init__(self, ctx, attrs: dict, fuse: bool):
        self.ctx, self.attrs = ctx, attrs
        self.key = f"{SUMMARY}{ctx.ranks.rank:04d}"
        cfg = ctx.config
        self.layers = {l.name: LayerSummary(l.channels, cfg.topk, ctx.device, fuse, cfg.label_pool)
                       for l in ctx.layers}
        self.spans: list[str] = []
        self.seconds = 0.0  # of streaming, over the spans: what the pass cost
        if self.key in ctx.store.done(STAGE):  # resume: go on from what this rank had written
            with ctx.store.read_unit(STAGE, self.key) as part:
                self.spans = list(read_attrs(part).get("spans", []))
                self.seconds = float(part.attrs.get("pass_seconds", 0.0))
                for name, s in self.layers.items():
                    s.merge({k: part[f"{name}/{k}"][...] for k in s.arrays()})
        self.saved, self.cost = time.perf_counter(), 0.0

    def save(self, force: bool = False) -> None:
        """Writes the summary, unless the last write was so recent that writing again would cost
        more than CHECKPOINT_SHARE of the time (a kill then loses only the ranges since)."""
        now = time.perf_counter()
        if not force and (now - self.saved) * CHECKPOINT_SHARE < self.cost:
            return
        arrays = {f"{name}/{k}": v for name, s in self.layers.items() for k, v in s.arrays().items()}
        self.ctx.store.write_unit(STAGE, self.key, arrays, {**self.attrs, "spans": self.spans,
                                                            "pass_seconds": self.seconds})
        self.saved = time.perf_counter()
        self.cost = self.saved - now


def _stream(ctx, records, todo: list[tuple[int, int]], attrs: dict) -> None:
    images = sum(b - a for a, b in todo)
    running = _Running(ctx, attrs, ctx.config.fuse and images >= FUSE_FROM_IMAGES)
    batch = ctx.config.data_batch
    loader = _Loader(ctx, records, todo, batch)
    with ctx.bar(images, "dataset pass", "img") as bar:
        for first, end in todo:
            start = time.perf_counter()
            book, batch = _fitting_range(ctx, running, loader, first, end, bar, batch)
            ctx.store.write_unit(STAGE, span_key(first, end), book, {"total": len(records)})
            running.spans.append(span_key(first, end))
            running.seconds += time.perf_counter() - start
            running.save(force=(first, end) == todo[-1])


class _Loader:
    """The decoded batches of every range to stream, none straddling two ranges.

    One DataLoader serves them all, so its workers start once and decode the
    next range's first images while the model is still on this one's last. A
    range streamed with another batch size (one that ran out of memory, and
    every range after it) gets a loader of its own.
    """

    def __init__(self, ctx, records, todo: list[tuple[int, int]], size: int):
        self.ctx, self.records, self.size = ctx, records, size
        batches = [list(range(i, min(i + size, end))) for first, end in todo for i in range(first, end, size)]
        self.workers = decoding_workers(ctx.config, sum(end - first for first, end in todo))
        self.shared = iter(self._loader(range(len(records)), batch_sampler=batches)) if batches else None

    def _loader(self, indices: range, **batching):
        return image_loader(self.records, self.ctx.loaded.preprocess, indices, self.workers, **batching)

    def batches(self, first: int, end: int, size: int):
        """The batches of images first..end-1, `size` at a time: (pixels, index, skip reasons) each."""
        if self.shared is not None and size == self.size:
            return itertools.islice(self.shared, -(-(end - first) // size))
        self.shared = None  # its workers stop; what they had decoded ahead is not needed any more
        return self._loader(range(first, end), batch_size=size)


def _fitting_range(ctx, running: _Running, loader: _Loader, first: int, end: int, bar, batch: int):
    """Streams one range; on out-of-memory, again with half the batch, from the summary as it was
    before the range. Returns its bookkeeping and the batch that fitted."""
    start = bar.n
    before = {name: s.arrays() for name, s in running.layers.items()} if ctx.device.type != "cpu" else None
    tries = []

    def attempt(size: int) -> dict[str, np.ndarray]:
        if tries and before is not None:  # a range that ran out of memory starts over
            for name, s in running.layers.items():
                running.layers[name] = s.fresh()
                running.layers[name].merge(before[name])
        tries.append(size)
        bar.update(start - bar.n)
        return _run_range(ctx, loader.records, running.layers, loader.batches(first, end, size), bar)
    return devices.fit(attempt, batch,
                       lambda size: tqdm.write(f"atlas: out of GPU memory; dataset batch halved to {size}"),
                       too_big=f"one image of {ctx.loaded.name} does not fit in GPU memory with every selected "
                               f"layer hooked; select fewer layers (--layers) or use --device cpu")


def _run_range(ctx, records, summaries: dict[str, LayerSummary], batches, bar) -> dict[str, np.ndarray]:
    loaded = ctx.loaded
    batch: dict = {"index": torch.zeros(0, dtype=torch.long), "span": None}  # the images in flight
    fns: dict[str, list] = {name: [lambda act, s=s: s.add(act, batch["index"], batch["span"])]
                            for name, s in summaries.items()}
    for layer in ctx.layers:  # a pre-activation is read before its layer's own hook, in the same pass
        if layer.name in summaries and layer.pre:
            fns.setdefault(layer.pre, []).insert(0, summaries[layer.name].add_pre)
    embedded: list[torch.Tensor] = []
    embedding = embedding_layer(loaded.model, len(loaded.class_names))
    if embedding is not None:  # each image's penultimate embedding, projected (concepts.py): what facets cluster
        fns.setdefault(embedding, []).append(lambda act: embedded.append(project(act).cpu()))
    hooks = {name: (lambda act, f=f: [g(act) for g in f]) for name, f in fns.items()}
    kept, top5, prob5, skipped = [], [], [], []
    with torch.no_grad(), Capture(loaded.model, list(hooks), fn=hooks) as capture:
        for pixels, index, reasons in batches:
            ok = torch.tensor([not r for r in reasons], dtype=torch.bool)
            skipped += [(int(i), r) for i, r in zip(index, reasons) if r]
            bar.update(len(index))
            if not ok.any():
                continue
            batch["index"] = index[ok].to(ctx.device)  # ascending, as LayerSummary.add needs
            batch["span"] = (int(index[ok][0]), int(index[ok][-1]))
            capture.run(loaded.preprocess.from_uint8(pixels[ok]).to(ctx.device))
            p5, c5 = torch.softmax(capture.returned.float(), dim=1).topk(min(5, capture.returned.shape[1]), dim=1)
            kept.append(index[ok]); top5.append(c5.cpu()); prob5.append(p5.cpu())
    book = _bookkeeping(records, kept, top5, prob5, skipped)
    if embedding is not None:
        book["embedding"] = torch.cat(embedded).numpy() if embedded else np.zeros((0, EMBED_DIMS), np.float16)
    return book


def _bookkeeping(records, kept, top5, prob5, skipped) -> dict[str, np.ndarray]:
    idx = torch.cat(kept).numpy() if kept else np.zeros(0, np.int64)
    return {
        "index": idx, "paths": np.array([records[i].name for i in idx], dtype=str),
        "labels": np.array([records[i].label for i in idx], np.int64),
        "top5": torch.cat(top5).numpy() if top5 else np.zeros((0, 5), np.int64),
        "top5_prob": torch.cat(prob5).numpy() if prob5 else np.zeros((0, 5), np.float32),
        "skipped_paths": np.array([records[i].name for i, _ in skipped], dtype=str),
        "skipped_reasons": np.array([r for _, r in skipped], dtype=str),
    }
