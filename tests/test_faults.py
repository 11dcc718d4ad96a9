"""Faults, injected for real on the tiny model: kills mid-write, a full disk, Ctrl-C, hostile files.

Every fault leaves the finished units whole; the same command run again ends
with the store an uninterrupted build makes.
"""

import errno
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from atlas.cli import main
from atlas.store import parts as store_module  # where Store writes its parts and its root section
from atlas.store.schema import VIEWS

BUILD = ["build", "--model", "atlas:tiny_convnet", "--steps", "4", "--size", "32", "--topk", "4", "--workers", "0",
         "-q", "--device", "cpu", "--data-unit", "4", "--fv-batch", "2", "--methods", "gradient,smoothgrad",
         "--atlas-layers", "0"]  # the activation atlas's resume is tested in test_activation_atlas.py
STORE = "atlas-tiny_convnet"

# Runs the CLI and SIGKILLs itself at the n-th durable write: "rename" when a file
# is written and flushed but not yet renamed into place, "write" half-way through
# writing a part's datasets, "consolidate" half-way through writing the .h5.
KILLER = """
import os, signal, sys
import atlas.store.parts as store
n, where = int(sys.argv[1]), sys.argv[2]
calls = [0]

def hit():
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)

if where == "rename":
    real_replace = os.replace
    def replace(src, dst):
        hit()
        return real_replace(src, dst)
    os.replace = replace
elif where == "consolidate":
    real_root = store.write_root
    def root(f, meta):
        real_root(f, meta)
        hit()
    store.write_root = root
else:
    real_write = store.write_h5
    def write(tmp, arrays, attrs):
        real_write(tmp, dict(list(arrays.items())[: len(arrays) // 2]), attrs)
        hit()
        real_write(tmp, arrays, attrs)
    store.write_h5 = write
from atlas.cli import main
main(sys.argv[3:], prog_name="atlas")
"""


def _hear_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell's background job starts with SIGINT ignored


def cli(cwd: Path, store: str, *extra: str, prefix: tuple[str, ...] = ("-m", "atlas")) -> subprocess.Popen:
    args = [*BUILD, "--data", "images", "--store-dir", store, "--out", f"site-{store}", *extra]
    return subprocess.Popen([sys.executable, *prefix, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_hear_ctrl_c)


def parts(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / f"{STORE}.parts").glob("*/*.h5") if not p.name.startswith("."))


def computed(folder: Path) -> dict[str, int]:
    """When each finished unit was computed (its `written` stamp, which compaction keeps), by file name;
    the running summaries of the dataset pass, rewritten as it goes, are left out."""
    out = {}
    for p in parts(folder):
        if not p.name.startswith("summary%2F"):
            with h5py.File(p, "r") as f:
                out[p.name] = int(f.attrs["written"])
    return out


FV_BATCH = 2  # --fv-batch: channels per feature-visualization unit (every selected layer's count is even)


def assert_whole(folder: Path) -> None:
    """Every part on disk opens with all its datasets readable, and a feature-visualization part holds
    the whole batch its key names; the consolidated store, if there, opens."""
    for p in parts(folder):
        with h5py.File(p, "r") as f:
            f.visititems(lambda _, o: o[()] if isinstance(o, h5py.Dataset) else None)
            key = urllib.parse.unquote(p.stem)
            if p.parent.name == "featurevis" and key.split("/", 1)[0] in VIEWS:  # a view's batch of channels
                first, end = key.rsplit("/", 1)[1].split("-")
                assert f["images"].shape[0] == int(end) - int(first) == FV_BATCH, p
    if (folder / f"{STORE}.h5").exists():
        h5py.File(folder / f"{STORE}.h5", "r").close()


@pytest.fixture(scope="session")
def assert_same_store(store_arrays):
    """`assert_same_store(a, b)`: the consolidated stores in folders a and b hold the same datasets, bit for bit."""
    def same(a: Path, b: Path) -> None:
        x, y = store_arrays(a / f"{STORE}.h5"), store_arrays(b / f"{STORE}.h5")
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    return same


@pytest.fixture(scope="module")
def work(tmp_path_factory, make_images):
    """A folder with images and an uninterrupted build in `clean/`."""
    root = tmp_path_factory.mktemp("faults")
    make_images(root / "images", 12)
    proc = cli(root, "clean")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return root


