"""Image sources and decoding: every odd or hostile file is converted or skipped, never fatal."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlas.dataset.images import ImageDataset, decode, list_images, sample_images
from atlas.errors import AtlasError
from atlas.models import Preprocess

PRE = Preprocess(size=16, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_every_mode_converts_and_every_bad_file_is_skipped_with_a_reason(tmp_path, hostile_folder):
    folder = hostile_folder(tmp_path)
    records = list_images(folder, [])
    assert len(records) == 12 and all(r.label == -1 for r in records)
    results = {r.name: decode(r.path, PRE) for r in records}
    converted = ["rgb.png", "gray.png", "palette.gif", "rgba.png", "cmyk.jpg", "deep16.png", "good.jpg",
                 'name "<img src=x onerror=alert(1)>".png']
    for name in converted:
        pixels, reason = results[name]
        assert reason == "" and pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8, name
    assert results["deep16.png"][0].max() > 200  # 16-bit scaled to the full 8-bit range
    assert results["zero.jpg"] == (None, "empty file")
    assert results["truncated.jpg"][0] is None and "unreadable" in results["truncated.jpg"][1]
    assert results["text.jpg"][0] is None and "UnidentifiedImageError" in results["text.jpg"][1]
    assert results["bomb.png"][0] is None and "too large" in results["bomb.png"][1]
    assert all("\n" not in reason for _, reason in results.values())


def test_dataset_yields_a_reason_instead_of_raising(tmp_path, hostile_folder):
    folder = hostile_folder(tmp_path)
    records = list_images(folder, [])
    data = ImageDataset(records, PRE, range(len(records)))
    reasons = [data[i][2] for i in range(len(data))]
    assert sum(bool(r) for r in reasons) == 4


def test_class_folders_wordnet_ids_and_list_files(tmp_path):
    for sub in ("tench", "n01443537", "unknown thing"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / sub / "a.png")
    classes = ["tench", "goldfish"] + [f"c{i}" for i in range(998)]
    labels = {r.name: r.label for r in list_images(tmp_path, classes)}
    assert labels == {"n01443537/a.png": 1, "tench/a.png": 0, "unknown thing/a.png": -1}
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\ntench/a.png 0\nunknown thing/a.png\n")
    records = list_images(listing, classes)
    assert [(r.name, r.label) for r in records] == [("tench/a.png", 0), ("unknown thing/a.png", -1)]
    assert Path(records[0].path).is_file()


def test_missing_and_empty_sources_are_errors(tmp_path):
    with pytest.raises(AtlasError, match="image source not found"):
        list_images(tmp_path / "nowhere", [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtlasError, match="no image files"):
        list_images(tmp_path / "empty", [])


def test_embedded_samples_are_labelled_photos():
    records = sample_images()
    assert len(records) == 32 and sum(r.label >= 0 for r in records) == 20
    assert records[0].name == "foolbox/imagenet_00_243.jpg" and records[0].label == 243
