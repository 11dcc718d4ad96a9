"""Labels benchmark: unit labels and facets of a synthetic store shaped like ResNet-50 over ImageNet.

The store holds what the dataset pass leaves before labelling, all synthetic:
50,000 search images (50 per class of ImageNet-1k's 1,000, with true labels
and a 64-dimension embedding drawn around a centre per class) and, for every
unit of ResNet-50's default selection (69 layers, 41,664 units), a pool of its
top 50 images: most units prefer one class (60 % of their pool), a tenth
prefer two unrelated ones (30 % each), a tenth prefer none. The labelling of
every layer (atlas/dataset/labelling.py, the stage's own code) runs in a fresh
process, whose time and peak resident memory are reported; then the labels
are checked against what the store was built to hold.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from atlas.bench.common import child_peak

IMAGES, CLASSES, POOL, TWO, NONE = 50_000, 1000, 50, 0.1, 0.1
TARGETS = {"seconds": 120.0, "peak_mem_mb": 4096.0}


def write_store(root: Path, layers: list[tuple[str, int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """The synthetic dataset parts; returns each layer's planted classes [C, 2] (-1: none)."""
    from atlas.dataset.concepts import EMBED_DIMS
    from atlas.dataset.reader import STAGE, SUMMARY, span_key
    from atlas.store import Store
    rng = np.random.default_rng(seed)
    store = Store(root, "resnet50")
    store.open({"spec": "resnet50", "name": "resnet50", "weights_id": "synthetic", "input_size": 224,
                "classes": [f"class {i}" for i in range(CLASSES)], "layers": [], "config": {}, "versions": {}})
    store.begin(STAGE, {"synthetic": True})
    labels = np.repeat(np.arange(CLASSES), IMAGES // CLASSES)
    rng.shuffle(labels)
    centres = rng.normal(size=(CLASSES, EMBED_DIMS))
    embedding = (centres[labels] + 0.6 * rng.normal(size=(IMAGES, EMBED_DIMS))).astype(np.float16)
    for a in range(0, IMAGES, 10_000):
        b = a + 10_000
        store.write_unit(STAGE, span_key(a, b), {
            "index": np.arange(a, b), "paths": np.array([f"{i:06d}.JPEG" for i in range(a, b)]),
            "labels": labels[a:b], "top5": rng.integers(0, CLASSES, (b - a, 5)),
            "top5_prob": np.full((b - a, 5), 0.2, np.float32), "embedding": embedding[a:b],
            "skipped_paths": np.zeros(0, str), "skipped_reasons": np.zeros(0, str)}, {"total": IMAGES})
    by_class = np.argsort(labels, kind="stable").reshape(CLASSES, -1)
    planted, arrays = {}, {}
    for name, channels, _ in layers:
        plan = np.full((channels, 2), -1)
        pools = np.zeros((channels, POOL), np.int64)
        kind = rng.random(channels)
        for c in range(channels):
            first, second = rng.choice(CLASSES, 2, replace=False)
            if kind[c] < NONE:
                chosen = rng.choice(IMAGES, POOL, replace=False)
            elif kind[c] < NONE + TWO:
                plan[c] = first, second
                chosen = np.concatenate([rng.choice(by_class[first], 15, replace=False),
                                         rng.choice(by_class[second], 15, replace=False),
                                         rng.choice(IMAGES, POOL - 30, replace=False)])
            else:
                plan[c, 0] = first
                chosen = np.concatenate([rng.choice(by_class[first], 30, replace=False),
                                         rng.choice(IMAGES, POOL - 30, replace=False)])
            pools[c] = rng.permutation(chosen)
        planted[name] = plan
        value = np.sort(rng.random((channels, POOL)).astype(np.float32), 1)[:, ::-1]
        for prefix in ("top", "bottom", "pool"):
            k = POOL if prefix == "pool" else 10
            arrays.update({f"{name}/{prefix}_key": value[:, :k], f"{name}/{prefix}_value": value[:, :k],
                           f"{name}/{prefix}_index": pools[:, :k], f"{name}/{prefix}_pos": np.zeros((channels, k),
                                                                                                      np.int64)})
        arrays.update({f"{name}/{s}": np.zeros(channels) for s in ("sum", "sumsq", "count", "max", "zeros")})
        arrays[f"{name}/hist"] = np.zeros((channels, 48))
    store.write_unit(STAGE, f"{SUMMARY}0000", arrays, {"k": 10, "pool": POOL, "rf": {},
                                                          "spans": [span_key(a, a + 10_000)
                                                                    for a in range(0, IMAGES, 10_000)]})
    return planted


def peak(root: str, layers: list) -> dict:
    """Labels every layer of the store at `root` (run in a child process by `child_peak`)."""
    from atlas.dataset.labelling import label_layers
    from atlas.store import Store
    store = Store(Path(root), "resnet50")
    start = time.perf_counter()
    label_layers(store, [SimpleNamespace(name=n, channels=c) for n, c, _ in layers],
                 [f"class {i}" for i in range(CLASSES)])
    return {"seconds": time.perf_counter() - start}


def run() -> dict:
    """Returns seconds and peak_mem_mb of labelling the synthetic ResNet-50 store, and the labels' accuracy."""
    from atlas.bench.site import resnet50_layers
    from atlas.dataset.reader import LABELS, STAGE
    from atlas.store import Store
    layers = resnet50_layers()
    units = sum(c for _, c, _ in layers)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"labels: writing a synthetic store (synthetic data): {IMAGES:,} images, {len(layers)} layers, "
              f"{units:,} units, pools of {POOL}", flush=True)
        planted = write_store(Path(tmp), layers)
        out = child_peak("atlas.bench.labels", {"root": tmp, "layers": layers})
        store = Store(Path(tmp), "resnet50")
        right = poly_found = poly_total = false_labels = unplanted = 0
        for name, _, _ in layers:
            with store.read_unit(STAGE, f"{LABELS}{name}") as part:
                label, poly = part["label"][...], part["polysemantic"][...]
            plan = planted[name]
            one, two, none = (plan[:, 0] >= 0) & (plan[:, 1] < 0), plan[:, 1] >= 0, plan[:, 0] < 0
            right += int((label[one] == plan[one, 0]).sum())
            poly_total += int(two.sum())
            poly_found += int(poly[two].sum())
            false_labels += int((label[none] >= 0).sum())
            unplanted += int(none.sum())
    single = units - poly_total - unplanted
    print(f"labels: {out['seconds']:.1f} s, peak resident memory {out['maxrss_kb'] / 1024:.0f} MB (the child "
          f"process, torch and the store's reads included)")
    print(f"labels: one-class units labelled with their class {right:,} of {single:,}; two-class units flagged "
          f"polysemantic {poly_found:,} of {poly_total:,}; units without a class labelled {false_labels} of "
          f"{unplanted:,}")
    return {"seconds": out["seconds"], "peak_mem_mb": out["maxrss_kb"] / 1024,
            "label_recall": right / max(single, 1), "polysemantic_recall": poly_found / max(poly_total, 1),
            "false_label_rate": false_labels / max(unplanted, 1)}
