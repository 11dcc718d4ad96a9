"""The dataset stage: one streaming pass over the search set that finds every channel's top and
bottom images, then the explained set and the example crops.

images.py reads image sources (folders, list files, the embedded photos);
topk.py folds each activation into running summaries inside its hook;
stage.py runs the pass in work units; examples.py chooses the explained set
and cuts the crops; consolidate.py merges the parts into the store;
reader.py names the parts and is how other stages read them.
"""

from atlas.dataset.consolidate import consolidate
from atlas.dataset.stage import STAGE, run

__all__ = ["STAGE", "consolidate", "run"]
