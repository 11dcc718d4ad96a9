"""Maps of every explained image: each method, for the top-1 class and for the true class.

Used by the attribution stage; a work unit is one method on one chunk of explained images.
The SmoothGrad variants share their noisy gradients, so pending units of the
three are computed together.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from atlas.attribution.base import Attribution
from atlas.attribution.gradients import SmoothGrad
from atlas.errors import AtlasError
from atlas.store.schema import ATTRIBUTION

STAGE = ATTRIBUTION
# per-image diagnostics a method may report (`Explanation.info`), with the value of an image it did not report
DIAGNOSTICS = {"completeness": (np.float32, np.nan), "steps": (np.int32, 0), "area": (np.float32, np.nan),
               "preserved": (np.float32, np.nan)}


def run_maps(ctx, images, todo: list[tuple[str, str]], make_method) -> None:
    """Computes and writes the units `<method>/<dataset unit>` in `todo` (data-unit major).

    Args:
        make_method: `make_method(ctx, name, images)` builds a configured method.
    """
    if not todo:
        return
    methods: dict[str, Attribution] = {}
    skipped: set[str] = set()
    scores: dict[str, np.ndarray] = {}  # the target logits of a data unit, shared by every method
    with ctx.bar(sum(len(images.chunks[d]) for _, d in todo), "attribution", "img") as bar:
        for data_key, names in _groups(todo):
            if skipped & set(names):
                continue
            bar.set_postfix_str(", ".join(names))
            for name in names:
                if name not in methods:
                    methods[name] = make_method(ctx, name, images)
            index = images.chunks[data_key]
            if data_key not in scores:
                scores = {data_key: _scores(ctx, images, index)}
            group = {name: methods[name] for name in names}
            try:
                results = _maps_of(ctx, group, images, index, scores[data_key], bar)
            except AtlasError as exc:  # a method that does not apply to this model (no ReLU to guide, ...)
                for name in names:
                    skip(ctx, name, str(exc))
                skipped.update(names)
                continue
            for name, arrays in results.items():
                ctx.store.write_unit(STAGE, f"{name}/{data_key}", arrays, {
                    **methods[name].params, "target_rule": "top-1 prediction; label_maps: the true class",
                    "reduction": "sum over colour channels", "tolerance": ctx.config.attr_tolerance})


def skip(ctx, name: str, reason: str) -> None:
    """Records that a method cannot run on this model, so the site can say why it is missing."""
    tqdm.write(f"atlas: skipping {name}: {reason}")
    ctx.store.write_unit(STAGE, f"skipped/{name}", {}, {"method": name, "reason": reason})


def _groups(todo: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(data unit, methods computed together): the SmoothGrad variants of a unit form one group."""
    out: list[tuple[str, list[str]]] = []
    smooth = set(SmoothGrad.VARIANTS.values())
    for name, data_key in todo:
        last = out[-1] if out else None
        if last and last[0] == data_key and name in smooth and set(last[1]) <= smooth:
            last[1].append(name)
        else:
            out.append((data_key, [name]))
    return out


RETRY_SEED = 7_919  # added to an image's seed when its map came out NaN or infinite


def _explain(ctx, group: dict[str, Attribution], images, index: np.ndarray, target: np.ndarray,
             retry: int = 0) -> dict:
    """name -> (maps [n, S, S] summed over colour, {diagnostic: [n]} for every one of DIAGNOSTICS).

    `retry` > 0 draws the random methods' noise from another seed.
    """
    x, t = images.inputs(index), torch.as_tensor(target, device=ctx.device)
    first = next(iter(group.values()))
    if hasattr(first, "seed"):  # random draws are seeded by the image, not by its place in a batch
        parts = []
        for i in range(len(index)):
            for method in group.values():
                method.seed = ctx.config.seed + int(index[i]) + retry * RETRY_SEED
            parts.append(_explain_rows(group, x[i:i + 1], t[i:i + 1]))
        return {name: (np.concatenate([p[name][0] for p in parts]),
                       {k: np.concatenate([p[name][1][k] for p in parts]) for k in DIAGNOSTICS}) for name in group}
    return _explain_rows(group, x, t)


