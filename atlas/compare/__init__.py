"""Comparing two stores built on the same images: linear CKA between layers, units matched by correlation.

`compare(a, b, site_dir)` reads the two stores (never a model) and writes the
comparison's pages into the site; see run.py.
"""

from atlas.compare.run import compare

__all__ = ["compare"]
