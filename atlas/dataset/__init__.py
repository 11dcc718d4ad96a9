"""The dataset stage: one streaming pass that finds every channel's top and bottom images.

images.py reads image sources (folders, list files, the embedded photos);
topk.py folds each activation into running summaries inside its hook;
stage.py runs the pass in work units; consolidate.py merges the units into the
store; reader.py is how other stages read the results.
"""

from atlas.dataset.consolidate import consolidate
from atlas.dataset.stage import STAGE, run

__all__ = ["STAGE", "consolidate", "run"]
