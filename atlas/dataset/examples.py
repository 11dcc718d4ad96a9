"""After the pass: the explained set, and one more read of just the images the atlas shows.

The explained set is chosen once, deterministically, from what the pass saw
(`choose`), and stored as the part `explained`. Then the images that are some
unit's top or bottom example, or explained, are decoded again, in source
order: each unit's example crops (its receptive-field box around the arg-max)
are cut at the side the site shows them and kept as one JPEG strip per unit
and list (`crops/<layer>`), the explained images' model-view pixels are kept
whole (`pixels/<first>`), and from those pixels every unit's spatial mean on
each explained image (`means/<first>`, means.py). Nothing else of an image's
pixels is stored, so the store grows with the units and the explained set,
not with the search set.

Layers are cut in groups whose raw crops fit in CROP_MEMORY, each group
reading its own example images, so memory does not grow with the model either.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from atlas import distributed
from atlas.dataset.images import image_loader
from atlas.dataset.means import write_means
from atlas.dataset.reader import BOOK, CROPS, EXPLAINED, STAGE, decoding_workers, examples, merged_summaries, pixel_key

CROP_MEMORY = 1 << 30  # bytes of raw crops held at once
CROP_QUALITY = 92  # JPEG quality of the stored crop strips
EXPLAINED_CHUNK = 64  # explained images per pixel part (and per attribution work unit)
EMPTY = 235  # grey of a slot without an example (fewer than k images seen)
RULE = ("one image per class before a second (true labels where known, the top-1 prediction otherwise), "
        "classes and images ordered by how many units' top-k lists hold the image, then by source order")


def choose(classes: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """The explained set: n of the search images, spread over classes first.

    Args:
        classes: the class of each search image (its label, or its prediction where unknown).
        counts: how many units' top-k lists hold each image.
        n: how many to choose.

    Returns:
        Positions into `classes` of the chosen images, ascending; all of them when n covers them.
    """
    total = len(classes)
    if n >= total:
        return np.arange(total)
    by_merit = np.lexsort((np.arange(total), -counts))  # most counts first, then source order
    rank_in_class = np.empty(total, np.int64)
    seen: dict[int, int] = {}
    for i in by_merit:
        rank_in_class[i] = seen.get(int(classes[i]), 0)
        seen[int(classes[i])] = rank_in_class[i] + 1
    order = np.lexsort((np.arange(total), -counts, rank_in_class))  # round by round, best first in each
    return np.sort(order[:n])


def run(ctx, records, attrs: dict) -> None:
    """Chooses the explained set, then writes the pixel, crop and means parts not done yet."""
    store, cfg = ctx.store, ctx.config
    done = store.done(STAGE)
    todo_layers = [l for l in ctx.layers if f"{CROPS}{l.name}" not in done]
    lists: dict = {}
    if EXPLAINED not in done or todo_layers:
        summaries, _ = merged_summaries(store, ctx.layers, ctx.device, cfg.fuse)
        size = ctx.loaded.input_size
        lists = {l.name: {w: examples(summaries[l.name], l, attrs["rf"][l.name], size, w,
                                      attrs.get("centres", {}).get(l.name)) for w in ("top", "bottom")}
                 for l in ctx.layers}
    if EXPLAINED not in done:
        distributed.on_main(lambda: _write_explained(ctx, lists))
        distributed.barrier()
    with store.read_unit(STAGE, EXPLAINED) as part:
        explained = part["index"][...]
    chunks = [(a, explained[a:a + EXPLAINED_CHUNK]) for a in range(0, len(explained), EXPLAINED_CHUNK)]
    pixels_todo = [(a, c) for a, c in chunks if pixel_key(a) not in done] if ctx.ranks.main else []
    mine = ctx.ranks.shard(_groups(todo_layers, cfg.topk, cfg.crop_size))
    if pixels_todo and not mine:
        mine = [[]]
    for g, group in enumerate(mine):
        _cut(ctx, records, group, {l.name: lists[l.name] for l in group}, pixels_todo if g == 0 else [])
    distributed.barrier()
    if ctx.ranks.main:  # read back from the pixel parts: the stored pixels are what every stage sees
        write_means(ctx, chunks)
    distributed.barrier()


def _write_explained(ctx, lists: dict) -> None:
    store = ctx.store
    index, labels, top1 = [], [], []
    for _, part in store.units(STAGE, BOOK):
        index.append(part["index"][...]); labels.append(part["labels"][...]); top1.append(part["top5"][:, 0])
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    labels, top1 = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (labels, top1))
    order = np.argsort(index)
    index, labels, top1 = index[order], labels[order], top1[order]
    counts = np.zeros(len(index), np.int64)
    for both in lists.values():
        top = both["top"][0]
        rows = np.searchsorted(index, top[top >= 0])
        np.add.at(counts, rows, 1)
    picked = choose(np.where(labels >= 0, labels, top1), counts, ctx.config.explain)
    store.write_unit(STAGE, EXPLAINED, {"index": index[picked], "top_counts": counts[picked]},
                     {"rule": RULE, "requested": ctx.config.explain, "search": len(index)})


def _groups(layers: list, k: int, side: int) -> list[list]:
    """Consecutive layers whose raw crops fit in CROP_MEMORY together (a wider layer alone)."""
    out: list[list] = []
    used = 0
    for layer in layers:
        need = layer.channels * 2 * k * side * side * 3
        if not out or used + need > CROP_MEMORY:
            out.append([])
            used = 0
        out[-1].append(layer)
        used += need
    return out


def _cut(ctx, records, group: list, lists: dict, pixels_todo: list[tuple[int, np.ndarray]]) -> None:
    """Reads the images a group of layers shows (and the explained ones of `pixels_todo`) once, in
    source order, and writes the group's crop parts and the pixel parts."""
    cfg, side = ctx.config, ctx.config.crop_size
    strips = {(name, w): np.full((idx.shape[0], side, idx.shape[1] * side, 3), EMPTY, np.uint8)
              for name, both in lists.items() for w, (idx, _) in both.items()}
    refs = _references(lists)  # source index -> [(layer, which, channel, slot, box)]
    wanted = {int(i) for _, c in pixels_todo for i in c}
    needed = sorted(set(refs) | wanted)
    pixel_rows = {int(i): (first, row) for first, c in pixels_todo for row, i in enumerate(c)}
    pixels = {first: np.zeros((len(c), ctx.loaded.input_size, ctx.loaded.input_size, 3), np.uint8)
              for first, c in pixels_todo}
    loader = image_loader(records, ctx.loaded.preprocess, needed, decoding_workers(cfg, len(needed)),
                          batch_size=16)
    with ctx.bar(len(needed), "dataset examples", "img") as bar:
        for batch, index, reasons in loader:
            for picture, i, reason in zip(batch.numpy(), index.tolist(), reasons):
                if reason:  # read by the pass, unreadable now: its crops stay grey
                    bar.write(f"atlas: {records[i].name} can no longer be read ({reason}); its crops stay grey")
                for name, which, c, slot, box in refs.get(i, ()):
                    strips[name, which][c, :, slot * side:(slot + 1) * side] = crop(picture, box, side)
                if i in pixel_rows:
                    first, row = pixel_rows[i]
                    pixels[first][row] = picture
            bar.update(len(index))
    for first, c in pixels_todo:
        ctx.store.write_unit(STAGE, pixel_key(first), {"index": c, "images": pixels[first]},
                             {"first": first, "source": "the model's view of each explained image"})
    for name in lists:
        arrays = {w: _jpegs(strips[name, w]) for w in ("top", "bottom")}
        ctx.store.write_unit(STAGE, f"{CROPS}{name}", arrays, {
            "layer": name, "side": side, "k": cfg.topk, "quality": CROP_QUALITY,
            "format": "one JPEG strip per unit: its k examples side by side, each its receptive-field box "
                      "around the arg-max resized to side x side; grey where fewer than k images were seen"})


