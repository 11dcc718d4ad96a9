"""The attribution stage: every method behind one interface (`Attribution.attribute`), the maps of
every dataset image, unit attributions, and the sanity checks (checks/) that say which maps to trust."""

from atlas.attribution.consolidate import consolidate
from atlas.attribution.stage import STAGE, run

__all__ = ["STAGE", "consolidate", "run"]
