"""The dataset stage: one streaming pass that finds every channel's top and bottom images.

Every selected layer is hooked at once. Inside each hook the activation is
folded into per-channel summaries (topk.py) the moment the layer
produces it, so memory never holds more than one batch of feature maps and
does not grow with the number of images. A work unit is a range of images; it
keeps its own top-k, and units merge into the same top-k a single pass gives
(ties broken by image index).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from atlas import devices
from atlas.dataset.images import ImageDataset, list_images
from atlas.dataset.topk import LayerSummary
from atlas.layers import Capture, receptive_field
from atlas.store.schema import DATASET

STAGE = DATASET


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
    """Runs one unit; on out-of-memory, again with half the batch. Returns its arrays and the batch
    that fitted, which the next units start from. A unit's result does not depend on the batch."""
    start = bar.n

    def attempt(size: int) -> dict[str, np.ndarray]:
        bar.update(start - bar.n)  # a unit that ran out of memory starts over
        return _run_unit(ctx, records, first, end, bar, size)
    return devices.fit(attempt, batch,
                       lambda size: tqdm.write(f"atlas: out of GPU memory; dataset batch halved to {size}"),
                       too_big=f"one image of {ctx.loaded.name} does not fit in GPU memory with every selected "
                               f"layer hooked; select fewer layers (--layers) or use --device cpu")


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