def _references(lists: dict) -> dict[int, list]:
    refs: dict[int, list] = {}
    for name, both in lists.items():
        for which, (index, boxes) in both.items():
            for c, slot in zip(*np.nonzero(index >= 0)):
                refs.setdefault(int(index[c, slot]), []).append((name, which, int(c), int(slot), boxes[c, slot]))
    return refs


def crop(picture: np.ndarray, box: np.ndarray, side: int) -> np.ndarray:
    """The box (x0, y0, x1, y1) of an image [S, S, 3], resized to side x side (area-averaged when shrinking)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    region = Image.fromarray(np.ascontiguousarray(picture[y0:y1, x0:x1]))
    if region.size == (side, side):
        return np.asarray(region)
    return np.asarray(region.resize((side, side), Image.Resampling.BOX if region.width > side
                                    else Image.Resampling.BICUBIC))


def _jpegs(strips: np.ndarray) -> np.ndarray:
    """One JPEG file per unit's strip, as an object array of uint8 arrays."""
    out = np.empty(len(strips), object)
    for c, strip in enumerate(strips):
        buffer = io.BytesIO()
        Image.fromarray(strip).save(buffer, "JPEG", quality=CROP_QUALITY, subsampling=0)
        out[c] = np.frombuffer(buffer.getvalue(), np.uint8)
    return out
