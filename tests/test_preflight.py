"""Bad input is refused in seconds, through the real command line, before the model loads, any
image is decoded or any part of the store is written."""

import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import atlas.pipeline  # noqa: F401  imported once here, so each refusal is timed without it
from atlas import models, preflight
from atlas.cli import main
from atlas.dataset import images
from atlas.errors import AtlasError

LIMIT_S = 10.0


@pytest.fixture
def spied(monkeypatch):
    """Records every model load and every image decode the command line attempts."""
    calls = []
    real_load, real_decode = models.load, images._decode
    monkeypatch.setattr(models, "load", lambda *a, **k: calls.append("load") or real_load(*a, **k))
    monkeypatch.setattr(images, "_decode", lambda *a, **k: calls.append("decode") or real_decode(*a, **k))
    return calls


def _refuse(tmp_path: Path, *args: str) -> str:
    """Runs `atlas build` on the tiny model; asserts it fails in one line, in time, writing nothing."""
    options = {"--model": "atlas:tiny_convnet", "--data": str(_folder(tmp_path)), "--device": "cpu",
               "--store-dir": str(tmp_path / "store"), "--out": str(tmp_path / "site")}
    options.update(dict(zip(args[::2], args[1::2])))
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["build", "-q", *[x for pair in options.items() for x in pair]])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    assert elapsed < LIMIT_S, f"refused after {elapsed:.1f} s"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("atlas: error: "), result.stderr
    assert not (tmp_path / "store" / "atlas-tiny_convnet.parts").exists()
    return lines[0]


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    if not folder.exists():
        (folder / "class 3").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (40 * i, 90, 160)).save(folder / "class 3" / f"img{i}.png")
    return folder


