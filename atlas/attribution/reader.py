"""What other stages may read of the attribution stage's parts: the neuron groups' directions.

The feature-visualization stage renders each group's direction (the full
preset), after the attribution stage has factorized the explained images'
activations; it reads them here, never the parts themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlas.store import Store, read_attrs
from atlas.store.schema import ATTRIBUTION, BLOCKS


@dataclass
class GroupDirections:
    """One chunk's neuron groups of one layer: the direction of each group in channel space."""

    chunk: str  # the blocks part's chunk (a pixel part of the dataset stage)
    layer: str
    index: np.ndarray  # int64 [n]: source index of each explained image
    directions: np.ndarray  # float32 [n, G, C]; all zeros for a group that was not found


def group_directions(store: Store) -> list[GroupDirections]:
    """Every neuron-group direction the finished building-block parts hold, chunk by chunk."""
    out = []
    for key, part in store.units(ATTRIBUTION, f"{BLOCKS}/"):
        layers = read_attrs(part).get("nmf_layers", [])
        for j, layer in enumerate(layers):
            name = f"nmf/{j}/directions"
            if name in part:
                out.append(GroupDirections(key[len(BLOCKS) + 1:], layer, part["index"][...],
                                           part[name][...].astype(np.float32)))
    return out
