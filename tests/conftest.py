import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
ROOT = Path(__file__).resolve().parent.parent


def run_atlas(*args: str, cwd: Path, check: bool = False, **kw):
    """Runs the `atlas` command line in a subprocess, as a user would."""
    import subprocess
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "atlas", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"atlas {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.fixture
def tiny():
    from atlas import models
    return models.load("atlas:tiny_convnet")