def test_kills_mid_write_lose_no_finished_unit(work, assert_same_store):
    """SIGKILL at four points of a build, each run resuming the one killed before: every part on disk
    stays whole, a resume never computes a finished unit again, and the store ends as a clean build's."""
    n = len(computed(work / "clean"))
    kept: dict[str, int] = {}  # part -> when it was computed, of every part a kill left behind
    counts = []
    for at, where in ((3, "rename"), (6, "write"), (10, "rename"), (1, "consolidate")):
        proc = cli(work, "killed", prefix=("-c", KILLER, str(at), where))
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (at, where)
        assert_whole(work / "killed")
        assert len(computed(work / "killed")) < n or where == "consolidate"
        now = computed(work / "killed")
        assert all(now.get(name) == stamp for name, stamp in kept.items()), (at, where)  # none redone
        kept = now
        counts.append(len(now))
    assert counts == sorted(set(counts)) and any(0 < c < n for c in counts)  # each run got further; some mid-way
    before = kept
    assert len(before) == n  # the last kill came after every unit was done
    proc = cli(work, "killed")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    after = computed(work / "killed")
    assert all(after[name] == stamp for name, stamp in before.items())  # no finished unit computed again
    assert not list((work / "killed" / f"{STORE}.parts").glob("*/.*.tmp*"))
    assert not list((work / "killed").glob(".*.tmp*"))  # nor the half-written consolidation
    assert_same_store(work / "killed", work / "clean")


