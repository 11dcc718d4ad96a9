"""The command line as a user meets it: one-line errors, listings, re-runs and refused settings.

Killing a build and resuming it is tested deterministically in test_faults.py.
"""

from pathlib import Path

import torch

TINY = ["--model", "atlas:tiny_convnet", "--workers", "0", "-q"]


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atlas: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_gives_one_line_errors(tmp_path: Path, run_atlas):
    store = ["--store-dir", str(tmp_path / "s")]
    assert_one_line_error(run_atlas("build", "--model", "resnet5000", *store, cwd=tmp_path), "unknown model")
    assert_one_line_error(run_atlas("featurevis", *TINY, *store, "--layers", "nope.*", cwd=tmp_path),
                          "matches no layer", "closest")
    assert_one_line_error(run_atlas("build", *TINY, *store, "--weights", "missing.pth", cwd=tmp_path),
                          "weights file not found")
    torch.save(torch.nn.Conv2d(1, 1, 1).state_dict(), tmp_path / "other.pth")
    assert_one_line_error(run_atlas("build", *TINY, *store, "--weights", "other.pth", cwd=tmp_path),
                          "do not fit")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_atlas("dataset", *TINY, *store, "--data", "empty", cwd=tmp_path),
                          "no image files")
    assert_one_line_error(run_atlas("info", "nothing.h5", cwd=tmp_path), "no store file")
    assert_one_line_error(run_atlas("build", *TINY, *store, "--steps", "0", cwd=tmp_path), "positive")


def test_layers_command_lists_shapes_and_selection(tmp_path, run_atlas):
    proc = run_atlas("layers", "atlas:tiny_convnet", cwd=tmp_path, check=True)
    lines = proc.stdout.splitlines()
    assert any(l.startswith("* relu2 ") and "16  16x16" in l for l in lines)  # conv2 as passed on, after its ReLU
    assert any(l.startswith("  conv2 ") for l in lines) and any(l.startswith("  block.relu@1 ") for l in lines)
    assert "default selection: 5 layers, 72 channels" in lines[-1]


def test_rerun_is_a_no_op_and_changed_settings_are_refused(tmp_path, run_atlas):
    store = ["--store-dir", str(tmp_path / "s")]
    args = ["featurevis", *TINY, *store, "--steps", "3", "--size", "16", "--layers", "conv1"]
    run_atlas(*args, cwd=tmp_path, check=True)
    parts = tmp_path / "s" / "atlas-tiny_convnet.parts" / "featurevis"
    stamp = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.h5")}
    run_atlas(*args, cwd=tmp_path, check=True)
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.h5")} == stamp
    changed = [a if a != "3" else "5" for a in args]
    assert_one_line_error(run_atlas(*changed, cwd=tmp_path), "other settings", "fv_steps: 3 -> 5")
