"""Screenshots of unit labels for the README: a labelled layer grid and a polysemantic unit, from a
synthetic store (ImageNet's class names, 50,000 synthetic images, planted classes; atlas.testing).

    python docs/screenshots/labels.py docs/screenshots

The default atlas's 32 photos are too few for any label to clear the significance bar, so these
pictures show what a large search set gives; every number on them is synthetic.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make import SIZE, launch, optimize  # noqa: E402  (the screenshots' browser and compression)


def main(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    from atlas import models, site
    from atlas.testing.synthetic import write_synthetic_store
    from atlas.testing.synthetic_labels import add_labels
    classes = models.load(models.DEFAULT_MODEL).class_names
    with tempfile.TemporaryDirectory() as tmp:
        store = write_synthetic_store(Path(tmp) / "synthetic.h5", [("layer4.2", 256, 7)], 50_000, explained=64,
                                      classes=classes, name="synthetic_resnet50", methods=())
        add_labels(store)
        with h5py.File(store, "r") as f:
            poly = int(np.nonzero(f["layers/layer4.2/labels/polysemantic"][...])[0][0])
        site.render(store, Path(tmp) / "site", progress=False)
        layer = Path(tmp) / "site" / "synthetic_resnet50" / "layer4.2"
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport=SIZE)
            page.goto((layer / "index.html").as_uri(), wait_until="load")
            page.evaluate("document.querySelector('#grid-controls').scrollIntoView()")
            (out / "labels-grid.png").write_bytes(optimize(page.screenshot()))
            page.goto((layer / f"{poly}.html").as_uri(), wait_until="load")
            page.evaluate("document.querySelector('section.label details').open = true")
            page.evaluate("document.querySelector('section.label').scrollIntoView()")
            (out / "labels-polysemantic.png").write_bytes(optimize(page.screenshot()))
            browser.close()
    print(f"labels-grid.png, labels-polysemantic.png (unit {poly}) in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else HERE))