def test_a_full_disk_stops_with_one_line_and_keeps_the_finished_units(work, monkeypatch, assert_same_store):
    real = store_module.write_h5
    calls = [0]

    def full(tmp, arrays, attrs):
        calls[0] += 1
        if calls[0] >= 6:  # the disk fills up during the sixth part
            with open(tmp, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        real(tmp, arrays, attrs)

    monkeypatch.setattr(store_module, "write_h5", full)
    monkeypatch.chdir(work)
    args = [*BUILD, "--data", "images", "--store-dir", "full", "--out", "site-full"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("atlas: error: disk full while writing") and "re-run the same command" in line
    assert len(parts(work / "full")) == 5
    assert not list((work / "full" / f"{STORE}.parts").glob("*/.*.tmp*"))  # the half-written part is gone
    assert_whole(work / "full")
    monkeypatch.setattr(store_module, "write_h5", real)
    assert CliRunner().invoke(main, args).exit_code == 0
    assert_same_store(work / "full", work / "clean")


def test_ctrl_c_exits_cleanly_and_the_rerun_finishes(work, assert_same_store):
    proc = cli(work, "interrupted")
    folder = work / "interrupted"
    deadline = time.time() + 120
    while len(parts(folder)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted; finished work units are kept" in err and "Traceback" not in err
    assert not list((folder / f"{STORE}.parts").glob("*/.*.tmp*"))
    assert_whole(folder)
    proc = cli(work, "interrupted")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_same_store(folder, work / "clean")


def test_a_folder_of_hostile_files_builds_and_renders(tmp_path, hostile_folder):
    (tmp_path / "images").mkdir()
    hostile_folder(tmp_path / "images")
    proc = cli(tmp_path, "hostile")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    with h5py.File(tmp_path / "hostile" / f"{STORE}.h5", "r") as f:
        skipped = dict(zip(f["dataset/skipped_paths"].asstr()[...], f["dataset/skipped_reasons"].asstr()[...]))
        assert len(f["dataset/images"]) == 8
    assert set(skipped) == {"truncated.jpg", "zero.jpg", "text.jpg", "bomb.png"}
    site = tmp_path / "site-hostile"
    pages = [p.read_text() for p in site.rglob("*.html")]
    assert not any("<img src=x onerror" in page for page in pages)  # the file name shows as text
    assert any("&lt;img src=x onerror=alert(1)&gt;" in page for page in pages)


def test_nan_maps_are_computed_again_then_flagged(tmp_path, monkeypatch, config, make_images):
    """NaN in a deterministic method's map stays after the retry and is flagged; a random method's
    infinite map is replaced by the retry from another seed."""
    from atlas import pipeline
    from atlas.attribution import maps as maps_module
    from atlas.site import render

    real = maps_module._explain
    retried = []

    def poisoned(ctx, group, images, index, target, retry=0):
        out = real(ctx, group, images, index, target, retry)
        rows = list(index)
        for name, (maps, _) in out.items():
            if name == "gradient" and 0 in rows:
                maps[rows.index(0), 0, 0] = np.nan  # every time: a fault the retry cannot fix
            if name == "smoothgrad" and 1 in rows and retry == 0:
                maps[rows.index(1)] = np.inf  # the first time only
        retried.extend(rows if retry else [])
        return out

    monkeypatch.setattr(maps_module, "_explain", poisoned)
    cfg = config(tmp_path, make_images(tmp_path / "images", 6), attr_methods=("gradient", "smoothgrad"))
    ctx = pipeline.prepare(cfg, progress=False)
    path = pipeline.run_stages(ctx, ("dataset", "attribution"))
    assert sorted(set(retried)) == [0, 1]  # only the images whose maps failed were computed again
    with h5py.File(path, "r") as f:
        gradient, smooth = f["attribution/gradient"], f["attribution/smoothgrad"]
        assert gradient["finite"][()].tolist() == [False] + [True] * 5
        assert gradient.attrs["non_finite"] == 1 and np.isnan(gradient["maps"][0, 0, 0])
        assert smooth["finite"][()].all() and smooth.attrs["non_finite"] == 0
        assert np.isfinite(smooth["maps"][1]).all()
    render(path, tmp_path / "site", progress=False)
    page = (tmp_path / "site" / "atlas-2Dtiny_convnet" / "images" / "0.html").read_text()
    assert page.count(">not finite</span>") == 1
    assert ">not finite</span>" not in (tmp_path / "site" / "atlas-2Dtiny_convnet" / "images" / "1.html").read_text()


def test_out_of_memory_in_the_dataset_pass_halves_the_batch(tmp_path, monkeypatch, config, make_images,
                                                            store_arrays):
    """A simulated GPU that holds 2 images: the unit starts over with half the batch until it fits,
    and the result equals a run that never ran out."""
    import torch

    from atlas import pipeline
    from atlas.layers import Capture

    images = make_images(tmp_path / "images", 10)
    plain = pipeline.run_stages(pipeline.prepare(config(tmp_path / "plain", images, data_batch=8), progress=False),
                                ["dataset"])
    sizes = []
    real = Capture.run

    def small_gpu(self, x):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x)
    monkeypatch.setattr(Capture, "run", small_gpu)
    path = pipeline.run_stages(pipeline.prepare(config(tmp_path / "small", images, data_batch=8), progress=False),
                               ["dataset"])
    failed = [i for i, n in enumerate(sizes) if n > 2]
    # the pass: a batch of 8, then of 4, ran out of memory, the rest ran in batches of 2; then the explained
    # images' means, the same
    assert len(failed) == 4
    assert sizes[failed[0]] > 4 >= sizes[failed[1]] > 2 and sizes[failed[2]] > 4 >= sizes[failed[3]] > 2
    a, b = store_arrays(plain), store_arrays(path)
    assert set(a) == set(b) and "layers/relu2/topk/index" in a
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key) if a[key].dtype.kind == "f" \
            else np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_store_from_another_version_is_refused_naming_both(work, tmp_path):
    import json
    import shutil

    import atlas

    folder = tmp_path / "old"
    shutil.copytree(work / "clean", folder)
    meta = folder / f"{STORE}.parts" / "meta.json"
    old = json.loads(meta.read_text())
    meta.write_text(json.dumps({**old, "atlas_version": "0.0.1", "store_format": -1}))
    with h5py.File(folder / f"{STORE}.h5", "r+") as f:
        f.attrs["atlas_version"], f.attrs["store_format"] = "0.0.1", -1
    for args in ([*BUILD, "--data", str(work / "images"), "--store-dir", str(folder)],
                 ["render", str(folder / f"{STORE}.h5"), "--out", str(tmp_path / "site")],
                 ["info", str(folder / f"{STORE}.h5")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, args
        line = result.output.strip().splitlines()[-1]
        assert line.startswith("atlas: error: ") and "Atlas 0.0.1" in line and f"Atlas {atlas.__version__}" in line
