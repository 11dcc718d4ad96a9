"""The feature-visualization stage: parameterizations, transforms, objectives, the batched renderer,
and the stage that renders every view of every selected channel."""

from atlas.featurevis.stage import STAGE, consolidate, derive_quality, run, run_later

__all__ = ["STAGE", "consolidate", "derive_quality", "run", "run_later"]
