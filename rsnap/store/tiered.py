"""Two tiers: a local store directory in front of a remote store (persistent runners).

`RSNAP_LOCAL_STORE=/var/cache/rsnap` with an s3:// store: reads hit the local directory first
and fill it (packs and manifests are immutable, so a local copy never goes stale), writes go
to both, and everything that decides what a snapshot may reference asks the remote store,
which stays the authority: `list`, `stat_all`, `missing` (a save's re-check of reused packs),
`lock` and `now`. A runner therefore pays the network only for packs it has not seen.

The local tier trusts nothing it holds: a pack's id is the xxh3-128 of its bytes, so a pack
is checked against its name before it is filled and the first time a command reads a local
copy; a copy that fails is evicted and fetched again from the remote store (one bad copy
must not make a runner miss forever).

The compile cache's local tier is the same directory (rsnap.compile_cache.stats.
resolve_store_url); rsnap.store.cache_sync moves its cache/ objects.
"""
from __future__ import annotations

import re
import threading

from .. import faults
from ..digest import digest_bytes, hash_file
from ..errors import StoreError
from .base import Backend
from .local import LocalStore


_PACK = re.compile(r"packs/([0-9a-f]{2})/(\1[0-9a-f]{30})")


def pack_id_of(name: str) -> str | None:
    """The id a pack's bytes must hash to (None: not a pack name, nothing to check)."""
    m = _PACK.fullmatch(name)
    return m.group(2) if m else None


class TieredStore(Backend):
    remote_store = True

    def __init__(self, local: LocalStore, remote: Backend):
        self.local, self.remote = local, remote
        self.url = remote.url
        self.capabilities = remote.capabilities
        self._verified: set[str] = set()    # local copies found good by this command
        self._verify_lock = threading.Lock()

    @property
    def traffic(self) -> dict | None:
        return self.remote.traffic

    def _local_ok(self, name: str) -> bool:
        """True if the local tier has a good copy of `name`; a bad one is evicted."""
        if name in self._verified:
            return True
        if not self.local.exists(name):
            return False
        want = pack_id_of(name)
        if want is not None:
            try:
                good = hash_file(self.local.root / name) == want
            except OSError:
                good = False
            if not good:
                self._evict(name)
                return False
        with self._verify_lock:
            self._verified.add(name)
        return True

    def _evict(self, name: str) -> None:
        try:
            self.local.delete(name)
        except StoreError:
            pass

    def exists(self, name: str) -> bool:
        return self.local.exists(name) or self.remote.exists(name)

    def size(self, name: str) -> int | None:
        size = self.local.size(name)
        return size if size is not None else self.remote.size(name)

    def get(self, name: str) -> bytes:
        if self._local_ok(name):
            try:
                return self.local.get(name)
            except StoreError:
                pass
        data = self.remote.get(name)
        self._fill(name, data)
        return data

    def get_range(self, name: str, offset: int, length: int):
        """From the local copy; a pack not yet local (or not good) is fetched whole once and kept."""
        if not self._local_ok(name):
            self._fill(name, self.remote.get(name))
        return self.local.get_range(name, offset, length)

    def get_many(self, names) -> dict[str, bytes]:
        """Local copies first; the rest from the remote store in parallel, kept locally."""
        out, todo = {}, []
        for name in names:
            try:
                if not self._local_ok(name):
                    raise StoreError(name)
                out[name] = self.local.get(name)
            except StoreError:
                todo.append(name)
        for name, data in self.remote.get_many(todo).items():
            self._fill(name, data)
            out[name] = data
        return out

    def fill(self, names) -> int:
        """Copy the objects the local directory lacks (or holds bad copies of) from the remote
        store, in parallel (restore calls this with the packs it will read). Returns the bytes
        fetched."""
        todo = [n for n in names if not self._local_ok(n)]
        fetched = 0
        for name, data in self.remote.get_many(todo).items():
            self._fill(name, data)
            fetched += len(data)
        return fetched

    def _fill(self, name: str, data: bytes, read: bool = True) -> None:
        """Keep a copy of what was read (`read`) or written; a pack whose bytes do not hash to
        its id is not kept (and when read, refused with StoreError)."""
        faults.point("tier.fill")   # a copy about to be kept in the local tier
        want = pack_id_of(name)
        if want is not None and digest_bytes(data) != want:
            if read:
                raise StoreError(f"store object {name} is corrupt (its bytes do not match its id)")
            return
        try:
            self.local.put(name, data)
        except Exception:  # noqa: BLE001 - a full or read-only cache dir only costs the fill
            return
        with self._verify_lock:
            self._verified.add(name)

    def put(self, name: str, data: bytes) -> None:
        self.remote.put(name, data)
        self._fill(name, data, read=False)

    def put_within(self, name: str, data: bytes, seconds: float | None) -> None:
        self.remote.put_within(name, data, seconds)
        self._fill(name, data, read=False)

    def put_many(self, items) -> None:
        items = list(items)
        self.remote.put_many(items)
        for name, data in items:
            self._fill(name, data, read=False)

    def delete(self, name: str) -> None:
        self.remote.delete(name)
        self.local.delete(name)
        self._verified.discard(name)

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
            self._fill(name, data, read=False)
        return created

    def now(self) -> float:
        return self.remote.now()

    def lock(self, exclusive: bool):
        return self.remote.lock(exclusive)
