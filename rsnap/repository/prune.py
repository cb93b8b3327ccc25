"""Store pruning: snapshots by policy, then the packs no remaining snapshot references.

Policies (all optional, combined): keep the `keep` most recently used snapshots per key;
drop snapshots not used for `older_than` seconds; drop the least recently used snapshots
until what the rest reference (packs + manifests) fits in `max_size` bytes. With `older_than`,
compile-cache entries (cache/) older than that go too. "Use" is the manifest's mtime on the
store's clock (upload time on S3, which cannot change LastModified without rewriting the
object), never the saving machine's clock. Restore does not record uses (it leaves the store
untouched), so today "use" is creation; touching a manifest (`store.touch`) marks a use.

A pack is deleted only when no kept snapshot references it and it is older than the grace
period (`grace_seconds`, default 1 h, RSNAP_PRUNE_GRACE), measured on the store's clock
(`store.now()`: for S3 the server's, from its LastModified): a save in progress uploads its
packs before its manifest, and a save whose lock went stale must not lose them. Prune holds
the store lock exclusively (flock, or lock objects with a lease), checks the lease before each
batch of deletes, and keeps the packs of manifests that appeared after it listed the snapshots
(docs/design.md, "Remote stores").
"""
from __future__ import annotations

import os

from .. import faults
from ..errors import FormatError, NotFoundError, StoreError
from ..store.base import NO_LOCK
from . import manifest as mf, repo

GRACE_SECONDS = 3600


def grace_default() -> float:
    try:
        return float(os.environ.get("RSNAP_PRUNE_GRACE", GRACE_SECONDS))
    except ValueError:
        return GRACE_SECONDS


def prune(store, keep: int | None = 1, dry_run: bool = False, grace_seconds: float | None = None,
          older_than: float | None = None, max_size: int | None = None) -> dict:
    """Holds the store lock exclusively: a save in progress (shared lock) may be about to
    reference packs of the snapshots deleted here."""
    lock = NO_LOCK if dry_run else store.lock(exclusive=True)
    with lock as held:
        return _prune(store, keep, dry_run, grace_default() if grace_seconds is None else grace_seconds,
                      older_than, max_size, held)


def _prune(store, keep, dry_run, grace_seconds, older_than, max_size, held) -> dict:
    now = store.now()
    snaps = []  # (name, key, last use in s on the store's clock, manifest bytes), most recent first
    for name, key, stored_ns, size in repo.stat_snapshots(store):
        snaps.append((name, key, stored_ns / 1e9, size))
    doomed: dict[str, str] = {}
    per_key: dict[str, int] = {}
    for name, key, used, _size in snaps:
        per_key[key] = per_key.get(key, 0) + 1
        if keep is not None and per_key[key] > keep:
            doomed[name] = f"more than {keep} for its key"
        elif older_than is not None and now - used > older_than:
            doomed[name] = f"unused for {(now - used) / 86400:.1f} days"
    kept = [s for s in snaps if s[0] not in doomed]
    tables = _blob_tables(store, [s[0] for s in kept])
    pack_sizes = {n.rsplit("/", 1)[-1]: (size, mtime) for n, size, mtime in store.stat_all("packs/")}
    referenced: set[str] = set()
    total = 0
    for name, _key, _used, msize in kept:       # most recently used first
        packs = {loc[0] for loc in tables[name].values()}
        extra = msize + sum(pack_sizes.get(p, (0, 0))[0] for p in packs - referenced)
        if max_size is not None and total + extra > max_size:
            doomed[name] = "over --max-size"
            continue
        total += extra
        referenced |= packs
    dead_packs = [(repo.pack_name(p), size) for p, (size, mtime) in pack_sizes.items()
                  if p not in referenced and now - mtime > grace_seconds]
    # compile-cache entries (cache/): by age only (S3 records no use; a local tier evicts by LRU)
    dead_cache = [] if older_than is None else \
        [(n, size) for n, size, mtime in store.stat_all("cache/") if now - mtime > older_than]
    removed = [{"snapshot": s[0], "key": s[1], "bytes": s[3], "reason": doomed[s[0]]} for s in snaps if s[0] in doomed]
    if not dry_run:
        _delete_in_batches(store, held, [r["snapshot"] for r in removed])   # manifests first, then packs
        faults.point("prune.packs")
        unseen = _unseen_references(store, {s[0] for s in snaps})
        dead_packs = [(n, size) for n, size in dead_packs if n.rsplit("/", 1)[-1] not in unseen]
        _delete_in_batches(store, held, [n for n, _s in dead_packs] + [n for n, _s in dead_cache])
    return {"store": store.url, "snapshots_deleted": len(removed), "snapshots_kept": len(snaps) - len(removed),
            "packs_deleted": len(dead_packs), "packs_kept": len(pack_sizes) - len(dead_packs),
            "cache_entries_deleted": len(dead_cache),
            "bytes_freed": sum(s for _n, s in dead_packs + dead_cache) + sum(r["bytes"] for r in removed),
            "bytes_kept": total, "removed": removed, "grace_seconds": grace_seconds, "dry_run": dry_run}


DELETE_BATCH = 200      # objects deleted between two checks of the lease


def _delete_in_batches(store, held, names: list[str]) -> None:
    """The lease is checked (refreshed, on the server's clock) before each batch: a prune that
    was stopped or cut off longer than its lease allows deletes nothing more."""
    for i in range(0, len(names), DELETE_BATCH):
        held.check()
        store.delete_many(names[i:i + DELETE_BATCH])


def _unseen_references(store, seen: set[str]) -> set[str]:
    """Packs referenced by manifests that appeared since prune listed the snapshots (a save
    whose lock prune called stale, or one that does not lock): those packs stay."""
    new = [name for name, _key, _order in repo.list_snapshots(store) if name not in seen]
    packs: set[str] = set()
    for name in new:
        try:
            packs |= {loc[0] for loc in mf.loads_blob_tables(store.get(name))[0].values()}
        except NotFoundError:
            continue            # written and withdrawn again (a save that lost its lease)
        except (StoreError, FormatError) as e:
            raise StoreError(f"cannot prune: snapshot {name} appeared and is unreadable ({e}); "
                             "no pack deleted") from None
    return packs


def _blob_tables(store, names: list[str]) -> dict[str, dict]:
    """name -> blobs table of each manifest (fetched in parallel from a remote store)."""
    raw = store.get_many(names)
    out = {}
    for name in names:
        try:
            out[name] = mf.loads_blob_tables(raw[name])[0]
        except (StoreError, FormatError) as e:
            raise StoreError(f"cannot prune: snapshot {name} is unreadable ({e}); fix or delete it first") from None
    return out


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' (or plain seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise ValueError(f"invalid duration {text!r} (e.g. 90s, 30m, 12h, 7d, 2w)") from None
