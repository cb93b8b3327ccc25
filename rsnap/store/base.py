"""The object-store interface every backend implements, and the object names it accepts.

A backend is a flat key/value object space ("snapshots/…", "packs/…", "cache/…"). Like
sccache's storage trait it knows nothing about snapshots: it only moves named objects,
and every `put` is atomic (readers see the old object, the new one, or none). The
repository (rsnap.repository.repo) and the compile cache are written against this interface.
"""
from __future__ import annotations

import re

from ..errors import StoreError

_NAME = re.compile(r"^[A-Za-z0-9._@=+-]+(/[A-Za-z0-9._@=+-]+)*$")


def check_name(name: str) -> str:
    if not _NAME.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise StoreError(f"invalid object name {name!r}")
    return name


class Store:
    """What the repository needs from a backend. `url` names the store in messages and JSON.

    Optional: `lock(exclusive)`, a context manager held shared by saves and exclusively by
    prune, so prune never deletes a pack a save in progress is about to reference. Callers
    check `hasattr(store, "lock")`; a backend that cannot lock leaves it out.
    """

    url: str

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        """Size in bytes, None if the object is missing."""
        raise NotImplementedError

    def get(self, name: str) -> bytes:
        """The whole object; StoreError if it is missing or unreadable."""
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
        """Mark an object as recently used (LRU of the compile cache)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Sorted names of the objects whose name starts with `prefix`."""
        raise NotImplementedError

    def stat_all(self, prefix: str = "") -> list[tuple[str, int, float]]:
        """(name, size, mtime in seconds) of the objects under `prefix`."""
        raise NotImplementedError

    def missing(self, names) -> list[str]:
        """Those of `names` not in the store (a remote backend asks in parallel)."""
        return [n for n in names if not self.exists(n)]
