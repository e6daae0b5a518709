"""How much a station keeps on disk, and what it deletes first.

Images (and their heatmaps) go oldest first: older than ``keep_days``, then as many more
as it takes to bring the store under ``max_store_gb`` (to 90% of it, so a full store is
not swept after every image). Their result rows stay, marked ``purged``: the record of
what was scored, when, by which version and with what verdict outlives the pixels.

Model versions the station wrote itself (under ``<store>/models``) beyond the newest
``keep_versions`` are deleted unless pinned or being served; the model file the station
was started with is never deleted (it is pinned when loaded).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from defectscope.errors import ConfigError
from defectscope.serve.store import Result, ResultStore, outline_name

log = logging.getLogger("defectscope")
GB = 2**30


@dataclass(frozen=True)
class Retention:
    """What a station keeps: ``None`` keeps everything of that kind."""

    keep_days: float | None = None
    max_store_gb: float | None = None
    keep_versions: int = 10

    def __post_init__(self) -> None:
        if self.keep_days is not None and not self.keep_days > 0:
            raise ConfigError(f"--keep-days must be above 0, got {self.keep_days}.")
        if self.max_store_gb is not None and not self.max_store_gb > 0:
            raise ConfigError(f"--max-store-gb must be above 0, got {self.max_store_gb}.")
        if self.keep_versions < 1:
            raise ConfigError(f"--keep-versions must be at least 1, got {self.keep_versions}.")


def folder_bytes(root: Path) -> int:
    """Bytes in the files under ``root`` (the store: database, images, model versions)."""
    total = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
    return total


def purge_images(store: ResultStore, rule: Retention, *, now: float | None = None) -> int:
    """Delete the images the rule no longer keeps, oldest first; returns how many results
    lost their image."""
    now = time.time() if now is None else now
    purged = 0
    if rule.keep_days is not None:
        while batch := store.oldest_images(before=now - rule.keep_days * 86400):
            purged += len(batch)
            _delete(store, batch)
    if rule.max_store_gb is not None:
        limit = rule.max_store_gb * GB
        size = folder_bytes(store.root)
        if size > limit:
            while size > 0.9 * limit and (batch := store.oldest_images(limit=200)):
                chosen, freed = [], 0
                for r in batch:
                    if size - freed <= 0.9 * limit:
                        break
                    chosen.append(r)
                    freed += _bytes(store, r)
                _delete(store, chosen)
                purged, size = purged + len(chosen), size - freed
            if size > limit:
                log.warning("The store %s holds %.2f GB with every image deleted (database and model versions); "
                            "raise --max-store-gb or lower --keep-versions.", store.root, size / GB)
    return purged


def _files(store: ResultStore, r: Result) -> list[Path]:
    """An image, its heatmap and its outline (where one was drawn)."""
    return [store.root / name for name in dict.fromkeys((r.image_file, r.heatmap_file, outline_name(r.id)))]


def _bytes(store: ResultStore, r: Result) -> int:
    return sum(p.stat().st_size for p in _files(store, r) if p.is_file())


def _delete(store: ResultStore, results: list[Result]) -> None:
    """Delete these results' image, heatmap and outline files and mark them purged (rows kept)."""
    for r in results:
        for path in _files(store, r):
            path.unlink(missing_ok=True)
    store.mark_purged([r.id for r in results])


def prune_versions(store: ResultStore, rule: Retention, models_dir: Path, serving: set[str]) -> list[str]:
    """Delete station-written model versions beyond the newest ``keep_versions`` unpinned
    ones (pinned ones are kept besides; never the one being served or a file outside
    ``models_dir``); returns their ids."""
    unpinned = [v for v in store.versions() if v.pruned is None and not v.pinned and Path(v.path).parent == models_dir]
    pruned = []
    for v in unpinned[: max(0, len(unpinned) - rule.keep_versions)]:
        if v.version in serving:
            continue
        Path(v.path).unlink(missing_ok=True)
        store.mark_pruned(v.version)
        pruned.append(v.version)
    return pruned
