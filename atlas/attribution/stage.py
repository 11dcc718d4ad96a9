"""The attribution stage: every method on every dataset image, explaining the top-1 class.

It reads the images the dataset stage stored (the model's exact view of each
photo), so no file is decoded twice. A work unit is one method on one dataset
unit's images.
"""

from __future__ import annotations

import h5py
import numpy as np
import torch

from atlas.attribution.methods import get
from atlas.errors import AtlasError
from atlas.store import Store

STAGE = "attribution"


def run(ctx) -> None:
    """Attributes every stored dataset image the store has no map of yet."""
    cfg = ctx.config
    methods = {name: get(name, ctx.loaded.model) for name in cfg.attr_methods}
    done = ctx.store.begin(STAGE, cfg.stage_params(STAGE))
    data_units = sorted(ctx.store.done("dataset"))
    if not data_units:
        raise AtlasError("attribution needs dataset images: run `atlas dataset` (or `atlas build`) first")
    todo = [(m, d) for m in methods for d in data_units if f"{m}/{d}" not in done]
    if not todo:
        return
    sizes = {key: part["images"].shape[0] for key, part in ctx.store.units("dataset")}
    with ctx.bar(sum(sizes[d] for _, d in todo), "attribution", "img") as bar:
        for name, data_key in todo:
            bar.set_postfix_str(name)
            arrays = _attribute_unit(ctx, methods[name], data_key, bar)
            ctx.store.write_unit(STAGE, f"{name}/{data_key}", arrays, {
                "method": name, "target_rule": "top-1 prediction",
                "reduction": "sum over colour channels", **methods[name].params})


def _attribute_unit(ctx, method, data_key: str, bar) -> dict[str, np.ndarray]:
    with ctx.store.read_unit("dataset", data_key) as part:
        pixels, index, target = part["images"][...], part["index"][...], part["top5"][:, 0]
    maps, scores = [], []
    pre, batch = ctx.loaded.preprocess, ctx.config.attr_batch
    for a in range(0, len(index), batch):
        x = pre.from_uint8(pixels[a:a + batch]).to(ctx.device)
        t = torch.from_numpy(target[a:a + batch]).to(ctx.device)
        maps.append(method.attribute(x, t).sum(1).cpu().numpy().astype(np.float16))
        with torch.no_grad():
            scores.append(ctx.loaded.model(x).gather(1, t[:, None])[:, 0].float().cpu().numpy())
        bar.update(len(t))
    size = pixels.shape[1]
    return {"index": index, "target": target.astype(np.int64),
            "maps": np.concatenate(maps) if maps else np.zeros((0, size, size), np.float16),
            "score": np.concatenate(scores) if scores else np.zeros(0, np.float32)}


def consolidate(store: Store, f: h5py.File) -> None:
    """Writes /attribution/<method>/{maps,target,score}, rows aligned with /dataset."""
    if "dataset" not in f:
        return
    source = f["dataset/source_index"][...]
    groups: dict[str, h5py.Group] = {}
    for key, part in store.units(STAGE):
        name = key.split("/", 1)[0]
        if name not in groups:
            groups[name] = _create(f, name, source.size, part)
        rows = np.searchsorted(source, part["index"][...])
        for k in ("maps", "target", "score"):
            groups[name][k][rows] = part[k][...]


def _create(f: h5py.File, name: str, n: int, part: h5py.File) -> h5py.Group:
    g = f.require_group("attribution").create_group(name)
    size = part["maps"].shape[1] if part["maps"].ndim == 3 else f["dataset/images"].shape[1]
    maps = g.create_dataset("maps", (n, size, size), np.float16, chunks=(1, size, size))
    maps.attrs.update(dict(part.attrs))
    g.create_dataset("target", (n,), np.int64, fillvalue=-1)
    g.create_dataset("score", (n,), np.float32, fillvalue=np.nan)
    return g
