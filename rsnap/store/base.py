"""The backend interface every store implements, its capabilities, and the object names it accepts.

A backend is a flat key/value object space ("snapshots/…", "packs/…", "cache/…"). Like
sccache's storage trait it knows nothing about snapshots: it only moves named objects,
and every `put` is atomic (readers see the old object, the new one, or none). The
repository (rsnap.repository) and the compile cache are written against this interface and
never ask a backend what it has by attribute name: what differs between backends is data
(`capabilities`, `remote_store`) or a method with a default here.

A backend subclasses Backend and implements exists, size, get, get_range, put, delete,
touch, list and stat_all (or, without LIST, `newest`). Errors are StoreError subclasses
(rsnap.errors): NotFoundError, PermanentStoreError, TransientStoreError.
"""
from __future__ import annotations

import re
import time
from typing import NamedTuple

from ..errors import PermanentStoreError, StoreError

_NAME = re.compile(r"^[A-Za-z0-9._@=+-]+(/[A-Za-z0-9._@=+-]+)*$")


def check_name(name: str) -> str:
    if not _NAME.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise StoreError(f"invalid object name {name!r}")
    return name


class Capabilities(NamedTuple):
    """What a backend can do; the layers above read this, never probe methods.

    list: `list`/`stat_all` work (else only `newest`). delete: objects can be removed.
    lock: the backend has its own lock (`lock` overridden, e.g. flock); without it the lock
    layer (rsnap.store.lock) uses lock objects, which need list and delete, or refuses.
    conditional_create: `put_if_absent` is an atomic create-only.
    ranged_reads: `get_range` reads only the range (else it fetches the object).
    connections: requests worth having in flight at once (1: serial)."""
    list: bool = True
    delete: bool = True
    lock: bool = False
    conditional_create: bool = False
    ranged_reads: bool = True
    connections: int = 1


class HeldLock:
    """What `lock()` yields. `check()` raises StoreError if the lock may have been lost;
    save calls it before its manifest (the commit), prune before its deletes."""

    def check(self) -> None:
        pass

    def time_left(self) -> float | None:
        """Seconds the lock surely stays ours (a deadline for the save's manifest PUT); None:
        held until released (a flock)."""
        return None


class _NoLock:
    def __enter__(self) -> HeldLock:
        return HeldLock()

    def __exit__(self, *exc) -> None:
        return None


NO_LOCK = _NoLock()     # e.g. a dry-run prune: `with NO_LOCK as held: held.check()` works


class Backend:
    """What the repository needs from a store. `url` names the store in messages and JSON.

    `remote_store`: objects cross a network; a restore that fails on it is a miss (exit 0),
    and the compile cache works in a local tier in front of it (rsnap.store.cache_sync)."""

    url: str
    capabilities: Capabilities = Capabilities()
    remote_store: bool = False
    clock_offset: float = 0.0   # the store's clock minus ours, once the lock layer measured it
    traffic: dict | None = None  # entries and bytes moved, for a store that counts them (gha)

    # -- every backend -------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        """Size in bytes, None if the object is missing."""
        raise NotImplementedError

    def get(self, name: str) -> bytes:
        """The whole object; NotFoundError if it is missing, StoreError if unreadable."""
        raise NotImplementedError

    def get_range(self, name: str, offset: int, length: int):
        """`length` bytes from `offset` (bytes or a memoryview); StoreError if truncated."""
        raise NotImplementedError

    def put(self, name: str, data: bytes) -> None:
        """Atomically create or replace an object."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove an object; a missing one is not an error."""
        raise NotImplementedError

    def touch(self, name: str) -> None:
        """Mark an object as recently used (LRU of the compile cache); may be a no-op."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Sorted names of the objects whose name starts with `prefix` (capabilities.list)."""
        raise NotImplementedError

    def stat_all(self, prefix: str = "") -> list[tuple[str, int, float]]:
        """(name, size, mtime in seconds) of the objects under `prefix` (capabilities.list)."""
        raise NotImplementedError

    # -- defaults a backend may override -------------------------------------------------
    def newest(self, prefix: str) -> str | None:
        """The most recently written object under `prefix`, for backends without LIST
        (which override this); here: from stat_all."""
        entries = self.stat_all(prefix)
        return max(entries, key=lambda e: (e[2], e[0]))[0] if entries else None

    def missing(self, names) -> list[str]:
        """Those of `names` not in the store (a save re-checks its reused packs with this)."""
        names = list(names)
        return [n for n, ok in zip(names, self.map_parallel(self.exists, names)) if not ok]

    def get_many(self, names) -> dict[str, bytes]:
        """Whole objects, `capabilities.connections` requests in flight; raises the first error."""
        names = list(names)
        return dict(zip(names, self.map_parallel(self.get, names)))

    def put_many(self, items) -> None:
        """(name, data) pairs, `capabilities.connections` uploads in flight; raises the first error."""
        self.map_parallel(lambda kv: self.put(*kv), list(items))

    def put_within(self, name: str, data: bytes, seconds: float | None) -> None:
        """`put`, but no attempt starts or runs past `seconds` from now (TransientStoreError
        then): the save's manifest PUT inside its lease. A store without network: `put`."""
        self.put(name, data)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create `name` only if no object has it (atomically, capabilities.conditional_create);
        True if created, False if it existed."""
        raise PermanentStoreError(f"store {self.url} cannot create objects conditionally")

    def delete_many(self, names) -> None:
        self.map_parallel(self.delete, list(names))

    def fill(self, names) -> int | None:
        """Copy objects into a local tier ahead of reading them; returns the bytes fetched,
        None for a store without a local tier (rsnap.store.tiered overrides this)."""
        return None

    def now(self) -> float:
        """The store's clock as best known (prune's grace period compares mtimes with it)."""
        return time.time() + self.clock_offset

    def lock(self, exclusive: bool):
        """A context manager yielding a HeldLock: shared for saves, exclusive for prune, so
        prune never deletes a pack a save in progress is about to reference. Default: the
        lock layer (rsnap.store.lock), which uses lock objects or refuses with RsnapError."""
        from .lock import lock_objects
        return lock_objects(self, exclusive)

    def map_parallel(self, fn, items: list) -> list:
        """fn over items, `capabilities.connections` at once, results in order."""
        jobs = min(self.capabilities.connections, len(items))
        if jobs <= 1:
            return [fn(x) for x in items]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(fn, items))


Store = Backend     # the former name
