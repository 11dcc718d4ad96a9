"""Refusing bad input before any work starts.

A build runs for minutes to hours, and its stages run one after another: a
mistyped data folder used to surface only after feature visualization had
finished. `check` judges everything that can be judged without loading the model
or decoding an image (numbers, the model's name, the weights file, the image
source and its labels, the output folders, the attribution methods) and stops at
the first bad input with one line naming it and what to do.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path

from atlas import models
from atlas.attribution.methods import check as check_method
from atlas.config import PRECISIONS, Config
from atlas.dataset.images import first_image, list_images
from atlas.dataset.labels import read_ground_truth
from atlas.errors import AtlasError
from atlas.models import tiny

# (field, how the user sets it, least, most): the numbers a build needs in range; None is no bound
RANGES = (
    ("explain", "--explain", 1, None),
    ("crop_size", "--crop-size", 8, 512),
    ("topk", "--topk", 1, None),
    ("max_images", "--max-images", 1, None),
    ("data_unit", "--data-unit", 1, None),
    ("data_batch", "the data_batch setting", 1, None),
    ("workers", "--workers", 0, None),
    ("fv_steps", "--steps", 1, None),
    ("fv_size", "--size", 1, None),
    ("fv_batch", "--fv-batch", 1, None),
    ("fv_loss_points", "the fv_loss_points setting", 1, None),
    ("fv_diversity", "the fv_diversity setting", 0, None),
    ("fv_redirect_steps", "the fv_redirect_steps setting", 0, None),
    ("fv_caricatures", "the fv_caricatures setting", 0, None),
    ("fv_caricature_steps", "the fv_caricature_steps setting", 1, None),
    ("attr_batch", "the attr_batch setting", 1, None),
    ("attr_chunk", "the attr_chunk setting", 0, None),
    ("attr_steps", "the attr_steps setting", 1, None),
    ("attr_max_steps", "the attr_max_steps setting", 1, None),
    ("attr_samples", "the attr_samples setting", 1, None),
    ("attr_draws", "the attr_draws setting", 1, None),
    ("attr_unit_topk", "the attr_unit_topk setting", 0, None),
    ("attr_unit_size", "the attr_unit_size setting", 1, None),
    ("attr_check_images", "the attr_check_images setting", 0, None),
    ("attr_check_groups", "the attr_check_groups setting", 1, None),
    ("attr_check_points", "the attr_check_points setting", 2, None),
    ("attr_blocks_units", "the attr_blocks_units setting", 0, None),
    ("attr_blocks_nmf_layers", "the attr_blocks_nmf_layers setting", 0, None),
    ("attr_blocks_groups", "the attr_blocks_groups setting", 1, None),
    ("attr_blocks_nmf_iter", "the attr_blocks_nmf_iter setting", 1, None),
    ("atlas_layers", "the atlas_layers setting", 0, None),
    ("atlas_grid", "the atlas_grid setting", 1, None),
    ("atlas_points", "the atlas_points setting", 1, None),
)


def check(config: Config) -> None:
    """Refuses a build whose input is bad, before it loads the model or writes anything.

    Reads no image and creates nothing: a folder is searched only until its first image
    file, and an output folder is tried with a temporary file that is removed at once.

    Raises:
        AtlasError: the first bad input, in one line that names it and says what to do.
    """
    check_numbers(config)
    check_model(config.model)
    check_weights(config.weights)
    for method in config.attr_methods:
        check_method(method)
    if config.attr_smoothgrad_precision not in PRECISIONS:
        raise AtlasError(f"attr_smoothgrad_precision must be one of {', '.join(PRECISIONS)}, "
                         f"got {config.attr_smoothgrad_precision!r}")
    check_data(config.data, config.labels)
    check_output(config.store_dir, "--store-dir")
    check_output(config.site_dir, "--out")


def check_numbers(config: Config) -> None:
    """Every number of `RANGES` within its bounds (None, where allowed, means "not set")."""
    for field, option, least, most in RANGES:
        value = getattr(config, field)
        if value is None and field in ("max_images", "workers"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least or (most and value > most):
            bounds = f"between {least} and {most}" if most else f"at least {least}"
            raise AtlasError(f"{option} must be a whole number {bounds}, got {value!r}")


def check_model(spec: str) -> None:
    """The spec names a model Atlas can load; it is looked up in the registries, not built."""
    if spec == models.DEFAULT_MODEL:
        return
    if spec.startswith("atlas:"):
        known = [f"atlas:{name}" for name in sorted(tiny.TINY)]
    elif spec.startswith("timm:"):
        import timm
        known = [f"timm:{name}" for name in timm.list_models()]
    else:
        import torchvision.models
        known = torchvision.models.list_models(module=torchvision.models) + [models.DEFAULT_MODEL]
    if spec not in known:
        close = difflib.get_close_matches(spec, known, n=3)
        raise AtlasError(f"unknown model {spec!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + "; expected a torchvision name, timm:NAME, atlas:NAME or "
                         + f"{models.DEFAULT_MODEL}; `atlas models` lists them")


def check_weights(weights: str | os.PathLike | None) -> None:
    """A weights file, when given, is a file this process can read (its content is read by the zoo)."""
    if weights is None or weights == models.RANDOM:
        return
    path = Path(weights).expanduser()
    if path.is_dir():
        raise AtlasError(f"--weights {weights} is a folder; pass the state-dict file itself")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise AtlasError(f"weights file not found: {weights}; pass --weights with a state-dict file, "
                         f"or leave it out for the model's own weights") from None
    except OSError as exc:
        raise AtlasError(f"cannot read weights file {weights} ({exc.strerror}); check its permissions") from None


def check_data(data: str | os.PathLike | None, labels: str | os.PathLike | None) -> None:
    """The image source holds at least one image file, and the labels file, if any, labels its images.

    The labels must name an image of the source: the first one found, or else any of the listed ones.
    """
    name = first_image(data)
    if labels is None:
        return
    truth = read_ground_truth(labels)
    if truth.label(name, 0) is not None:
        return
    if not any(truth.label(r.name, i) is not None for i, r in enumerate(list_images(data, []))):
        raise AtlasError(f"--labels {labels} names none of the images of {data or 'the sample photos'} "
                         f"(e.g. {name}); is it the ground truth of another folder?")


def check_output(folder: str | os.PathLike, option: str) -> None:
    """`folder` is, or can be made, a folder this process can write in.

    A missing folder is judged by the nearest folder above it that exists, where it would be made.
    """
    path = Path(folder).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise AtlasError(f"{option} {folder} {what}, not a folder; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".atlas-write-test-"):
            pass
    except OSError as exc:
        raise AtlasError(f"{option} {folder} is not writable ({exc.strerror or exc}); choose a folder you can "
                         f"write in") from None
