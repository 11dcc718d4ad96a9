"""The architecture, checked: the import contracts of pyproject.toml ([tool.importlinter],
explained in docs/architecture.md), module sizes, and the package layout."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "atlas"
MAX_LINES = 400

# the top level of the package: change this together with docs/architecture.md
TOP_LEVEL = {
    "__init__.py", "__main__.py", "cli.py", "config.py", "pipeline.py", "preflight.py", "distributed.py",
    "devices.py", "errors.py", "layers.py", "layouts.py", "fused.py",
    "models/", "store/", "featurevis/", "dataset/", "attribution/", "site/", "compare/", "bench/", "testing/",
}


def _python_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / ("lint-imports.exe" if os.name == "nt" else "lint-imports")
    assert lint.exists(), f"{lint} not found: install the test extras (pip install -e '.[test]')"
    # run from the repository root: lint-imports reads pyproject.toml there and imports atlas from there
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr
    if proc.returncode != 0 or not re.search(r"Contracts: \d+ kept, 0 broken", report):
        pytest.fail(f"import contracts not kept (pyproject.toml [tool.importlinter]):\n{report}", pytrace=False)


def test_every_package_directory_has_an_init():
    # a folder without __init__.py is a namespace package, which lint-imports does not see
    missing = [str(d.relative_to(ROOT)) for d in sorted({p.parent for p in _python_files()})
               if not (d / "__init__.py").exists()]
    assert not missing, f"no __init__.py in: {', '.join(missing)}"


def test_no_module_is_too_long():
    long = {}
    for path in _python_files():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[str(path.relative_to(ROOT))] = n
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_top_level_layout():
    found = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert found == TOP_LEVEL, (f"atlas/ layout changed: unexpected {sorted(found - TOP_LEVEL)}, "
                                f"missing {sorted(TOP_LEVEL - found)}; update docs/architecture.md, "
                                "the contracts in pyproject.toml and this test together")
