"""Ground-truth files: the true class of each image of a source that does not say it itself.

ImageNet's validation images lie in one flat folder, and their classes in a separate file.
Three forms are read, told apart by their content:

  * the ILSVRC2012 development kit's `ILSVRC2012_validation_ground_truth.txt`: one
    ILSVRC2012_ID per line, line N for `ILSVRC2012_val_<N>.JPEG` (or, for files named
    otherwise, for the N-th file in file-name order). The IDs are the kit's own numbering,
    not any model's class order; the kit's `data/meta.mat` maps them to WordNet ids, so it
    is looked for beside the file, in a `data/` folder next to it and in `../data/`;
  * Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString` rows whose prediction
    string starts with the WordNet id;
  * lines of `name label`: a file name (as listed, its base name or its stem) and a class
    index of the model, a WordNet id or a class name, separated by a tab or the last space.

Labels are kept as text here; `atlas.dataset.images` turns them into the model's class indices.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from atlas.errors import AtlasError

DEVKIT_CLASSES = 1000  # ILSVRC2012_IDs 1..1000 are the challenge's classes; higher ones are WordNet's inner nodes
VALIDATION_NAME = re.compile(r"ILSVRC2012_val_(\d+)")


@dataclass(frozen=True)
class GroundTruth:
    """The labels of one ground-truth file, as text (WordNet ids, class names or class indices)."""

    by_name: dict[str, str]  # file name, base name or stem -> label
    by_number: tuple[str, ...] = ()  # the development kit's form: the label of image N at N - 1

    def label(self, name: str, position: int) -> str | None:
        """The label of the image called `name` (relative to its source), the `position`-th of the source.

        Returns:
            The label's text, or None when the file has none for this image.
        """
        if self.by_number:
            number = VALIDATION_NAME.search(Path(name).name)
            n = int(number.group(1)) - 1 if number else position
            return self.by_number[n] if 0 <= n < len(self.by_number) else None
        path = Path(name)
        for key in (name, path.name, path.stem, str(path.with_suffix(""))):
            if key in self.by_name:
                return self.by_name[key]
        return None


def read_ground_truth(path: str | os.PathLike) -> GroundTruth:
    """Reads a ground-truth file in any of the module's forms.

    Raises:
        AtlasError: the file is missing, unreadable, empty or in no known form, or the
            development kit's meta.mat it needs is not found.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise AtlasError(f"--labels file not found: {path}; pass the ground-truth file of the images")
    try:
        lines = [line.strip() for line in file.read_text(errors="replace").splitlines()]
    except OSError as exc:
        raise AtlasError(f"cannot read --labels file {path} ({exc.strerror}); check its permissions") from None
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise AtlasError(f"--labels file {path} holds no labels")
    if lines[0].lower().startswith("imageid,"):
        return GroundTruth(_read_solution_csv(file, lines[1:]))
    if all(line.isdigit() for line in lines):
        wnids = devkit_wnids(file)
        return GroundTruth({}, tuple(wnids.get(int(line), "") for line in lines))
    return GroundTruth(_read_pairs(file, lines))


def _read_solution_csv(file: Path, rows: list[str]) -> dict[str, str]:
    out = {}
    for n, row in enumerate(rows, 2):
        image, _, prediction = row.partition(",")
        if not prediction.split():
            raise AtlasError(f"line {n} of --labels {file.name}: expected 'ImageId,PredictionString', got {row[:80]!r}")
        out[image.strip()] = prediction.split()[0]
    return out


def _read_pairs(file: Path, lines: list[str]) -> dict[str, str]:
    out = {}
    for n, line in enumerate(lines, 1):
        name, _, label = line.rpartition("\t") if "\t" in line else line.rpartition(" ")
        if not name.strip() or not label.strip():
            raise AtlasError(f"line {n} of --labels {file.name}: expected 'name label' (or one ILSVRC2012_ID "
                             f"per line), got {line[:80]!r}")
        out[name.strip()] = label.strip()
    return out


def devkit_wnids(ground_truth: Path) -> dict[int, str]:
    """The WordNet id of each ILSVRC2012_ID, from the development kit's meta.mat near `ground_truth`.

    Raises:
        AtlasError: no meta.mat is found, scipy (which reads it) is missing, or it is not the kit's.
    """
    folder = ground_truth.parent
    places = [folder / "meta.mat", folder / "data" / "meta.mat", folder.parent / "data" / "meta.mat"]
    meta = next((p for p in places if p.is_file()), None)
    if meta is None:
        raise AtlasError(f"--labels {ground_truth.name} holds ILSVRC2012_IDs, which need the development kit's "
                         f"data/meta.mat beside it to become WordNet ids; copy meta.mat next to it, or pass "
                         f"lines of 'file wnid' or Kaggle's LOC_val_solution.csv instead")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise AtlasError("reading the development kit's meta.mat needs scipy (pip install scipy)") from None
    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        # the kit's fields, in order: ILSVRC2012_ID, WNID, words, gloss, num_children, ...
        pairs = [(int(s[0]), str(s[1])) for s in synsets]
    except Exception as exc:  # scipy raises many types for a file that is not the kit's
        raise AtlasError(f"{meta.name} beside --labels is not the development kit's meta.mat "
                         f"({type(exc).__name__}); copy the kit's data/meta.mat there") from None
    return {i: wnid for i, wnid in pairs if 1 <= i <= DEVKIT_CLASSES}
