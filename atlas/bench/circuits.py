"""Circuits benchmark: what circuit inputs add to the unit-attribution passes, and `atlas compare`.

Two stores of the same model on the embedded photos are built (dataset stage,
the quick preset): one with the model's weights, one with `--weights random`.
On the first, the unit attributions of every selected layer's first channels
are computed with circuit inputs (activation x gradient on the previous
selected layer, in the same backward pass) and without, alternately, and each
side keeps its fastest round. Then `atlas compare` of the two stores is timed,
pages included.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from atlas import pipeline
from atlas.attribution.units import UnitAttribution, unit_maps
from atlas.bench.common import timed
from atlas.config import preset
from atlas.dataset.reader import DatasetImages, source_records, top_examples

ROUNDS = 3  # alternating timed rounds of the unit passes, with and without circuits


def run(model: str = "efficientnet_lite0", weights: str | None = None, device: str = "cpu",
        channels: int = 16, topk: int = 3) -> dict:
    """Returns unit_pass_overhead (time with circuits / without) and compare_seconds.

    Args:
        model, weights: the model of the first store (the second has random weights).
        channels: first channels of each selected layer given unit attributions.
        topk: top images per unit (the full preset's 3).
    """
    from atlas.compare import compare
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ctx, a = _build(root / "trained", model, weights, device)
        _, b = _build(root / "random", model, "random", device)
        with_circuits, without = _unit_passes(ctx, channels, topk)
        _, seconds = timed(lambda: compare(a, b, root / "site"))
    print(f"unit passes over {channels} channels of {len(ctx.layers)} layers, top {topk} images: "
          f"{with_circuits:.2f} s with circuit inputs, {without:.2f} s without")
    print(f"atlas compare {a.name} (weights {weights or 'default'}) against random weights: {seconds:.1f} s")
    return {"unit_pass_overhead": with_circuits / without, "compare_seconds": seconds}


def _build(root: Path, model: str, weights: str | None, device: str):
    cfg = preset("quick").replace(model=model, weights=weights, device=device, store_dir=root / "store",
                                  site_dir=root / "site")
    ctx = pipeline.prepare(cfg, progress=False)
    return ctx, pipeline.run_stages(ctx, ("dataset",))


def _unit_passes(ctx, channels: int, topk: int) -> tuple[float, float]:
    """Fastest round of every layer's unit passes with circuit inputs, and without: seconds each."""
    images = DatasetImages(ctx.store, ctx.loaded.preprocess, ctx.device,
                           source_records(ctx.config, ctx.loaded.class_names))
    examples = top_examples(ctx.store, ctx.layers, ctx.loaded.input_size)
    pairs = [(before, layer) for before, layer in zip(ctx.layers, ctx.layers[1:]) if layer.name in examples]

    def passes(circuits: bool) -> float:
        total = 0.0
        for before, layer in pairs:
            index, boxes, _ = examples[layer.name]
            n = min(channels, layer.channels)
            method = UnitAttribution(ctx.loaded.model, layer, 10, before if circuits else None)
            (_, inputs), seconds = timed(lambda: unit_maps(method, images.inputs, index[:n, :topk],
                                                           boxes[:n, :topk], range(n), 64))
            assert not circuits or (inputs is not None and np.isfinite(inputs).any())
            total += seconds
        return total
    passes(True)  # warm-up: decoding caches and the allocator
    best = {True: float("inf"), False: float("inf")}
    for _ in tqdm(range(ROUNDS), desc="unit passes", leave=False):
        for circuits in (False, True):
            best[circuits] = min(best[circuits], passes(circuits))
    return best[True], best[False]
