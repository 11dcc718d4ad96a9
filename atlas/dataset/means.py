"""Activation summaries of the explained images: every unit's spatial mean on each of them.

They are what `atlas compare` compares two models by (linear CKA between
layers, correlation between units), so a comparison needs the two stores and
no model. One part per pixel part (`means/<first>`), read from its pixels and
written by the main rank once the pixel parts exist; float16 keeps them at two
bytes per unit and image.
"""

from __future__ import annotations

import numpy as np
import torch

from atlas import devices
from atlas.dataset.reader import STAGE, means_key, pixel_key
from atlas.layers import Capture

FLOAT16_MAX = float(np.finfo(np.float16).max)  # larger means are clipped here rather than stored as inf
LAYOUT = "arrays <layer>/mean: float16 [n, C], each image's spatial mean of every channel, rows as `index`"


def _spatial_mean(act: torch.Tensor) -> torch.Tensor:
    return act.float().mean(dim=(2, 3))


def write_means(ctx, chunks: list[tuple[int, np.ndarray]]) -> None:
    """Writes the means part of every explained-image chunk that has none yet.

    Args:
        ctx: the stage's context (store, model, layers, device, config).
        chunks: (first row of the explained set, source indices) of each pixel part.
    """
    done = ctx.store.done(STAGE)
    todo = [(first, index) for first, index in chunks if means_key(first) not in done]
    if not todo:
        return
    names = [layer.name for layer in ctx.layers]
    with torch.no_grad(), Capture(ctx.loaded.model, names, fn=_spatial_mean, stop=True) as capture:
        for first, index in todo:
            with ctx.store.read_unit(STAGE, pixel_key(first)) as part:
                pixels = part["images"][...]
            means = _chunk_means(ctx, capture, names, pixels)
            ctx.store.write_unit(STAGE, means_key(first), {"index": index, **means},
                                 {"first": first, "layout": LAYOUT})


def _chunk_means(ctx, capture: Capture, names: list[str], pixels: np.ndarray) -> dict[str, np.ndarray]:
    def run(a: int, b: int) -> dict[str, torch.Tensor]:
        acts = capture.run(ctx.loaded.preprocess.from_uint8(pixels[a:b]).to(ctx.device))
        return {name: acts[name].cpu() for name in names}
    parts, _ = devices.chunked(run, len(pixels), max(1, ctx.config.data_batch),
                               too_big=f"one image of {ctx.loaded.name} does not fit in GPU memory with every "
                                       f"selected layer hooked; select fewer layers (--layers) or use --device cpu")
    return {f"{name}/mean": np.clip(torch.cat([p[name] for p in parts]).numpy(), -FLOAT16_MAX,
                                    FLOAT16_MAX).astype(np.float16) for name in names}
