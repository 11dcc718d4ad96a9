"""The dataset stage: one streaming pass that finds every channel's top and bottom images.

Every selected layer is hooked at once. Inside each hook the activation is
folded into per-channel summaries (atlas/topk.py) the moment the layer
produces it, so memory never holds more than one batch of feature maps and
does not grow with the number of images. A work unit is a range of images; it
keeps its own top-k, and units merge into the same top-k a single pass gives
(ties broken by image index).
"""

from __future__ import annotations

import h5py
import numpy as np
import torch
from tqdm import tqdm

from atlas.errors import AtlasError
from atlas.images import ImageDataset, list_images
from atlas.layers import Capture, receptive_field
from atlas.store import Store, read_attrs
from atlas.topk import HIST_EDGES, STATS, LayerSummary, TopK

STAGE = "dataset"
def run(ctx) -> None:
    """Streams the images the store has not seen through the model, unit by unit."""
    cfg = ctx.config
    records = list_images(cfg.data, ctx.loaded.class_names)[:cfg.max_images]
    # the layers are part of the settings: each unit holds top-k for exactly these layers
    done = ctx.begin(STAGE, {**cfg.stage_params(STAGE), "layers": [l.name for l in ctx.layers]})
    spans = [(a, min(a + cfg.data_unit, len(records))) for a in range(0, len(records), cfg.data_unit)]
    todo = ctx.ranks.shard([s for s in spans if unit_key(*s) not in done])
    if not todo:
        return
    size = ctx.loaded.input_size
    rf = {l.name: receptive_field(ctx.loaded.model, l, size, ctx.device) for l in ctx.layers}
    source = "embedded sample photos" if cfg.data is None else str(cfg.data)
    batch = cfg.data_batch
    with ctx.bar(sum(b - a for a, b in todo), "dataset examples", "img") as bar:
        for first, end in todo:
            arrays, batch = _fitting_unit(ctx, records, first, end, bar, batch)
            ctx.store.write_unit(STAGE, unit_key(first, end), arrays, {
                "rf": rf, "k": cfg.topk, "source": source, "total": len(records),
                "layers": [l.name for l in ctx.layers]})


def unit_key(first: int, end: int) -> str:
    return f"{first:08d}-{end:08d}"


def _fitting_unit(ctx, records, first: int, end: int, bar, batch: int) -> tuple[dict[str, np.ndarray], int]:
    """Runs one unit; on CUDA out-of-memory, again with half the batch. Returns its arrays and the batch
    that fitted, which the next units start from. A unit's result does not depend on the batch."""
    while True:
        start = bar.n
        try:
            return _run_unit(ctx, records, first, end, bar, batch), batch
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise AtlasError(f"one image of {ctx.loaded.name} does not fit in GPU memory with every "
                                 f"selected layer hooked; select fewer layers (--layers) or use --device cpu") from None
            torch.cuda.empty_cache()
            batch = max(1, batch // 2)
            bar.update(start - bar.n)  # the unit starts over
            tqdm.write(f"atlas: out of GPU memory; dataset batch halved to {batch}")


def _run_unit(ctx, records, first: int, end: int, bar, batch_size: int) -> dict[str, np.ndarray]:
    cfg, loaded = ctx.config, ctx.loaded
    loader = torch.utils.data.DataLoader(ImageDataset(records, loaded.preprocess, range(first, end)),
                                         batch_size=batch_size, num_workers=cfg.workers)
    summaries = {l.name: LayerSummary(l.channels, cfg.topk, ctx.device, cfg.fuse) for l in ctx.layers}
    batch = {"index": torch.zeros(0, dtype=torch.long)}  # global ids of the images in flight
    hooks = {name: (lambda act, s=s: s.add(act, batch["index"])) for name, s in summaries.items()}
    kept, images, top5, prob5, skipped = [], [], [], [], []
    with torch.no_grad(), Capture(loaded.model, list(summaries), fn=hooks) as capture:
        for pixels, index, reasons in loader:
            ok = torch.tensor([not r for r in reasons], dtype=torch.bool)
            skipped += [(int(i), r) for i, r in zip(index, reasons) if r]
            bar.update(len(index))
            if not ok.any():
                continue
            batch["index"] = index[ok].to(ctx.device)  # ascending, as LayerSummary.add needs
            capture.run(loaded.preprocess.from_uint8(pixels[ok]).to(ctx.device))
            p5, c5 = torch.softmax(capture.returned.float(), dim=1).topk(min(5, capture.returned.shape[1]), dim=1)
            kept.append(index[ok]); images.append(pixels[ok].numpy())
            top5.append(c5.cpu()); prob5.append(p5.cpu())
    arrays = _image_arrays(records, kept, images, top5, prob5, skipped, loaded.input_size)
    for name, summary in summaries.items():
        arrays.update({f"{name}/{k}": v for k, v in summary.arrays().items()})
    return arrays


def _image_arrays(records, kept, images, top5, prob5, skipped, size) -> dict[str, np.ndarray]:
    idx = torch.cat(kept).numpy() if kept else np.zeros(0, np.int64)
    return {
        "index": idx, "images": np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8),
        "paths": np.array([records[i].name for i in idx], dtype=str),
        "labels": np.array([records[i].label for i in idx], np.int64),
        "top5": torch.cat(top5).numpy() if top5 else np.zeros((0, 5), np.int64),
        "top5_prob": torch.cat(prob5).numpy() if prob5 else np.zeros((0, 5), np.float32),
        "skipped_paths": np.array([records[i].name for i, _ in skipped], dtype=str),
        "skipped_reasons": np.array([r for _, r in skipped], dtype=str),
    }


