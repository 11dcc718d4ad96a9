"""Image sources and robust decoding.

A source is a folder (searched recursively; class folders named after a class
or an ImageNet WordNet id give labels), a text file listing one path per line
(optionally followed by a class index), or None for the embedded sample
photos that ship in registry packages (foolbox's 20 labelled ImageNet samples
and scikit-image's photos). Files that cannot be used are skipped with a
one-line reason, never crash a pass.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from atlas.errors import AtlasError
from atlas.models import Preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".ppm", ".pgm", ".jfif"}
MAX_PIXELS = 40_000_000  # larger images are treated as decompression bombs and skipped
SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
                  "rocket.jpg", "hubble_deep_field.jpg", "brick.png", "grass.png", "gravel.png",
                  "coins.png", "moon.png")


@dataclass(frozen=True)
class ImageRecord:
    path: str  # where to read the file
    label: int = -1  # true class index, -1 when unknown
    name: str = ""  # the path relative to the source, what the store and the site show

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", Path(self.path).name)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sample_images() -> list[ImageRecord]:
    """The embedded default photos: foolbox's ImageNet samples, then scikit-image's photos."""
    records = []
    foolbox = _package_dir("foolbox")
    if foolbox is not None:
        for p in sorted((foolbox / "data").glob("imagenet_*.jpg")):
            records.append(ImageRecord(str(p), int(p.stem.rsplit("_", 1)[1]), f"foolbox/{p.name}"))
    skimage = _package_dir("skimage")
    if skimage is not None:
        records += [ImageRecord(str(skimage / "data" / n), -1, f"scikit-image/{n}") for n in SKIMAGE_PHOTOS
                    if (skimage / "data" / n).exists()]
    if not records:
        raise AtlasError("no sample photos found: install foolbox and scikit-image, or pass --data FOLDER")
    return records


def _label_lookup(class_names: list[str]) -> dict[str, int]:
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    if len(class_names) == 1000:
        try:
            from timm.data import ImageNetInfo
            lookup.update({wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())})
        except Exception:  # timm missing or without its ImageNet tables: folder labels stay unknown
            pass
    return lookup


def list_images(source: str | os.PathLike | None, class_names: list[str]) -> list[ImageRecord]:
    """Lists the images of a source in a stable order.

    Args:
        source: folder, list file, or None for the embedded samples.
        class_names: the model's classes, to turn folder names into labels.

    Raises:
        AtlasError: the source does not exist or holds no image files.
    """
    if source is None:
        # the sample labels are ImageNet indices: they mean nothing to a model with other classes
        imagenet = len(class_names) == 1000
        return [r if imagenet else ImageRecord(r.path, -1, r.name) for r in sample_images()]
    root = Path(source).expanduser()
    if root.is_dir():
        lookup = _label_lookup(class_names)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        records = [ImageRecord(str(p), lookup.get(p.parent.name.lower(), -1) if p.parent != root else -1,
                               p.relative_to(root).as_posix()) for p in files]
    elif root.is_file():
        records = _read_list(root)
    else:
        raise AtlasError(f"image source not found: {source} (expected a folder or a text file of paths)")
    if not records:
        raise AtlasError(f"no image files in {source} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return records


def _read_list(path: Path) -> list[ImageRecord]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, label = line.rpartition(" ") if line.rsplit(" ", 1)[-1].lstrip("-").isdigit() else (line, "", "")
        file = Path(name.strip()).expanduser()
        records.append(ImageRecord(str(file if file.is_absolute() else path.parent / file),
                                   int(label) if label else -1, name.strip()))
    return records


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any mode Pillow decodes (16-bit, float, CMYK, palette, alpha) to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        image = Image.fromarray(a.astype(np.uint8))
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def decode(path: str, preprocess: Preprocess) -> tuple[np.ndarray | None, str]:
    """Decodes one file to the model's view, uint8 [S, S, 3].

    Returns:
        (pixels, "") on success, or (None, reason) for a file that cannot be used.
    """
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    return None, f"too large ({image.width}x{image.height} pixels, limit {MAX_PIXELS})"
                image.load()
                return preprocess.to_unit(_to_rgb(image)), ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"decompression bomb ({exc})".splitlines()[0][:200]
    except FileNotFoundError:
        return None, "file not found"
    except Exception as exc:  # Pillow raises many types for damaged files
        return None, f"unreadable: {type(exc).__name__}: {exc}".splitlines()[0][:200]


class ImageDataset(torch.utils.data.Dataset):
    """Decodes records for a DataLoader; a bad file yields a zero image and its reason."""

    def __init__(self, records: list[ImageRecord], preprocess: Preprocess, indices: range):
        self.records, self.preprocess, self.indices = records, preprocess, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        index = self.indices[i]
        pixels, reason = decode(self.records[index].path, self.preprocess)
        if pixels is None:
            pixels = np.zeros((self.preprocess.size, self.preprocess.size, 3), np.uint8)
        return torch.from_numpy(pixels), index, reason


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, not half-decoded
