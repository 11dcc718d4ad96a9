"""The store: crash-safe work-unit parts, their consolidation into one HDF5 file per model,
the schema that names everything in it, and `atlas info`.

Everything else sits above the store: stages write parts and consolidate
their section through `Store`, the site reads the consolidated file through
`open_store` and `read_attrs`.
"""

from atlas.store.files import atomic_write, write_json
from atlas.store.parts import Store
from atlas.store.read import open_store, read_attrs

__all__ = ["Store", "atomic_write", "open_store", "read_attrs", "write_json"]
