"""Two tiers: a local store directory in front of a remote store (persistent runners).

`RSNAP_LOCAL_STORE=/var/cache/rsnap` with an s3:// store: reads hit the local directory first
and fill it (packs and manifests are immutable, so a local copy never goes stale), writes go
to both, and everything that decides what a snapshot may reference asks the remote store,
which stays the authority: `list`, `stat_all`, `missing` (a save's re-check of reused packs),
`lock` and `now`. A runner therefore pays the network only for packs it has not seen.

The compile cache's local tier is the same directory (rsnap.compile_cache.stats.
resolve_store_url); `sync_cache_down`/`sync_cache_up` move its cache/ objects.
"""
from __future__ import annotations

from ..errors import StoreError
from .local import LocalStore


class TieredStore:
    remote_store = True

    def __init__(self, local: LocalStore, remote):
        self.local, self.remote = local, remote
        self.url = remote.url
        self.jobs = getattr(remote, "jobs", 8)

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

    def fill(self, names) -> int:
        """Copy the objects the local directory lacks from the remote store, `jobs` at a time
        (restore calls this with the packs it will read). Returns the bytes fetched."""
        todo = [n for n in names if not self.local.exists(n)]
        if not todo:
            return 0
        from concurrent.futures import ThreadPoolExecutor
        fetched = 0
        with ThreadPoolExecutor(min(self.jobs, len(todo)), thread_name_prefix="rsnap-fill") as pool:
            for name, data in zip(todo, pool.map(self.remote.get, todo)):
                self._fill(name, data)
                fetched += len(data)
        return fetched

    def _fill(self, name: str, data: bytes) -> None:
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

    def now(self) -> float:
        return self.remote.now()

    def lock(self, exclusive: bool):
        return self.remote.lock(exclusive)


def local_tier(store) -> LocalStore | None:
    """The local directory the compile cache works in, for a remote store."""
    if isinstance(store, TieredStore):
        return store.local
    if not getattr(store, "remote_store", False):
        return None
    import os
    from . import default_store_url, open_store
    try:  # the directory rsnap-rustc uses (compile_cache.stats.resolve_store_url), in RSNAP_SCOPE's namespace
        return open_store(os.environ.get("RSNAP_LOCAL_STORE") or default_store_url())
    except StoreError:
        return None


def sync_cache_down(store, limit: int | None = None) -> dict:
    """Fill the compile cache's local tier with the remote store's cache/ entries it lacks
    (one LIST, then parallel GETs). Called by `rsnap restore`."""
    local = local_tier(store)
    remote = getattr(store, "remote", store)
    if local is None:
        return {}
    have = set(local.list("cache/"))
    want = [(n, s) for n, s, _m in remote.stat_all("cache/") if n not in have]
    if limit is not None:
        want = want[:limit]
    names = [n for n, _s in want]
    if names:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(getattr(remote, "jobs", 8), len(names))) as pool:
            for name, data in zip(names, pool.map(remote.get, names)):
                local.put(name, data)
    return {"cache_entries_downloaded": len(names), "cache_bytes_downloaded": sum(s for _n, s in want)}


def sync_cache_up(store) -> dict:
    """Upload the local tier's cache/ entries the remote store lacks (one LIST, parallel PUTs).
    Called by `rsnap save`."""
    local = local_tier(store)
    remote = getattr(store, "remote", store)
    if local is None:
        return {}
    have = set(remote.list("cache/"))
    names = [n for n in local.list("cache/") if n not in have]
    sent = 0
    if names:
        def items():
            nonlocal sent
            for n in names:
                data = local.get(n)
                sent += len(data)
                yield n, data
        remote.put_many(items())
    return {"cache_entries_uploaded": len(names), "cache_bytes_uploaded": sent}
