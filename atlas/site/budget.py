"""The site's size budget: how large the secondary views can be shown and still fit.

GitHub Pages publishes sites of at most 1 GB. A full ResNet-50 atlas has 41,664
units, and each unit's page, channel picture, grid thumbnail and attribution
strip are fixed costs; the views beyond `channel` (negative, neuron and the
diversity set: six images per unit in the full preset) are what can give. Before
any unit is written, `plan_views` encodes the pictures of a sample of units
exactly as the site will, at each candidate side, extrapolates to every unit,
and picks the largest side whose estimate fits the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from atlas.site import pictures as img
from atlas.site.data import Model, pictures, unit_attribution
from atlas.store.schema import FEATUREVIS, LAYERS, SECONDARY_VIEWS, view_dataset

VIEW_SCALES = (1.0, 0.75, 0.5)  # sides of the secondary views tried, as fractions of the stored side
SAMPLE_UNITS = 48  # units encoded to estimate the bytes of every unit
# HTML of one unit page, as `atlas bench site` measures it for ResNet-50: with its 10
# top and 10 bottom examples and 3 attribution overlays 10.3 KB, without examples 4 KB.
UNIT_PAGE_BYTES = {True: 10_300, False: 4_000}
LAYER_BYTES = 60_000  # a layer's grid page, preview and the rest of its sheet overhead


@dataclass
class Plan:
    """The side of the secondary views, and the site's estimated bytes at each candidate side."""

    scale: float = 1.0
    estimates: dict[float, int] = field(default_factory=dict)
    budget: int = 0

    def describe(self, stored: int | None = None) -> str | None:
        """One line for the report and the about page; None when the views keep their stored side."""
        if self.scale == 1.0 or not self.estimates:
            return None
        side = f"{round(stored * self.scale)} px of the stored {stored}" if stored else f"{self.scale:g} of their side"
        return (f"views other than channel shown at {side} to keep the site within {self.budget / 1e6:,.0f} MB "
                f"(estimated {self.estimates[self.scale] / 1e6:,.0f} MB; "
                f"{self.estimates[1.0] / 1e6:,.0f} MB at full size)")


def _sample(model: Model) -> list[tuple[int, int]]:
    """(layer index, channel) of up to SAMPLE_UNITS units spread evenly over every unit of the model."""
    sizes = np.array([layer.channels for layer in model.layers])
    total = int(sizes.sum())
    if not total:
        return []
    picks = np.unique(np.linspace(0, total - 1, min(SAMPLE_UNITS, total)).round().astype(np.int64))
    ends = np.cumsum(sizes)
    layers = np.searchsorted(ends, picks, side="right")
    return [(int(i), int(p - (ends[i] - sizes[i]))) for i, p in zip(layers, picks)]


def _done(group: h5py.Group, view: str, c: int) -> bool:
    done = group.get(f"{FEATUREVIS}/{view_dataset(view, 'finite')}")
    return bool(done[c]) if isinstance(done, h5py.Dataset) else True


def _unit_bytes(f: h5py.File, model: Model, sample: list[tuple[int, int]]) -> tuple[float, dict[float, float]]:
    """Mean bytes per unit of the fixed pictures (channel, thumbnail, attribution strip), and of the
    secondary views at each scale, over the sampled units."""
    fixed, views = 0.0, dict.fromkeys(VIEW_SCALES, 0.0)
    channels: dict[int, list[np.ndarray]] = {}  # by side
    for i, c in sample:
        layer = model.layers[i]
        group = f[LAYERS][layer.name]
        stored = pictures(group)
        if "channel" in stored and _done(group, "channel", c):
            channel = stored["channel"][c]
            fixed += len(img.encode(channel))
            channels.setdefault(channel.shape[0], []).append(channel)
        secondary = [stored[v][c] for v in SECONDARY_VIEWS if v in stored and _done(group, v, c)]
        if secondary:
            for scale in VIEW_SCALES:
                views[scale] += len(img.encode(img.views_strip(secondary, scale)))
        maps, _ = unit_attribution(group) if model.n_images else (None, {})
        if maps is not None:
            strip, _ = img.unit_strip(maps[c].astype(np.float32), min(img.UNIT_HEAT_SIDE, maps.shape[-1]))
            fixed += len(img.encode(strip, "heat")) if strip is not None else 0
    for same in channels.values():  # thumbnails share sprite sheets: a sheet of the sample's
        sheet, _ = img.sprite_sheet(np.stack(same), np.ones(len(same), bool))
        fixed += len(img.encode(sheet, "sprite"))
    n = max(len(sample), 1)
    return fixed / n, {s: v / n for s, v in views.items()}


def plan_views(f: h5py.File, model: Model, spent: int, budget: int) -> Plan:
    """The largest side of the secondary views whose estimated site fits `budget` bytes.

    Args:
        f: the open store.
        model: its model, as `read_model` gives it.
        spent: bytes the site holds besides this model's units: other models,
            this model's dataset images and attribution maps.
        budget: bytes the whole site may take.

    Returns:
        The plan: scale 1 when the store has no secondary views or they fit at
        full size, else the largest scale that fits, else the smallest scale.
    """
    if not any(v in layer.views for layer in model.layers for v in SECONDARY_VIEWS):
        return Plan(budget=budget)
    sample = _sample(model)
    fixed, views = _unit_bytes(f, model, sample)
    units = sum(layer.channels for layer in model.layers)
    pages = UNIT_PAGE_BYTES[model.n_images > 0]
    base = spent + units * (pages + fixed) + len(model.layers) * LAYER_BYTES
    estimates = {s: int(base + units * v) for s, v in views.items()}
    scale = next((s for s in VIEW_SCALES if estimates[s] <= budget), VIEW_SCALES[-1])
    return Plan(scale, estimates, budget)
