"""Store pruning: old snapshots per key, then packs no remaining snapshot references.

A pack younger than GRACE_SECONDS is never deleted even if unreferenced: a concurrent
save writes its packs before its manifest, and must not lose them in between.
"""
from __future__ import annotations

import contextlib
import time

from ..errors import StoreError, FormatError
from . import repo

GRACE_SECONDS = 3600


def prune(store, keep: int = 1, dry_run: bool = False, grace_seconds: int = GRACE_SECONDS) -> dict:
    """Holds the store lock exclusively: a save in progress (shared lock) may be about to
    reference packs of the snapshots deleted here."""
    lock = store.lock(exclusive=True) if hasattr(store, "lock") and not dry_run else contextlib.nullcontext()
    with lock:
        return _prune(store, keep, dry_run, grace_seconds)


def _prune(store, keep: int, dry_run: bool, grace_seconds: int) -> dict:
    by_key: dict[str, list[str]] = {}
    for name, key, _created in repo.list_snapshots(store):
        by_key.setdefault(key, []).append(name)
    doomed = [n for names in by_key.values() for n in names[keep:]]
    kept = [n for names in by_key.values() for n in names[:keep]]
    referenced: set[str] = set()
    for name in kept:
        try:
            m = repo.read_manifest(store, name)
        except (StoreError, FormatError) as e:
            raise StoreError(f"cannot prune: snapshot {name} is unreadable ({e}); fix or delete it first") from None
        referenced.update(loc[0] for loc in m.blobs.values())
    now = time.time()
    dead_packs = [(n, size) for n, size, mtime in store.stat_all("packs/")
                  if n.rsplit("/", 1)[-1] not in referenced and now - mtime > grace_seconds]
    if not dry_run:
        for name in doomed:
            store.delete(name)
        for name, _size in dead_packs:
            store.delete(name)
    return {"snapshots_deleted": len(doomed), "snapshots_kept": len(kept), "packs_deleted": len(dead_packs),
            "bytes_freed": sum(s for _n, s in dead_packs), "dry_run": dry_run}
