"""The compile cache's local tier <-> a remote store's cache/ objects (docs/compile-cache.md).

rsnap-rustc works only on a local directory: RSNAP_LOCAL_STORE's (the tier of a TieredStore),
else the default local store. `rsnap restore` fills it from the remote store, `rsnap save`
uploads what it added.
"""
from __future__ import annotations

import os

from .. import faults
from ..errors import StoreError
from . import cache_bundle
from .local import LocalStore
from .registry import default_store_url, open_store
from .tiered import TieredStore


def _remote(store):
    return store.remote if isinstance(store, TieredStore) else store


def local_tier(store) -> LocalStore | None:
    """The local directory the compile cache works in, for a remote store."""
    if isinstance(store, TieredStore):
        return store.local
    if not store.remote_store:
        return None
    try:  # the directory rsnap-rustc uses (compile_cache.stats.resolve_store_url), in RSNAP_SCOPE's namespace
        return open_store(os.environ.get("RSNAP_LOCAL_STORE") or default_store_url())
    except StoreError:
        return None


def sync_cache_down(store, limit: int | None = None) -> dict:
    """Fill the compile cache's local tier with the remote store's cache/ entries it lacks
    (one LIST, then parallel GETs). Called by `rsnap restore`."""
    local = local_tier(store)
    remote = _remote(store)
    if local is None:
        return {}
    if not remote.capabilities.list:    # e.g. gha://: bundled (rsnap.store.cache_bundle)
        return cache_bundle.sync_down(remote, local)
    have = set(local.list("cache/"))
    want = [(n, s) for n, s, _m in remote.stat_all("cache/") if n not in have]
    if limit is not None:
        want = want[:limit]
    names = [n for n, _s in want]
    if names:  # written as they arrive, not gathered (entries can be large)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(remote.capabilities.connections, len(names))) as pool:
            for name, data in zip(names, pool.map(remote.get, names)):
                local.put(name, data)
                faults.point("cache_sync.down")
    return {"cache_entries_downloaded": len(names), "cache_bytes_downloaded": sum(s for _n, s in want)}


def sync_cache_up(store) -> dict:
    """Upload the local tier's cache/ entries the remote store lacks (one LIST, parallel PUTs).
    Called by `rsnap save`."""
    local = local_tier(store)
    remote = _remote(store)
    if local is None:
        return {}
    if not remote.capabilities.list:
        return cache_bundle.sync_up(remote, local)
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
