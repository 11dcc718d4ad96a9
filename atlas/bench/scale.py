"""Scale-out benchmark: the same build by one torchrun rank and by two, then a kill and a resume.

* Work: a full `atlas build` of the default model (feature visualization,
  dataset examples, attributions with their unit attributions and checks, the
  site) restricted to a few layers and methods so that one rank takes about a
  minute on a CPU core. Both runs go through torchrun with one thread per rank
  (OMP_NUM_THREADS=1), and their wall time includes starting the processes
  and loading the model, as a user waits for them.
* speedup_2_ranks: the time of the one-rank build divided by the two-rank
  build's. The two stores are compared dataset by dataset.
* resume_lost_units: a third two-rank build is killed (SIGKILL to every
  process) once about half of its work units are on disk, then the same
  command runs again. A unit lost to the kill is one that had been finished
  and written before the kill but is computed again by the re-run (its part
  file replaced); the units in flight at the kill were not finished and do not
  count. The resumed store is compared with the uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from atlas.errors import AtlasError

LAYERS = "blocks.1.?,blocks.3.?"  # two and three block outputs: 48 + 240 channels of EfficientNet-Lite0
METHODS = "gradient,smoothgrad,integrated_gradients,grad_cam"
ARGS = ["--layers", LAYERS, "--methods", METHODS, "--fv-batch", "16", "--data-unit", "4", "--device", "cpu",
        "--workers", "0", "-q"]
STORE = "efficientnet_lite0"


def _torchrun() -> str:
    path = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if path is None:
        raise AtlasError("torchrun is not installed (it comes with torch)")
    return path


def _command(folder: Path, ranks: int) -> list[str]:
    return [_torchrun(), "--standalone", "--nproc-per-node", str(ranks), "-m", "atlas", "build", *ARGS,
            "--store-dir", str(folder / "store"), "--out", str(folder / "site")]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _run(folder: Path, ranks: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(_command(folder, ranks), env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AtlasError(f"the {ranks}-rank build failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def _parts(folder: Path) -> dict[str, int]:
    """Every finished unit's part file and its inode (a rewrite gives a new one)."""
    root = folder / "store" / f"{STORE}.parts"
    return {str(p.relative_to(root)): p.stat().st_ino for p in root.glob("*/*.h5") if not p.name.startswith(".")}


def _same_store(a: Path, b: Path) -> bool:
    """Whether two consolidated stores hold the same datasets with the same values."""
    def arrays(path: Path) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with h5py.File(path / "store" / f"{STORE}.h5", "r") as f:
            f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return out
    x, y = arrays(a), arrays(b)
    return set(x) == set(y) and all(np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f") for k in x)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): torchrun starts each rank in a session of its own,
    so killing torchrun's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_midway(folder: Path, total: int) -> dict[str, int]:
    """Starts a two-rank build, kills every process of it at once when half the units are written
    (a machine that loses power); returns the parts left on disk."""
    proc = subprocess.Popen(_command(folder, 2), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while len(_parts(folder)) < total // 2 and proc.poll() is None:
            time.sleep(0.02)
    finally:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    time.sleep(0.5)  # the killed ranks' files are closed by the kernel
    return _parts(folder)


def run() -> dict:
    """Times one rank and two ranks on the same build, then kills and resumes a third.

    Returns:
        speedup_2_ranks, resume_lost_units, the seconds of each build, whether the
        stores equal each other, and how many units the kill left on disk.
    """
    with tempfile.TemporaryDirectory(prefix="atlas-bench-scale-") as tmp:
        tmp = Path(tmp)
        one = _run(tmp / "one", 1)
        two = _run(tmp / "two", 2)
        total = len(_parts(tmp / "two"))
        before = _kill_midway(tmp / "killed", total)
        resumed = _run(tmp / "killed", 2)
        after = _parts(tmp / "killed")
        lost = sum(1 for key, inode in before.items() if after.get(key) != inode)
        out = {"speedup_2_ranks": one / two, "resume_lost_units": lost, "one_rank_s": round(one, 1),
               "two_ranks_s": round(two, 1), "resume_s": round(resumed, 1), "units": total,
               "units_kept_at_kill": len(before), "equal_1_2": _same_store(tmp / "one", tmp / "two"),
               "equal_resumed": _same_store(tmp / "two", tmp / "killed")}
    print(f"  one rank {out['one_rank_s']} s, two ranks {out['two_ranks_s']} s ({out['units']} work units); "
          f"stores equal: {out['equal_1_2']}")
    print(f"  killed with {out['units_kept_at_kill']} units on disk; the re-run took {out['resume_s']} s, "
          f"recomputed {lost} finished units; resumed store equals the uninterrupted one: {out['equal_resumed']}")
    return out
