"""Publishing a rendered site to GitHub Pages, without touching the working tree.

Two ways GitHub Pages can serve a site:

* `gh-pages`: the site's files become the root of a `gh-pages` branch. The
  commit is built with a temporary index file and git's plumbing (`add` with
  the site as work tree, `write-tree`, `commit-tree`, `update-ref`), so the
  user's working tree, index and current branch are never touched. Each
  publish adds one commit on top of the branch's previous one.
* `docs`: the site is copied into the repository's `docs/` folder, to commit
  with the rest of the project.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from atlas.errors import AtlasError

BRANCH = "gh-pages"
MARKER = ".atlas-site"  # marks a docs/ folder that holds a published site, safe to replace


def publish(site_dir: str | Path, mode: str = "gh-pages", repo: str | Path = ".",
            message: str = "Publish the atlas site") -> str:
    """Publishes `site_dir` for GitHub Pages.

    Args:
        site_dir: a rendered site (holds index.html).
        mode: "gh-pages" commits the site as the root of the gh-pages branch;
            "docs" copies it into `repo/docs/`.
        repo: the git repository (any folder inside it).
        message: the commit message (gh-pages mode).

    Returns:
        The new commit's id (gh-pages), or the docs folder's path (docs).

    Raises:
        AtlasError: no site, not a git repository, an unknown mode, or a docs/
            folder that holds something other than a published site.
    """
    site = Path(site_dir).resolve()
    if not (site / "index.html").is_file():
        raise AtlasError(f"{site} holds no index.html: render the site first (atlas render STORE --out {site})")
    top = Path(_git(["rev-parse", "--show-toplevel"], Path(repo)).strip())
    if mode == "gh-pages":
        return _commit_branch(site, top, message)
    if mode == "docs":
        return str(_copy_docs(site, top / "docs"))
    raise AtlasError(f"unknown publish mode {mode!r}: use 'gh-pages' or 'docs'")


def _git(args: list[str], cwd: Path, env: dict | None = None) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise AtlasError("git is not installed; install it to publish the site") from None
    if proc.returncode != 0:
        raise AtlasError(f"git {' '.join(args[:2])} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


def _commit_branch(site: Path, top: Path, message: str) -> str:
    """Commits the site's files as the tree of the gh-pages branch, through a temporary index."""
    with tempfile.TemporaryDirectory(prefix="atlas-publish-") as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        tree_git = ["--work-tree", str(site)]
        _git([*tree_git, "add", "--all", "--force", "."], top, env)
        tree = _git(["write-tree"], top, env).strip()
    parent = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{BRANCH}^{{commit}}"],
                            cwd=top, capture_output=True, text=True).stdout.strip()
    if parent and _git(["rev-parse", f"{parent}^{{tree}}"], top).strip() == tree:
        return parent  # nothing changed since the last publish
    commit = _git(["commit-tree", tree, "-m", message, *(["-p", parent] if parent else [])], top).strip()
    _git(["update-ref", f"refs/heads/{BRANCH}", commit, *([parent] if parent else [])], top)
    return commit


def _copy_docs(site: Path, docs: Path) -> Path:
    """Replaces `docs` by a copy of the site, if it is absent, empty or an earlier copy."""
    if docs.exists() and any(docs.iterdir()) and not (docs / MARKER).is_file():
        raise AtlasError(f"{docs} already holds other files; move them, or publish with mode 'gh-pages'")
    tmp = docs.with_name(f".{docs.name}.publishing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(site, tmp)
    (tmp / MARKER).write_text("This folder is a copy of a rendered Atlas site; publishing replaces it.\n")
    if docs.exists():
        shutil.rmtree(docs)
    os.replace(tmp, docs)
    return docs
