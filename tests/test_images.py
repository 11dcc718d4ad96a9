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


# --- ImageNet's layouts: class folders, the flat validation folder with its ground truth, list files ---

IMAGENET = [f"class {i}" for i in range(1000)]  # a 1000-class model: WordNet ids map in sorted order
TENCH, GOLDFISH, SHARK = "n01440764", "n01443537", "n01484850"  # classes 0, 1 and 2 in sorted order


def _jpegs(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / name, quality=80)
    return folder


def _validation(tmp_path: Path, numbers=(1, 2, 3, 4)) -> Path:
    return _jpegs(tmp_path / "val", [f"ILSVRC2012_val_{n:08d}.JPEG" for n in numbers])


def _fake_meta(path: Path) -> None:
    """A meta.mat of the development kit's shape: its IDs are not the sorted WordNet order, and
    WordNet's inner nodes come after the 1000 classes."""
    scipy_io = pytest.importorskip("scipy.io")
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    rows = [(1, SHARK, "great white shark", "", 0), (2, TENCH, "tench", "", 0), (3, GOLDFISH, "goldfish", "", 0),
            (1001, "n00000001", "an inner node", "", 3)]
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy_io.savemat(path, {"synsets": np.array(rows, dtype=fields).reshape(-1, 1)})


def test_the_flat_validation_folder_reads_the_devkit_ground_truth_through_its_meta_mat(tmp_path):
    val = _validation(tmp_path)
    truth = tmp_path / "devkit" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    _fake_meta(truth.parent / "meta.mat")
    truth.write_text("2\n1\n3\n1001\n")  # tench, shark, goldfish, and an ID that is no class
    records = list_images(val, IMAGENET, labels=truth)
    assert [r.label for r in records] == [0, 2, 1, -1]
    assert records[0].name == "ILSVRC2012_val_00000001.JPEG"


def test_a_part_of_the_validation_folder_is_labelled_by_the_number_in_each_name(tmp_path):
    val = _validation(tmp_path, numbers=(2, 4))
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    _fake_meta(tmp_path / "data" / "meta.mat")
    truth.write_text("1\n2\n3\n3\n")
    assert [r.label for r in list_images(val, IMAGENET, labels=truth)] == [0, 1]


def test_devkit_ground_truth_of_files_named_otherwise_follows_file_name_order(tmp_path):
    folder = _jpegs(tmp_path / "renamed", ["b.jpg", "a.jpg", "c.jpg"])
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    _fake_meta(tmp_path / "meta.mat")
    truth.write_text("2\n1\n")  # a.jpg, b.jpg; c.jpg has no line
    assert [(r.name, r.label) for r in list_images(folder, IMAGENET, labels=truth)] == [
        ("a.jpg", 0), ("b.jpg", 2), ("c.jpg", -1)]


def test_devkit_ground_truth_without_its_meta_mat_is_refused(tmp_path):
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("1\n2\n")
    with pytest.raises(AtlasError, match="meta.mat"):
        list_images(_validation(tmp_path), IMAGENET, labels=truth)


def test_kaggle_solution_csv_gives_wordnet_ids(tmp_path):
    val = _validation(tmp_path, numbers=(1, 2, 3))
    solution = tmp_path / "LOC_val_solution.csv"
    solution.write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000002,{SHARK} 1 2 30 40 {SHARK} 5 6 7 8\n"
                        f"ILSVRC2012_val_00000001,{GOLDFISH} 0 0 8 8\n")
    assert [r.label for r in list_images(val, IMAGENET, labels=solution)] == [1, 2, -1]


