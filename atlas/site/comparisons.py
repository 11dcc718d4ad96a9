"""The comparisons `atlas compare` wrote into a site folder, as the site index lists them."""

from __future__ import annotations

import json
from pathlib import Path

from atlas.site.data import COMPARISONS


def listed_comparisons(site_dir: Path) -> list[dict]:
    """Every `<model>/compare/<other>/compare.json` in the site folder: the two models, the weights of
    the second, layers, images and the link to the comparison's page; [] when there are none."""
    site_dir = Path(site_dir)
    found = []
    for path in sorted(site_dir.glob(f"*/{COMPARISONS}/*/compare.json")):
        try:
            c = json.loads(path.read_text())
            found.append({"a": str(c["a"]["name"]), "b": str(c["b"]["name"]), "b_weights": str(c["b"]["weights_id"]),
                          "layers": len(c["layers"]), "images": int(c["images"]),
                          "href": f"{path.parent.relative_to(site_dir).as_posix()}/index.html"})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a comparison this version wrote: leave it out of the index
    return found
