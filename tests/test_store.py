"""The store on real files: work-unit parts written whole or not at all, stages that refuse other settings,
finished units listed, consolidation into one .h5, and the checks made when a store is opened."""

import errno
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

import atlas
from atlas.config import Config
from atlas.errors import AtlasError
from atlas.store import Store, open_store, read_attrs
from atlas.store import parts as parts_module
from atlas.store.info import summarize
from atlas.store.schema import STORE_FORMAT

CONFIG = Config(model="atlas:tiny_convnet", store_dir=Path("stores"), layers=("conv*",))


def layer(name: str, channels: int = 4) -> dict:
    return {"name": name, "module": name, "call": 0, "kind": "Conv2d", "channels": channels, "height": 8, "width": 8}


META = {"spec": "atlas:tiny_convnet", "name": "tiny", "weights_id": "seed 0", "input_size": 32,
        "classes": ["cat", "dog"], "preprocess": {"size": 32, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3},
        "layers": [layer("conv1"), layer("fc", 2)], "config": CONFIG.to_dict(), "versions": {"torch": "2"},
        "created": "2026-01-01T00:00:00+00:00"}


def json_values(d: dict) -> dict:
    """`d` as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(d))


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp*"))


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "stores", "tiny")
    s.open(META)
    return s


def test_a_part_is_written_whole_or_not_at_all(store, monkeypatch):
    store.begin("dataset", {})
    arrays = {"x": np.arange(4, dtype=np.int64), "names": np.array(["a", "b"])}
    store.write_unit("dataset", "00000-00004", arrays, {"count": 4, "settings": {"k": 1}, "none": None})
    with store.read_unit("dataset", "00000-00004") as f:
        np.testing.assert_array_equal(f["x"][()], arrays["x"])
        assert f["names"].asstr()[()].tolist() == ["a", "b"]  # text as HDF5 strings
        assert f.attrs["count"] == 4 and json.loads(f.attrs["settings"]) == {"k": 1} and f.attrs["none"] == "null"
    assert store.done("dataset") == {"00000-00004"} and not temporaries(store.parts)

    real = parts_module.write_h5

    def half_then(error: BaseException):
        def write(tmp, arrays, attrs):
            real(tmp, dict(list(arrays.items())[:1]), attrs)  # half the datasets are on disk ...
            raise error  # ... when the write fails
        return write

    monkeypatch.setattr(parts_module, "write_h5", half_then(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        store.write_unit("dataset", "00004-00008", arrays)
    with pytest.raises(RuntimeError, match="boom"):  # a part written again fails: the old one stays
        store.write_unit("dataset", "00000-00004", {"x": np.zeros(4)})
    monkeypatch.setattr(parts_module, "write_h5", half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(AtlasError, match=r"disk full while writing .*00004-00008\.h5; finished units are kept"):
        store.write_unit("dataset", "00004-00008", arrays)
    assert store.done("dataset") == {"00000-00004"} and not temporaries(store.parts)
    with store.read_unit("dataset", "00000-00004") as f:
        np.testing.assert_array_equal(f["x"][()], arrays["x"])
        assert "names" in f


def test_begin_refuses_other_settings_naming_each_difference(store):
    params = {"fv_steps": 3, "fv_size": 16, "model": "atlas:tiny_convnet", "store_dir": Path("stores")}
    assert store.begin("featurevis", params) == set()
    assert store.params("featurevis") == {**params, "store_dir": "stores"}  # as JSON keeps it
    store.write_unit("featurevis", "channel/conv1/00000-00002", {"images": np.zeros((2, 4, 4, 3), np.uint8)})
    assert store.begin("featurevis", dict(params)) == {"channel/conv1/00000-00002"}  # the same: resumed

    changed = {**params, "fv_steps": 5, "seed": 1}
    del changed["model"]
    with pytest.raises(AtlasError) as refused:
        store.begin("featurevis", changed)
    message = str(refused.value)
    assert "the featurevis parts in" in message and "were made with other settings" in message
    assert "(fv_steps: 3 -> 5, model: 'atlas:tiny_convnet' -> None, seed: None -> 1)" in message  # each, sorted
    assert "fv_size" not in message and "store_dir" not in message  # what is unchanged is not named
    assert f"delete {store.parts / 'featurevis'} to redo the stage" in message
    assert store.params("featurevis") == {**params, "store_dir": "stores"}  # the refusal changed nothing
    assert store.done("featurevis") == {"channel/conv1/00000-00002"}
    assert store.begin("dataset", {"topk": 4}) == set()  # each stage keeps its own settings


def test_done_and_units_list_the_finished_units_in_key_order(store):
    assert store.done("featurevis") == set() and store.params("featurevis") is None
    keys = ["negative/block.0@1/00000-00002", "channel/conv1/00002-00004", "channel/conv1/00000-00002"]
    store.begin("featurevis", {})
    for i, key in enumerate(keys):
        store.write_unit("featurevis", key, {"i": np.array([i])})
    folder = store.parts / "featurevis"
    assert len(list(folder.glob("*.h5"))) == 3  # one file per key in the stage's folder, "/" and "@" quoted
    (folder / ".channel%2Fconv1%2F00004-00006.h5.tmp123").write_bytes(b"left by a killed run")
    (folder / ".hidden.h5").write_bytes(b"")
    assert store.done("featurevis") == set(keys)  # hidden and temporary files are not units
    seen = [(key, int(f["i"][0])) for key, f in store.units("featurevis")]
    assert seen == sorted((key, keys.index(key)) for key in keys)
    assert store.begin("featurevis", {}) == set(keys)
    assert not (folder / ".channel%2Fconv1%2F00004-00006.h5.tmp123").exists()  # begin sweeps stale temporaries


def test_consolidation_writes_the_root_and_every_stage_with_parts(store):
    store.begin("dataset", {})
    store.write_unit("dataset", "00000-00002", {"x": np.array([1.0, 2.0])})
    calls = []

    def dataset(s: Store, f: h5py.File) -> None:
        calls.append("dataset")
        f["dataset/x"] = np.concatenate([part["x"][()] for _, part in s.units("dataset")])

    def featurevis(s: Store, f: h5py.File) -> None:
        calls.append("featurevis")

    def finalize(f: h5py.File) -> None:
        calls.append(("finalize", sorted(f)))

    (store.directory / ".tiny.h5.tmp999").write_bytes(b"left by a killed consolidation")
    path = store.consolidate({"featurevis": featurevis, "dataset": dataset}, finalize=finalize)
    assert path == store.path == store.directory / "tiny.h5"
    assert calls == ["dataset", ("finalize", ["classes", "dataset", "layers"])]  # no parts, no section
    assert not temporaries(store.directory)
    with open_store(path) as f:
        root = read_attrs(f)
        assert {k: root[k] for k in ("spec", "name", "weights_id", "input_size", "created")} == \
            {k: META[k] for k in ("spec", "name", "weights_id", "input_size", "created")}
        assert root["atlas_version"] == atlas.__version__ and root["store_format"] == STORE_FORMAT
        config = json.loads(f.attrs["config"])  # encoded once: one json.loads gives the dict
        assert isinstance(config, dict) and config == json_values(CONFIG.to_dict())
        assert root["config"] == config and root["config"]["store_dir"] == "stores"
        assert root["versions"] == {"torch": "2"} and root["preprocess"] == META["preprocess"]
        assert f["classes"].asstr()[()].tolist() == ["cat", "dog"]
        assert [(name, g.attrs["order"], g.attrs["channels"]) for name, g in f["layers"].items()] == \
            [("conv1", 0, 4), ("fc", 1, 2)]
        np.testing.assert_array_equal(f["dataset/x"][()], [1.0, 2.0])

    def broken(s: Store, f: h5py.File) -> None:
        f["dataset/x"] = np.zeros(1)
        raise RuntimeError("half-way")
    with pytest.raises(RuntimeError, match="half-way"):
        store.consolidate({"dataset": broken})
    with open_store(path) as f:  # the store readers see is the last whole one
        np.testing.assert_array_equal(f["dataset/x"][()], [1.0, 2.0])
    assert not temporaries(store.directory)


def test_open_refuses_another_model_or_format_and_merges_layers(store):
    with pytest.raises(AtlasError, match="holds spec 'atlas:tiny_convnet', not 'resnet50'"):
        store.open({**META, "spec": "resnet50"})
    with pytest.raises(AtlasError, match="holds weights_id 'seed 0', not 'other.pth'"):
        store.open({**META, "weights_id": "other.pth"})
    store.open({**META, "layers": [layer("conv2", 8), layer("conv1")]})  # another selection: layers are added
    assert [l["name"] for l in store.meta()["layers"]] == ["conv1", "fc", "conv2"]

    meta = store.parts / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "atlas_version": "0.0.1", "store_format": 1}))
    with pytest.raises(AtlasError) as refused:
        store.open(META)
    message = str(refused.value)
    assert "Atlas 0.0.1 (store format 1)" in message and f"Atlas {atlas.__version__} (format {STORE_FORMAT})" in message
    with pytest.raises(AtlasError, match=r"no store at .*; run `atlas build` first"):
        Store(store.directory, "nothing").meta()


def test_open_store_refuses_another_format_naming_both_versions(store, tmp_path):
    path = store.consolidate({})
    with h5py.File(path, "r+") as f:
        f.attrs["atlas_version"], f.attrs["store_format"] = "0.0.1", 1
    with pytest.raises(AtlasError) as refused:
        open_store(path)
    message = str(refused.value)
    assert "written by Atlas 0.0.1 (store format 1)" in message
    assert f"this Atlas {atlas.__version__} reads format {STORE_FORMAT}" in message
    with pytest.raises(AtlasError, match="no store file at"):
        open_store(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not HDF5")
    with pytest.raises(AtlasError, match=re.escape(f"{tmp_path / 'text.h5'} is not a readable HDF5 store")):
        open_store(tmp_path / "text.h5")


def test_info_summarizes_a_store(tmp_path, site_store, spec):
    text = summarize(site_store(tmp_path))
    lines = text.splitlines()
    assert lines[0].startswith(f"store      {tmp_path / 'tiny.h5'} (") and f"format {STORE_FORMAT})" in lines[0]
    assert "input      32 px, 20 classes" in lines
    assert f"dataset    {spec.N_IMAGES} images searched, {spec.N_IMAGES} explained, 1 skipped (synthetic)" in lines
    assert f"attribution {', '.join(sorted(spec.METHODS))}" in lines
    assert "above the completeness tolerance: integrated_gradients 3 images" in text  # every other image
    assert f"checks     {len(spec.METHODS)} methods on 3 images; insensitive to the weights: guided_backprop" in lines
    assert f"layers     {len(spec.LAYERS)}, {sum(c for _, c, _ in spec.LAYERS)} channels" in lines
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    rows = {line.split()[0]: line.split()[1:5] for line in lines[header + 1:]}  # channels, size, featurevis, topk
    assert list(rows) == [name for name, _, _ in spec.LAYERS]
    assert rows["conv1"] == ["6", "16x16", "6", "yes"] and rows["fc"] == ["4", "1x1", "0", "yes"]  # fc: no featurevis
