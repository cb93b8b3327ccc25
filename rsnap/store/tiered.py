"""Two tiers: a local store directory in front of a remote store (persistent runners).

`RSNAP_LOCAL_STORE=/var/cache/rsnap` with an s3:// store: reads hit the local directory first
and fill it (packs and manifests are immutable, so a local copy never goes stale), writes go
to both, and everything that decides what a snapshot may reference asks the remote store,
which stays the authority: `list`, `stat_all`, `missing` (a save's re-check of reused packs),
`lock` and `now`. A runner therefore pays the network only for packs it has not seen.

The compile cache's local tier is the same directory (rsnap.compile_cache.stats.
resolve_store_url); rsnap.store.cache_sync moves its cache/ objects.
"""
from __future__ import annotations

from .. import faults
from ..errors import StoreError
from .base import Backend
from .local import LocalStore


class TieredStore(Backend):
    remote_store = True

    def __init__(self, local: LocalStore, remote: Backend):
        self.local, self.remote = local, remote
        self.url = remote.url
        self.capabilities = remote.capabilities

    def exists(self, name: str) -> bool:
        return self.local.exists(name) or self.remote.exists(name)

    def size(self, name: str) -> int | None:
        size = self.local.size(name)
        return size if size is not None else self.remote.size(name)

    def get(self, name: str) -> bytes:
        if self.local.exists(name):
            try:
                return self.local.get(name)
            except StoreError:
                pass
        data = self.remote.get(name)
        self._fill(name, data)
        return data

    def get_range(self, name: str, offset: int, length: int):
        """From the local copy; a pack not yet local is fetched whole once and kept."""
        if not self.local.exists(name):
            self._fill(name, self.remote.get(name))
        return self.local.get_range(name, offset, length)

    def get_many(self, names) -> dict[str, bytes]:
        """Local copies first; the rest from the remote store in parallel, kept locally."""
        out, todo = {}, []
        for name in names:
            try:
                out[name] = self.local.get(name)
            except StoreError:
                todo.append(name)
        for name, data in self.remote.get_many(todo).items():
            self._fill(name, data)
            out[name] = data
        return out

    def fill(self, names) -> int:
        """Copy the objects the local directory lacks from the remote store, in parallel
        (restore calls this with the packs it will read). Returns the bytes fetched."""
        todo = [n for n in names if not self.local.exists(n)]
        fetched = 0
        for name, data in self.remote.get_many(todo).items():
            self._fill(name, data)
            fetched += len(data)
        return fetched

    def _fill(self, name: str, data: bytes) -> None:
        faults.point("tier.fill")   # fetched from the remote store, not yet local
        try:
            self.local.put(name, data)
        except Exception:  # noqa: BLE001 - a full or read-only cache dir only costs the fill
            pass

    def put(self, name: str, data: bytes) -> None:
        self.remote.put(name, data)
        self._fill(name, data)

    def put_many(self, items) -> None:
        items = list(items)
        self.remote.put_many(items)
        for name, data in items:
            self._fill(name, data)

    def delete(self, name: str) -> None:
        self.remote.delete(name)
        self.local.delete(name)

    def touch(self, name: str) -> None:
        self.local.touch(name)
        self.remote.touch(name)

    def list(self, prefix: str = "") -> list[str]:
        return self.remote.list(prefix)

    def stat_all(self, prefix: str = "") -> list[tuple[str, int, float]]:
        return self.remote.stat_all(prefix)

    def missing(self, names) -> list[str]:
        return self.remote.missing(names)

    def delete_many(self, names) -> None:
        names = list(names)
        self.remote.delete_many(names)
        for name in names:
            self.local.delete(name)

    def newest(self, prefix: str) -> str | None:
        return self.remote.newest(prefix)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        created = self.remote.put_if_absent(name, data)
        if created:
            self._fill(name, data)
        return created

    def now(self) -> float:
        return self.remote.now()

    def lock(self, exclusive: bool):
        return self.remote.lock(exclusive)
