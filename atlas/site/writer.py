"""Writing the site's files: atomic, only when changed, counted by part of the site."""

from __future__ import annotations

import os
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import jinja2
from tqdm import tqdm

from atlas.errors import AtlasError
from atlas.site.checks import STRIPS


class SiteWriter:
    """Writes files under one folder, counting pages and bytes per part of the site.

    Pictures can be encoded on worker threads (`write_later`): the image codecs
    release the GIL, so on a 2-core machine the site's AVIF encoding, most of its
    time, runs beside the page rendering. `wait` collects them.
    """

    PENDING_PER_WORKER = 8  # encodings queued ahead per worker: bounds the pixels held in memory

    def __init__(self, base: Path, env: jinja2.Environment, depth: int, search: list[str],
                 bar: tqdm | None = None):
        """
        Args:
            base: the folder written into.
            env: the jinja2 environment.
            depth: how many folders `base` lies below the site root.
            search: the search indexes every page loads, relative to the site root.
            bar: progress bar advanced once per page.
        """
        self.base, self.env, self.depth, self.search, self.bar = base, env, depth, search, bar
        self.bytes: Counter[str] = Counter()
        self.pages = self.changed = 0
        self.kept: set[str] = set()  # every file written or found identical
        self._folders: set[Path] = set()
        self._lock = threading.Lock()
        self._workers = max(1, min(4, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def path(self, rel: str) -> Path:
        """The file for a relative path; refuses anything that could leave `base`."""
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise AtlasError(f"refusing to write {rel!r}: not a plain relative path inside {self.base}")
        return self.base.joinpath(*parts)

    def write(self, rel: str, data: bytes, part: str) -> None:
        """Writes bytes to `rel`, counted under `part` (html, featurevis, ...).

        A file that already holds exactly `data` is left alone (its mtime too);
        any other is replaced atomically.
        """
        path = self.path(rel)
        with self._lock:
            self.bytes[part] += len(data)
            self.kept.add(rel)
        try:
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                return
        except OSError:
            pass  # not there yet
        if path.parent not in self._folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._folders.add(path.parent)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        with self._lock:
            self.changed += 1

    def write_later(self, rel: str, make: Callable[[], bytes], part: str) -> None:
        """Writes `make()` to `rel` as `write` does, computed on a worker thread; `wait` before
        reading the counts. The oldest pending files are finished first once too many are queued."""
        self.path(rel)  # refuse a bad path now, not on the worker
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="site-encode")
        while len(self._pending) >= self._workers * self.PENDING_PER_WORKER:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(lambda: self.write(rel, make(), part)))

    def wait(self) -> None:
        """Finishes every file given to `write_later`; raises the first error one met."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            for f in self._pending:
                f.cancel()
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def remove_others(self, keep: str | None = None) -> int:
        """Deletes every file under `base` that this writer did not write, except under the folder
        `keep`; returns how many."""
        removed = 0
        for path in sorted(self.base.rglob("*"), reverse=True):
            rel = path.relative_to(self.base).as_posix()
            if keep is not None and (rel == keep or rel.startswith(f"{keep}/")):
                continue
            if path.is_file() and rel not in self.kept:
                path.unlink()
                removed += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        return removed

    def page(self, rel: str, template: str, **context: object) -> None:
        """Renders `template` to `rel`, giving it `root`, the relative path up to the site root."""
        context.setdefault("root", "../" * (rel.count("/") + self.depth))
        context.setdefault("search", self.search)
        html = self.env.get_template(template).render(**context)
        self.write(rel, html.encode(), "html")
        self.pages += 1
        if self.bar is not None:
            self.bar.update()


def site_part(rel: str) -> str:
    """Which part of the site a file belongs to, from its path relative to the site root."""
    parts = rel.split("/")
    name = parts[-1]
    if parts[0] == "static":
        return "static"
    if name.endswith((".html", ".json")):
        return "html"
    if len(parts) == 1:
        return "static"
    if name == "search.js":
        return "search"
    if len(parts) == 3 and parts[1] == "images":
        return "dataset" if name.endswith(".jpg") else "attributions"
    if name.split(".")[0].endswith("-attribution") or name.startswith(f"{STRIPS}."):
        return "attributions"  # a unit's attribution maps, the checks page's randomization strips
    if name.startswith(("sprite-", "preview.")):
        return "sprites"
    if name.split(".")[0].endswith("-examples"):
        return "examples"  # a unit's dataset-example crops
    return "featurevis"


def site_sizes(site_dir: str | Path) -> dict[str, int]:
    """Bytes per part of everything in the site folder (html, featurevis, sprites, ...)."""
    return folder_bytes(Path(site_dir))


def folder_bytes(site_dir: Path, skip: str | None = None) -> dict[str, int]:
    """Bytes per part of the site folder, leaving out the top-level folder `skip`."""
    sizes: Counter[str] = Counter()
    for folder, dirs, files in os.walk(site_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (folder == str(site_dir) and d == skip)]
        rel = Path(folder).relative_to(site_dir).as_posix()
        for name in files:
            sizes[site_part(name if rel == "." else f"{rel}/{name}")] += os.path.getsize(os.path.join(folder, name))
    return dict(sorted(sizes.items()))


def size_table(sizes: dict[str, int]) -> str:
    """The size of each part of a site and the total, one line each."""
    lines = [f"  {part:13s} {n / 1e6:10.1f} MB" for part, n in sizes.items()]
    return "\n".join(["site size:", *lines, f"  {'total':13s} {sum(sizes.values()) / 1e6:10.1f} MB"])