def _explain_rows(group: dict[str, Attribution], x: torch.Tensor, t: torch.Tensor) -> dict:
    n = x.shape[0]
    if len(group) > 1:  # SmoothGrad variants from one set of noisy gradients
        found = next(iter(group.values())).all_variants(x, t)
        results = {name: (found[name], {}) for name in group}
    else:
        results = {name: (e.maps, e.info) for name, m in group.items() for e in [m.explain(x, t)]}
    out = {}
    for name, (maps, info) in results.items():
        out[name] = (maps.sum(1).float().cpu().numpy(),
                     {k: info[k].cpu().numpy().astype(dtype) if k in info else np.full(n, fill, dtype)
                      for k, (dtype, fill) in DIAGNOSTICS.items()})
    return out


def _scores(ctx, images, index: np.ndarray) -> np.ndarray:
    """The top-1 logit of each image: what every method's top-1 map explains."""
    out = []
    batch = ctx.config.attr_batch
    for a in range(0, len(index), batch):
        rows = index[a:a + batch]
        target = torch.as_tensor([images.top1[int(i)] for i in rows], device=ctx.device)
        with torch.no_grad():
            logits = ctx.loaded.model(images.inputs(rows)).float()
        out.append(logits.gather(1, target[:, None])[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _maps_of(ctx, group: dict[str, Attribution], images, index: np.ndarray, score: np.ndarray,
             bar) -> dict[str, dict]:
    n, size = len(index), ctx.loaded.input_size
    target = np.array([images.top1[int(i)] for i in index], np.int64)
    label = np.array([images.labels[int(i)] for i in index], np.int64)
    out = {name: {"maps": np.zeros((n, size, size), np.float32),
                  "label_maps": np.full((n, size, size), np.nan, np.float32),
                  **{k: np.full(n, fill, dtype) for k, (dtype, fill) in DIAGNOSTICS.items()}}
           for name in group}
    batch = ctx.config.attr_batch
    for a in range(0, n, batch):
        rows = slice(a, min(n, a + batch))
        for name, (maps, info) in _explain(ctx, group, images, index[rows], target[rows]).items():
            out[name]["maps"][rows] = maps
            for k, values in info.items():
                out[name][k][rows] = values
        bar.update(rows.stop - rows.start)
    _retry_non_finite(ctx, group, images, index, target, out)
    same = label == target
    other = np.nonzero((label >= 0) & ~same)[0]
    for arrays in out.values():
        arrays["label_maps"][same] = arrays["maps"][same]
    for a in range(0, other.size, batch):
        rows = other[a:a + batch]
        for name, (maps, _) in _explain(ctx, group, images, index[rows], label[rows]).items():
            out[name]["label_maps"][rows] = maps
    common = {"index": index, "target": target, "score": score, "label_target": label}
    return {name: {**common, **{k: a[k] for k in DIAGNOSTICS}, "finite": _finite(a["maps"]),
                   **_scaled("maps", a["maps"]), **_scaled("label_maps", a["label_maps"])}
            for name, a in out.items()}


def _finite(maps: np.ndarray) -> np.ndarray:
    return np.isfinite(maps).reshape(len(maps), -1).all(1)


def _retry_non_finite(ctx, group: dict[str, Attribution], images, index: np.ndarray, target: np.ndarray,
                      out: dict[str, dict]) -> None:
    """Computes once more, from another seed, the maps that came out NaN or infinite.

    What stays non-finite is kept as it is and flagged (`finite` False in the part and the store).
    """
    bad = {name: ~_finite(a["maps"]) for name, a in out.items()}
    rows = np.flatnonzero(np.any(list(bad.values()), axis=0))
    if not rows.size:
        return
    for name, (maps, info) in _explain(ctx, group, images, index[rows], target[rows], retry=1).items():
        redo = rows[bad[name][rows]]
        keep = bad[name][rows]
        out[name]["maps"][redo] = maps[keep]
        for k, values in info.items():
            out[name][k][redo] = values[keep]
        still = int((~_finite(out[name]["maps"][redo])).sum())
        if still:
            tqdm.write(f"atlas: {name}: {still} map(s) stay NaN or infinite after a retry; flagged in the store")


def _scaled(name: str, maps: np.ndarray) -> dict[str, np.ndarray]:
    """float16 maps divided by their largest |value| per image, and that scale: no map underflows."""
    flat = np.abs(np.nan_to_num(maps.reshape(len(maps), -1)))
    scale = flat.max(1) if flat.size else np.zeros(len(maps), np.float32)
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    return {name: (maps / scale[:, None, None]).astype(np.float16), f"{name.removesuffix('maps')}scale": scale}
