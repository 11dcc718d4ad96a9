"""Image sources and robust decoding.

A source is a folder (searched recursively; class folders named after a class
or an ImageNet WordNet id give labels), a text file listing one path per line
(optionally followed by a class index, class name or WordNet id), or None for
the embedded sample photos that ship in registry packages (foolbox's 20
labelled ImageNet samples and scikit-image's photos). A ground-truth file
(`atlas.dataset.labels`) labels a flat folder such as ImageNet's validation set.
Files that cannot be used are skipped with a one-line reason, never crash a pass.

What the store keeps and the site shows is relative to the source: an image's
name and the reason it was skipped never hold an absolute path of this machine.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from atlas.dataset.labels import read_ground_truth
from atlas.errors import AtlasError
from atlas.models import Preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".ppm", ".pgm", ".jfif"}
MAX_PIXELS = 40_000_000  # larger images are treated as decompression bombs and skipped
PROBE_LINES = 1000  # list lines `first_image` reads before calling a list broken
WNID = re.compile(r"n\d{8}")  # an ImageNet WordNet id, the class of a `path wnid` list line
# an absolute path a message quotes (POSIX, home-relative or Windows), up to a space or a quote
ABSOLUTE_PATH = re.compile(r"""(?<![\w.~])(?:[A-Za-z]:[\\/]|~?/)[^\s'"<>]*""")
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


def list_images(source: str | os.PathLike | None, class_names: list[str],
                labels: str | os.PathLike | None = None) -> list[ImageRecord]:
    """Lists the images of a source in a stable order.

    Args:
        source: folder, list file, or None for the embedded samples.
        class_names: the model's classes, to turn folder names and labels into class indices.
        labels: a ground-truth file (see `atlas.dataset.labels`) whose labels replace those the
            source gives; images it does not name keep theirs.

    Returns:
        One record per image file; a label that names no class of the model is -1.

    Raises:
        AtlasError: the source does not exist or holds no image files, or the labels file is bad.
    """
    lookup = _label_lookup(class_names)
    if source is None:
        # the sample labels are ImageNet indices: they mean nothing to a model with other classes
        imagenet = len(class_names) == 1000
        records = [r if imagenet else ImageRecord(r.path, -1, r.name) for r in sample_images()]
    else:
        records = _list_source(Path(source).expanduser(), lookup, len(class_names))
    if labels is not None:
        truth = read_ground_truth(labels)
        records = [_relabel(r, truth.label(r.name, i), lookup, len(class_names)) for i, r in enumerate(records)]
    return records


def _list_source(root: Path, lookup: dict[str, int], n_classes: int) -> list[ImageRecord]:
    if root.is_dir():
        records = [ImageRecord(str(p), lookup.get(p.parent.name.lower(), -1) if p.parent != root else -1,
                               p.relative_to(root).as_posix()) for p in _image_files(root)]
    elif root.is_file():
        records = _read_list(root, lookup, n_classes)
    else:
        raise AtlasError(f"image source not found: {root} (expected a folder or a text file of paths)")
    if not records:
        raise AtlasError(f"no image files in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return records


def _image_files(root: Path) -> list[Path]:
    """Every image file under `root`, sorted (by path parts, so a folder's files stay together).

    Symbolic links to folders are not followed; a name with an image suffix that is not a
    regular file (a folder, a pipe, a broken link) is left out.
    """
    found = [Path(folder, f) for folder, _, files in os.walk(root) for f in files
             if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())


def _relabel(record: ImageRecord, label: str | None, lookup: dict[str, int], n_classes: int) -> ImageRecord:
    if label is None:
        return record
    return ImageRecord(record.path, _class_index(label, lookup, n_classes), record.name)


def _class_index(label: str, lookup: dict[str, int], n_classes: int) -> int:
    """A label's class index: a number is the model's index, other text a class name or WordNet id."""
    if label.lstrip("-").isdigit():
        index = int(label)
        return index if index >= 0 and (not n_classes or index < n_classes) else -1
    return lookup.get(label.lower(), -1)


def _read_list(path: Path, lookup: dict[str, int], n_classes: int) -> list[ImageRecord]:
    """A list file's records: `path [label]` lines, the label a class index, class name or WordNet id."""
    folder = path.parent.absolute()
    records = []
    for line in _list_lines(path):
        entry, label = _list_entry(line, lookup)
        file, name = _shown_name(entry, folder)
        records.append(ImageRecord(file, -1 if label is None else _class_index(label, lookup, n_classes), name))
    return records


def _list_lines(path: Path) -> Iterator[str]:
    """The entries of a list file, read as they are needed (a probe stops after a few)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line
    except OSError as exc:
        raise AtlasError(f"cannot read the image list {path} ({exc.strerror}); check its permissions") from None


def _split_last(line: str) -> tuple[str, str]:
    """A line's text before its last word (after a tab, if it has one) and that word."""
    head, _, last = line.rpartition("\t") if "\t" in line else line.rpartition(" ")
    return head.strip(), last.strip()


def _list_entry(line: str, lookup: dict[str, int]) -> tuple[str, str | None]:
    """Splits a list line into its path and its label, if the last word is one."""
    head, last = _split_last(line)
    if head and (last.lstrip("-").isdigit() or WNID.fullmatch(last) or last.lower() in lookup):
        return head, last
    return line, None


def _shown_name(entry: str, folder: Path) -> tuple[str, str]:
    """Where to read a listed file, and the name the store and the site show for it.

    The name is the file's path relative to the list's folder; a file outside that folder is
    shown as its own folder's name and its file name (`photos/a.jpg`), never its absolute path.
    Two such files may then share a name; only the shown text is affected.
    """
    file = Path(entry).expanduser()
    full = Path(os.path.normpath(folder / file))  # an absolute entry replaces the folder
    try:
        name = full.relative_to(os.path.normpath(folder)).as_posix()
    except ValueError:
        name = f"{full.parent.name}/{full.name}" if full.parent.name else full.name
    return str(full if file.is_absolute() else folder / file), name


def first_image(source: str | os.PathLike | None) -> str:
    """The name of one image file of a source, found without listing or decoding the whole source.

    A folder is searched depth first and the search stops at the first image file; a list file
    is read until a listed file exists, at most `PROBE_LINES` lines.

    Raises:
        AtlasError: the source does not exist, cannot be read, or holds no image file.
    """
    if source is None:
        return sample_images()[0].name
    root = Path(source).expanduser()
    if not root.exists():
        raise AtlasError(f"image source not found: {source}; pass --data with a folder of images or a text "
                         f"file listing them")
    found = _first_in_folder(root) if root.is_dir() else _first_listed(root)
    if found is not None:
        return found
    if root.is_dir():
        raise AtlasError(f"no image files in {source} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); pass "
                         f"--data with a folder of images or a list of their paths")
    raise AtlasError(f"no existing files among the first {PROBE_LINES} lines of {source}; are its paths relative "
                     f"to another folder? They are read relative to the list's own folder")


def _first_in_folder(root: Path) -> str | None:
    todo = [root]
    while todo:
        folder = todo.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            if folder != root:
                continue  # as the listing does: an unreadable subfolder is passed over
            raise AtlasError(f"cannot read the image folder {folder} ({exc.strerror}); check its "
                             f"permissions") from None
        for entry in entries:
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                return Path(entry.path).relative_to(root).as_posix()
        todo += reversed([Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)])
    return None


def _first_listed(path: Path) -> str | None:
    folder = path.parent.absolute()
    for n, line in enumerate(_list_lines(path)):
        if n == PROBE_LINES:
            break
        # the last word may be a label, whichever the model's classes: try the line with and without it
        for entry in filter(None, (line, _split_last(line)[0])):
            file, name = _shown_name(entry, folder)
            if Path(file).is_file():
                return name
    return None


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


def decode(path: str, preprocess: Preprocess, name: str = "") -> tuple[np.ndarray | None, str]:
    """Decodes one file to the model's view, uint8 [S, S, 3].

    Args:
        path: where to read the file.
        preprocess: the model's preprocessing.
        name: what a reason calls the file (its name relative to the source); default its file name.

    Returns:
        (pixels, "") on success, or (None, reason) for a file that cannot be used. The reason is
        one line that quotes no absolute path, since the store keeps it and the site shows it.
    """
    pixels, reason = _decode(path, preprocess)
    return pixels, _relative_reason(reason, path, name or Path(path).name)[:200]


def _relative_reason(reason: str, path: str, name: str) -> str:
    """`reason` with the file's path written as `name`, the source's folder left out of other paths
    under it, and any other absolute path cut to its last part."""
    if not reason:
        return reason
    full = os.path.abspath(path)
    for variant in sorted({path, full, os.path.realpath(path)}, key=len, reverse=True):
        if os.sep in variant:  # a bare file name is left alone: it may be any word of the message
            reason = reason.replace(variant, "\0")  # kept from the scrubbing below, then named
    shown = str(Path(*Path(name).parts))
    root = full[: -len(shown)] if full.endswith(os.sep + shown) else ""
    if root.strip(os.sep):
        reason = reason.replace(root, "")
    reason = ABSOLUTE_PATH.sub(lambda m: re.split(r"[\\/]", m.group().rstrip("/\\"))[-1] or m.group(), reason)
    return reason.replace("\0", name)


def _decode(path: str, preprocess: Preprocess) -> tuple[np.ndarray | None, str]:
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
        return None, f"decompression bomb ({exc})".splitlines()[0]
    except FileNotFoundError:
        return None, "file not found"
    except Exception as exc:  # Pillow raises many types for damaged files
        return None, f"unreadable: {type(exc).__name__}: {exc}".splitlines()[0]


def image_loader(records: list[ImageRecord], preprocess: Preprocess, indices, workers: int,
                 **batching) -> torch.utils.data.DataLoader:
    """A DataLoader decoding `records[indices]` in `workers` processes (0: in this one).

    The workers start from a small server process that has imported only what
    decoding needs ("forkserver", Python's default from 3.14 on), not as copies of
    this one. A forked worker shares every page of this process's memory copy-on-write,
    and this process's next write to each page then copies it, with a TLB flush on
    every core. Once a forward pass has grown the heap to its working size (1.3 GB for
    a batch of 32 at 224 px), that cost 10 to 25 s per loader on a 2-core virtual
    machine: more than decoding 1,000 images. The server starts once per process (about
    3 s); each loader's workers then start in a fraction of a second. As under any
    forkserver or spawn start, a script that builds an atlas must guard its entry point
    (`if __name__ == "__main__":`): the workers import the script's module.
    """
    context = None
    if workers and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # no effect once the server runs
    return torch.utils.data.DataLoader(ImageDataset(records, preprocess, indices), num_workers=workers,
                                       multiprocessing_context=context, **batching)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes records for a DataLoader; a bad file yields a zero image and its reason."""

    def __init__(self, records: list[ImageRecord], preprocess: Preprocess, indices: range):
        self.records, self.preprocess, self.indices = records, preprocess, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        index = self.indices[i]
        record = self.records[index]
        pixels, reason = decode(record.path, self.preprocess, record.name)
        if pixels is None:
            pixels = np.zeros((self.preprocess.size, self.preprocess.size, 3), np.uint8)
        return torch.from_numpy(pixels), index, reason


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, not half-decoded
