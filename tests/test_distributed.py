"""torchrun: two CPU ranks build the same store as one process."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atlas.distributed import Ranks, from_env
from atlas.errors import AtlasError

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"  # it comes with torch
ARGS = ["--model", "atlas:tiny_convnet", "--steps", "4", "--size", "32", "--topk", "4", "--workers", "0", "-q",
        "--device", "cpu", "--data-unit", "4", "--fv-batch", "2",
        "--methods", "gradient,smoothgrad,vargrad,integrated_gradients,grad_cam"]
STORE = "atlas-tiny_convnet.h5"


def build(cwd: Path, store: str, *extra: str, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "atlas"] if ranks == 1 else \
        [TORCHRUN, "--standalone", "--nproc-per-node", str(ranks), "-m", "atlas"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    # one thread, as torchrun gives each rank: a convolution sums in another order with another thread
    # count, and the adaptive IG rule's interval errors (differences of nearby logits) carry that through
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*command, "build", *ARGS, "--data", "images", "--store-dir", store,
                           "--out", f"site-{store}", *extra], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_two_ranks_build_the_single_process_store(tmp_path, make_images, store_arrays):
    make_images(tmp_path / "images", 20)  # 20 images and 2 bad files: 6 dataset units of 4
    one = build(tmp_path, "one")
    assert one.returncode == 0, one.stderr
    two = build(tmp_path, "two", ranks=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("store: ") == 1  # rank 0 reports; the other rank is quiet
    a, b = store_arrays(tmp_path / "one" / STORE), store_arrays(tmp_path / "two" / STORE)
    assert set(a) == set(b)
    assert any(k.endswith("featurevis/channel") for k in a) and "attribution/vargrad/maps" in a
    assert "checks/grad_cam/randomization/cascading/spearman" in a and "layers/relu2/unit_attribution/maps" in a
    for key in a:  # bit for bit: a unit's result does not depend on the rank that computed it
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    parts = tmp_path / "two" / "atlas-tiny_convnet.parts"
    assert len(list((parts / "dataset").glob("images%2F*.h5"))) == 6  # the bookkeeping of each range
    assert len(list((parts / "dataset").glob("summary%2F*.h5"))) == 2  # one running summary per rank
    assert (tmp_path / "site-two" / "index.html").is_file()

    # a refused setting stops every rank with the same one-line error, none waits forever
    refused = build(tmp_path, "two", "--steps", "5", ranks=2, timeout=120)
    assert refused.returncode != 0
    assert "other settings" in refused.stderr and "fv_steps: 4 -> 5" in refused.stderr
    assert refused.stderr.count("atlas: error: ") == 2  # each rank's one line; torchrun then reports the exit
    assert not re.search(r'File "[^"]*/atlas/[^"]*\.py"', refused.stderr)  # no traceback from Atlas itself


def test_ranks_share_units_round_robin():
    units = list(range(10))
    shares = [Ranks(r, 3).shard(units) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shares, [])) == units
    assert Ranks().shard(units) == units and Ranks().main


def test_a_malformed_torchrun_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(AtlasError, match="malformed torchrun environment"):
        from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(AtlasError, match="malformed"):
        from_env()