def _empty(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


def _no_images(tmp_path: Path) -> str:
    (tmp_path / "texts" / "deep").mkdir(parents=True)
    (tmp_path / "texts" / "deep" / "notes.txt").write_text("no image here")
    return str(tmp_path / "texts")


def _dead_list(tmp_path: Path) -> str:
    (tmp_path / "list.txt").write_text("# nothing of this exists\nmissing/a.jpg 3\n/nowhere/b.png\n")
    return str(tmp_path / "list.txt")


def _file(tmp_path: Path, name: str = "plain.txt", text: str = "x") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def _labels_for_another_folder(tmp_path: Path) -> str:
    return _file(tmp_path, "labels.txt", "ILSVRC2012_val_00000001.JPEG 3\nother.jpg 1\n")


def _devkit_without_meta(tmp_path: Path) -> str:
    return _file(tmp_path, "ILSVRC2012_validation_ground_truth.txt", "65\n970\n")


BAD = [  # (what is wrong, extra options (a callable makes the value in tmp_path), what the message says)
    ("missing data folder", ("--data", "/nonexistent/folder"), "image source not found: /nonexistent/folder"),
    ("empty data folder", ("--data", _empty), "no image files in"),
    ("folder of no images", ("--data", _no_images), "no image files in"),
    ("list of missing files", ("--data", _dead_list), "no existing files among the first 1000 lines"),
    ("unknown tiny model", ("--model", "atlas:nope"), "unknown model 'atlas:nope'"),
    ("unknown torchvision model", ("--model", "resnet5O"), "did you mean resnet50"),
    ("unknown timm model", ("--model", "timm:resnet_nope"), "unknown model 'timm:resnet_nope'"),
    ("missing weights", ("--weights", "/nowhere/w.pt"), "weights file not found: /nowhere/w.pt"),
    ("weights folder", ("--weights", _empty), "is a folder"),
    ("missing labels", ("--labels", "/nowhere/gt.txt"), "--labels file not found"),
    ("labels of another folder", ("--labels", _labels_for_another_folder), "names none of the images"),
    ("labels of one word a line", ("--labels", lambda t: _file(t, "l.txt", "a b\nc\n")), "line 2 of --labels"),
    ("devkit labels without meta.mat", ("--labels", _devkit_without_meta), "meta.mat"),
    ("store dir is a file", ("--store-dir", _file), "is a file, not a folder"),
    ("site under a file", ("--out", lambda t: _file(t) + "/site"), "which is a file, not a folder"),
    ("no explained image", ("--explain", "0"), "--explain"),
    ("tiny crops", ("--crop-size", "4"), "--crop-size must be a whole number between 8 and 512, got 4"),
    ("huge crops", ("--crop-size", "600"), "between 8 and 512, got 600"),
    ("no top images", ("--topk", "0"), "--topk"),
    ("no images at all", ("--max-images", "0"), "--max-images"),
    ("negative workers", ("--workers", "-1"), "--workers"),
    ("empty work units", ("--data-unit", "0"), "--data-unit"),
    ("no steps", ("--steps", "0"), "--steps"),
    ("unknown method", ("--methods", "gradient,nope"), "unknown attribution method 'nope'"),
    ("unknown device", ("--device", "tpu"), "unknown device 'tpu'"),
]


@pytest.mark.parametrize("option, value, says", [b[1] + (b[2],) for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_in_seconds_without_loading_anything(tmp_path, spied, option, value, says):
    value = value(tmp_path) if callable(value) else value
    message = _refuse(tmp_path, option, value)
    assert says in message
    assert spied == []


def test_a_layer_pattern_is_judged_after_discovery_before_any_stage(tmp_path, spied):
    message = _refuse(tmp_path, "--layers", "no_such_layer*")
    assert "layer pattern 'no_such_layer*' matches no layer" in message
    assert "decode" not in spied


def test_good_input_passes_and_creates_nothing(tmp_path, config):
    data = _folder(tmp_path)
    labels = _file(tmp_path, "labels.txt", "class 3/img0.png 1\nimg1 2\n")
    cfg = config(tmp_path, data, labels=labels, store_dir=tmp_path / "new" / "store", site_dir=tmp_path / "site")
    preflight.check(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "labels.txt"]


def test_the_first_image_is_found_deep_and_a_list_is_read_until_a_file_exists(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (tmp_path / "a" / "readme.md").write_text("not an image")
    Image.new("RGB", (4, 4)).save(deep / "x.webp")
    assert images.first_image(tmp_path) == "a/b/c/x.webp"
    listing = tmp_path / "list.txt"
    listing.write_text(f"gone.jpg 1\n{deep / 'x.webp'} n01440764\n")
    assert images.first_image(listing) == "a/b/c/x.webp"


def test_numbers_the_command_line_does_not_set_are_checked_too():
    from atlas.config import Config
    preflight.check_numbers(Config(max_images=None, workers=None, attr_unit_topk=0, attr_check_images=0))
    with pytest.raises(AtlasError, match="the attr_check_points setting must be a whole number at least 2, got 1"):
        preflight.check_numbers(Config(attr_check_points=1))
    with pytest.raises(AtlasError, match="--explain must be a whole number at least 1, got 0"):
        preflight.check_numbers(Config(explain=0))


def test_a_precision_the_methods_do_not_know_is_refused():
    from atlas.config import Config
    with pytest.raises(AtlasError, match="attr_smoothgrad_precision must be one of float32, bfloat16, got 'half'"):
        preflight.check(Config(attr_smoothgrad_precision="half"))


def test_a_missing_data_folder_fails_within_seconds_from_a_shell(tmp_path, run_atlas):
    start = time.perf_counter()
    proc = run_atlas("build", "--data", "/nonexistent/folder", "--store-dir", str(tmp_path / "store"),
                     "--out", str(tmp_path / "site"), cwd=tmp_path, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2 and proc.stderr.startswith("atlas: error: image source not found")
    assert elapsed < LIMIT_S, f"python -m atlas refused after {elapsed:.1f} s, interpreter start included"
    assert list(tmp_path.iterdir()) == []
