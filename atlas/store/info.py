"""A plain-text summary of a consolidated store, for `atlas info`."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from atlas.store.read import open_store, read_attrs
from atlas.store.schema import ATTRIBUTION, CHECKS, DATASET, FEATUREVIS, LAYERS, STATS, TOPK, view_dataset


def summarize(path: Path) -> str:
    """Describes the model, the layers and what each stage has stored."""
    with open_store(path) as f:
        root = read_attrs(f)
        lines = [f"store      {path} ({path.stat().st_size / 1e6:.1f} MB, Atlas {root.get('atlas_version')}, "
                 f"format {root.get('store_format')})",
                 f"model      {root.get('spec')} — weights: {root.get('weights_id')}",
                 f"input      {root.get('input_size')} px, {len(f['classes'])} classes"]
        if DATASET in f:
            d = f[DATASET]
            explained = d["explained"].shape[0] if "explained" in d else 0
            source = read_attrs(d["images"]).get("source") if "images" in d else None
            lines.append(f"dataset    {d['paths'].shape[0]} images searched, {explained} explained, "
                         f"{len(d['skipped_paths'])} skipped" + (f" ({source})" if source else ""))
        if ATTRIBUTION in f:
            lines.append(f"attribution {', '.join(f[ATTRIBUTION])}")
            failures = {m: int(g.attrs.get("completeness_failures", 0)) for m, g in f[ATTRIBUTION].items()}
            if any(failures.values()):
                lines.append("           above the completeness tolerance: "
                             + ", ".join(f"{m} {n} images" for m, n in failures.items() if n))
            broken = {m: int(g.attrs.get("non_finite", 0)) for m, g in f[ATTRIBUTION].items()}
            if any(broken.values()):
                lines.append("           maps NaN or infinite after a retry: "
                             + ", ".join(f"{m} {n} images" for m, n in broken.items() if n))
        if CHECKS in f:
            verdicts = {m: str(g["randomization"].attrs.get("verdict")) for m, g in f[CHECKS].items()
                        if isinstance(g, h5py.Group) and "randomization" in g}
            insensitive = [m for m, v in verdicts.items() if v == "fail"]
            lines.append(f"checks     {len(verdicts)} methods on {f[CHECKS]['images'].shape[0]} images; "
                         f"insensitive to the weights: {', '.join(insensitive) or 'none'}")
        lines.append(f"layers     {len(f[LAYERS])}, "
                     f"{sum(int(g.attrs['channels']) for g in f[LAYERS].values())} channels")
        lines.append(f"  {'layer':36} {'channels':>8} {'size':>7} {'featurevis':>10} {'topk':>5} {'dead':>5}")
        for name, g in sorted(f[LAYERS].items(), key=lambda kv: kv[1].attrs["order"]):
            fv = int(np.sum(g[FEATUREVIS][view_dataset("channel", "finite")][...])) if FEATUREVIS in g else 0
            dead = int(np.sum(g[STATS]["dead"][...])) if STATS in g else 0
            lines.append(f"  {name:36} {g.attrs['channels']:8d} {g.attrs['height']:>3}x{g.attrs['width']:<3} "
                         f"{fv:10d} {'yes' if TOPK in g else 'no':>5} {dead:5d}")
    return "\n".join(lines)
