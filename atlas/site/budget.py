"""The site's size budget: how large the secondary views and the example crops can be shown and still fit.

GitHub Pages publishes sites of at most 1 GB. A full ResNet-50 atlas has 41,664
units, and each unit's page, channel picture, grid thumbnail and attribution
strip are fixed costs; the views beyond `channel` (negative, neuron and the
diversity set: six images per unit in the full preset) give first, then the
example crops (20 per unit). Before any unit is written, `plan_views` encodes
the pictures of a sample of units exactly as the site will, at each candidate
size, extrapolates to every unit, and picks the first candidate whose estimate
fits the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from atlas.site import pictures as img
from atlas.site.data import Model, crops, pictures, unit_attribution
from atlas.store.schema import FEATUREVIS, LAYERS, SECONDARY_VIEWS, view_dataset

# (side of the secondary views, side of the example crops) tried in turn, as fractions of the stored sides
CANDIDATES = ((1.0, 1.0), (0.75, 1.0), (0.5, 1.0), (0.5, 0.75), (0.5, 0.5), (0.375, 0.5), (0.375, 0.375),
              (0.25, 0.375))
VIEW_SCALES = tuple(dict.fromkeys(v for v, _ in CANDIDATES))
SAMPLE_UNITS = 48  # units encoded to estimate the bytes of every unit
# HTML of one unit page, as `atlas bench site` measures it for ResNet-50: with its 10
# top and 10 bottom examples and 3 attribution overlays 9.5 KB, without examples 4 KB.
UNIT_PAGE_BYTES = {True: 9_500, False: 4_000}
LAYER_BYTES = 60_000  # a layer's grid page, preview and the rest of its sheet overhead


@dataclass
class Plan:
    """The sides of the secondary views and the example crops, and the site's estimated bytes at each
    candidate (view scale, crop scale)."""

    scale: float = 1.0
    estimates: dict[tuple[float, float], int] = field(default_factory=dict)
    budget: int = 0
    crop_scale: float = 1.0
    crop_stored: int | None = None  # the stored side of the crops, when the store has crops

    @property
    def crop_side(self) -> int | None:
        """Pixels of one example crop in the site; None: as stored."""
        return None if self.crop_stored is None or self.crop_scale == 1.0 else round(self.crop_stored * self.crop_scale)

    def describe(self, stored: int | None = None) -> str | None:
        """One line for the report and the about page; None when everything keeps its stored side."""
        if (self.scale, self.crop_scale) == (1.0, 1.0) or not self.estimates:
            return None
        shrunk = []
        if self.scale != 1.0:
            side = f"{round(stored * self.scale)} px of the stored {stored}" if stored else f"{self.scale:g} of their side"
            shrunk.append(f"views other than channel shown at {side}")
        if self.crop_side is not None:
            shrunk.append(f"example crops at {self.crop_side} px of the stored {self.crop_stored}")
        return (f"{' and '.join(shrunk)} to keep the site within {self.budget / 1e6:,.0f} MB "
                f"(estimated {self.estimates[self.scale, self.crop_scale] / 1e6:,.0f} MB; "
                f"{self.estimates[1.0, 1.0] / 1e6:,.0f} MB at full size)")


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


def _unit_bytes(f: h5py.File, model: Model, sample: list[tuple[int, int]]) -> tuple[float, dict, dict, int | None]:
    """Mean bytes per unit over the sampled units: of the fixed pictures (channel, thumbnail, attribution
    strip), of the secondary views at each view scale, and of the example strip at each crop scale;
    and the stored side of the crops."""
    fixed = 0.0
    views = dict.fromkeys(VIEW_SCALES, 0.0)
    examples = dict.fromkeys({c for _, c in CANDIDATES}, 0.0)
    crop_stored = None
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
        lists = [img.decode_crops(ds[c], int(group[name]["index"].shape[1])) for name, ds in crops(group).items()]
        if lists and model.n_images:
            crop_stored = lists[0].shape[1]
            for scale in examples:
                side = max(16, round(crop_stored * scale))
                examples[scale] += len(img.encode(img.examples_strip(lists, side), "crops"))
    for same in channels.values():  # thumbnails share sprite sheets: a sheet of the sample's
        sheet, _ = img.sprite_sheet(np.stack(same), np.ones(len(same), bool))
        fixed += len(img.encode(sheet, "sprite"))
    n = max(len(sample), 1)
    return fixed / n, {s: v / n for s, v in views.items()}, {s: v / n for s, v in examples.items()}, crop_stored


def plan_views(f: h5py.File, model: Model, spent: int, budget: int) -> Plan:
    """The largest sides of the secondary views and the example crops whose estimated site fits `budget` bytes.

    Args:
        f: the open store.
        model: its model, as `read_model` gives it.
        spent: bytes the site holds besides this model's units: other models,
            this model's dataset images and attribution maps.
        budget: bytes the whole site may take.

    Returns:
        The plan: the first of CANDIDATES whose estimate fits, else the last (the
        sides of what the store lacks stay as they are); stored sides when the
        store has neither secondary views nor crops.
    """
    has_views = any(v in layer.views for layer in model.layers for v in SECONDARY_VIEWS)
    has_crops = model.n_images and any(crops(f[LAYERS][layer.name]) for layer in model.layers)
    if not has_views and not has_crops:
        return Plan(budget=budget)
    sample = _sample(model)
    fixed, views, examples, crop_stored = _unit_bytes(f, model, sample)
    units = sum(layer.channels for layer in model.layers)
    pages = UNIT_PAGE_BYTES[model.n_images > 0]
    base = spent + units * (pages + fixed) + len(model.layers) * LAYER_BYTES
    # only what the store has can give
    candidates = list(dict.fromkeys((v if has_views else 1.0, c if has_crops else 1.0) for v, c in CANDIDATES))
    estimates = {(v, c): int(base + units * (views[v] + examples[c])) for v, c in candidates}
    view, crop = next((key for key in candidates if estimates[key] <= budget), candidates[-1])
    return Plan(view, estimates, budget, crop, crop_stored)