def box_of(pos: np.ndarray, height: int, width: int, rf: int, size: int) -> np.ndarray:
    """Crop boxes (x0, y0, x1, y1) of side rf around flat positions in an h x w map."""
    cy = (pos // width + 0.5) * size / height
    cx = (pos % width + 0.5) * size / width
    half = rf / 2
    x0 = np.clip(np.round(cx - half), 0, size - rf)
    y0 = np.clip(np.round(cy - half), 0, size - rf)
    return np.stack([x0, y0, x0 + rf, y0 + rf], -1).astype(np.int32)


def consolidate(store: Store, f: h5py.File) -> None:
    """Writes /dataset and, per layer, the merged top-k, bottom-k and statistics.

    One pass over the parts folds every layer at once, so each part is opened
    once and memory holds one summary per layer, whatever the number of parts.
    """
    compact, attrs = _write_images(store, f)
    k = int(attrs.get("k", 10))
    merged = {name: _Merged(int(g.attrs["channels"]), k) for name, g in f["layers"].items()}
    for _, part in store.units(STAGE):
        for name in list(merged):
            if f"{name}/top_value" not in part:
                del merged[name]  # the layer was added after this pass: no dataset examples for it yet
            else:
                merged[name].add(part, name)
    for name, m in merged.items():
        _write_layer(f, name, m, compact, attrs["rf"][name], k)


class _Merged:
    """The running merge of one layer's top-k, bottom-k and statistics over the parts."""

    def __init__(self, channels: int, k: int):
        self.lists = {"top": TopK(channels, k, True), "bottom": TopK(channels, k, False)}
        self.stats: dict[str, np.ndarray] = {}

    def add(self, part: h5py.File, name: str) -> None:
        for prefix, t in self.lists.items():
            t.update(*(torch.from_numpy(part[f"{name}/{prefix}_{x}"][...]) for x in ("value", "index", "pos")))
        for key in STATS:
            value = part[f"{name}/{key}"][...]
            old = self.stats.get(key)
            self.stats[key] = value if old is None else np.maximum(old, value) if key == "max" else old + value


def _write_images(store: Store, f: h5py.File) -> tuple[np.ndarray, dict]:
    index, sizes, attrs = [], [], {}
    for _, part in store.units(STAGE):
        index.append(part["index"][...])
        sizes.append(part["images"].shape[1])
        attrs = read_attrs(part)
    index = np.concatenate(index)
    compact = np.full(int(index.max()) + 1 if index.size else 0, -1, np.int64)
    compact[index] = np.arange(index.size)
    size = sizes[0] if sizes else 0
    g = f.create_group("dataset")
    images = g.create_dataset("images", (index.size, size, size, 3), np.uint8, chunks=(1, size, size, 3))
    text = {k: [] for k in ("paths", "skipped_paths", "skipped_reasons")}
    other = {k: [] for k in ("labels", "top5", "top5_prob")}
    row = 0
    for _, part in store.units(STAGE):
        n = part["images"].shape[0]
        images[row:row + n] = part["images"][...]
        row += n
        for k in text:
            text[k] += [s.decode() if isinstance(s, bytes) else s for s in part[k][...]]
        for k in other:
            other[k].append(part[k][...])
    for k, v in text.items():
        g.create_dataset(k, data=np.array(v, dtype=object), dtype=h5py.string_dtype())
    for k, v in other.items():
        g.create_dataset(k, data=np.concatenate(v))
    g.create_dataset("source_index", data=index)
    images.attrs.update({"source": attrs.get("source", ""), "count": index.size,
                         "skipped": len(text["skipped_paths"])})
    return compact, attrs


def _write_layer(f: h5py.File, name: str, m: _Merged, compact: np.ndarray, rf: int, k: int) -> None:
    layer = f["layers"][name]
    height, width = int(layer.attrs["height"]), int(layer.attrs["width"])
    size = f["dataset/images"].shape[1]
    for prefix, t in m.lists.items():
        g = layer.create_group(f"{prefix}k")
        value, index, pos = (_pad(a, k, fill) for a, fill in
                             ((t.value.numpy(), np.nan), (t.index.numpy(), -1), (t.pos.numpy(), 0)))
        valid = np.isfinite(value) & (index >= 0)
        g["index"] = np.where(valid, compact[np.maximum(index, 0)], -1)
        g["value"] = np.where(valid, value, np.nan).astype(np.float32)
        g["box"] = box_of(pos, height, width, rf, size)
        g.attrs.update({"k": k, "score": "spatial max", "images": int(f["dataset/images"].shape[0]),
                        "receptive_field": rf})
    _write_stats(layer.create_group("stats"), m.stats)


def _pad(a: np.ndarray, k: int, fill) -> np.ndarray:
    """Pads [C, n] to [C, k] when fewer than k images were seen."""
    if a.shape[1] >= k:
        return a
    return np.concatenate([a, np.full((a.shape[0], k - a.shape[1]), fill, a.dtype)], 1)


def _write_stats(g: h5py.Group, totals: dict[str, np.ndarray]) -> None:
    count = np.maximum(totals["count"], 1)
    mean = totals["sum"] / count
    g["mean"] = mean.astype(np.float32)
    g["std"] = np.sqrt(np.maximum(totals["sumsq"] / count - mean**2, 0)).astype(np.float32)
    g["max"] = totals["max"].astype(np.float32)
    g["zero_fraction"] = (totals["zeros"] / count).astype(np.float32)
    g["dead"] = g["max"][...] <= 0
    g["hist"] = totals["hist"].astype(np.int64)
    g["hist"].attrs["of"] = "spatial max per image"
    g["hist_edges"] = HIST_EDGES


def top_examples(store: Store, layers: list) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Each layer's merged top-k straight from the dataset parts, before consolidation.

    Args:
        store: the store holding the dataset stage's parts.
        layers: LayerInfo of the layers wanted.

    Returns:
        name -> (source index [C, K] of the k-th image, -1 if none; crop boxes
        [C, K, 4] in input pixels; receptive field in pixels), for every layer
        the parts have examples of.
    """
    merged: dict[str, TopK] = {}
    rf: dict[str, int] = {}
    size = 0
    for _, part in store.units(STAGE):
        size = part["images"].shape[1] if part["images"].ndim == 4 else size
        rf = read_attrs(part).get("rf", rf)
        for layer in layers:
            if f"{layer.name}/top_value" not in part:
                continue
            t = merged.setdefault(layer.name, TopK(layer.channels, int(part.attrs["k"]), True))
            t.update(*(torch.from_numpy(part[f"{layer.name}/top_{x}"][...]) for x in ("value", "index", "pos")))
    out = {}
    for layer in layers:
        if layer.name in merged:
            t = merged[layer.name]
            valid = torch.isfinite(t.value) & (t.index >= 0)
            index = torch.where(valid, t.index, -1).numpy()
            out[layer.name] = (index, box_of(t.pos.numpy(), layer.height, layer.width, rf[layer.name], size),
                               rf[layer.name])
    return out