def test_name_label_lines_take_indices_class_names_and_wordnet_ids_and_unknowns_become_minus_one(tmp_path):
    folder = _jpegs(tmp_path / "flat", ["a.jpg", "b.jpg", "c.jpg", "my photo.jpg", "e.jpg", "f.jpg", "g.jpg"])
    labels = tmp_path / "labels.txt"
    labels.write_text("a.jpg 3\nb goldfish\nc.jpg n01443537\nmy photo.jpg\t0\ne.jpg 10\nf.jpg zebra\n")
    classes = ["tench", "goldfish", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"]
    labelled = {r.name: r.label for r in list_images(folder, classes, labels=labels)}
    # a WordNet id means nothing to a 10-class model; index 10 is out of range; g.jpg is not listed
    assert labelled == {"a.jpg": 3, "b.jpg": 1, "c.jpg": -1, "my photo.jpg": 0, "e.jpg": -1, "f.jpg": -1,
                        "g.jpg": -1}


def test_a_labels_line_without_a_label_is_refused(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a.jpg 1\njustaname\n")
    with pytest.raises(AtlasError, match="line 2 of --labels labels.txt"):
        list_images(_jpegs(tmp_path / "flat", ["a.jpg"]), [], labels=labels)


def test_wordnet_class_folders_map_through_the_models_classes(tmp_path):
    _jpegs(tmp_path / "train" / SHARK, ["x.JPEG"])
    _jpegs(tmp_path / "train" / TENCH, ["y.JPEG"])
    assert [(r.name, r.label) for r in list_images(tmp_path / "train", IMAGENET)] == [
        (f"{TENCH}/y.JPEG", 0), (f"{SHARK}/x.JPEG", 2)]


def test_list_files_take_wordnet_ids_and_never_show_an_absolute_path(tmp_path):
    _jpegs(tmp_path / "lists" / "here", ["a.jpg"])
    elsewhere = _jpegs(tmp_path / "elsewhere" / "photos", ["b.jpg", "c d.jpg"])
    listing = tmp_path / "lists" / "list.txt"
    listing.write_text(f"here/a.jpg {GOLDFISH}\n{elsewhere / 'b.jpg'} 2\n{elsewhere / 'c d.jpg'}\n"
                       f"{tmp_path / 'lists' / 'here' / 'a.jpg'}\n../elsewhere/photos/b.jpg {SHARK}\n")
    records = list_images(listing, IMAGENET)
    assert [(r.name, r.label) for r in records] == [
        ("here/a.jpg", 1), ("photos/b.jpg", 2), ("photos/c d.jpg", -1), ("here/a.jpg", -1), ("photos/b.jpg", 2)]
    assert all(Path(r.path).is_file() for r in records)


# --- nothing local in what the store keeps ---

def test_names_and_reasons_of_a_hostile_folder_hold_no_absolute_path(tmp_path, hostile_folder):
    root = tmp_path / "my data"
    nested = hostile_folder(_jpegs(root / "sub dir" / "deeper", []))
    (root / "sub dir" / "empty.png").write_bytes(b"")
    (root / "garbage.jpeg").write_bytes(bytes(range(256)) * 4)
    (root / "folder.jpg").mkdir()  # a folder with an image suffix is not a file
    records = list_images(root, [])
    data = ImageDataset(records, PRE, range(len(records)))
    reasons = {records[i].name: data[i][2] for i in range(len(data))}
    assert len(reasons) == 14 and sum(bool(r) for r in reasons.values()) == 6
    assert reasons["sub dir/deeper/text.jpg"] == (
        "unreadable: UnidentifiedImageError: cannot identify image file 'sub dir/deeper/text.jpg'")
    assert reasons["sub dir/empty.png"] == "empty file"
    assert nested.is_dir()
    for text in [*reasons, *reasons.values()]:
        assert str(tmp_path) not in text and not text.startswith("/"), text


def test_a_reason_quoting_other_paths_keeps_only_their_names(tmp_path, monkeypatch):
    image = _jpegs(tmp_path / "src" / "a", ["x.jpg"]) / "x.jpg"

    def failing_open(path, *args, **kwargs):
        raise OSError(f"[Errno 5] cannot read {path} beside {tmp_path}/src/a/y.jpg, via '/mnt/cache/blob 7'")
    monkeypatch.setattr(Image, "open", failing_open)
    pixels, reason = decode(str(image), PRE, "a/x.jpg")
    assert pixels is None
    assert reason == "unreadable: OSError: [Errno 5] cannot read a/x.jpg beside a/y.jpg, via 'blob 7'"
