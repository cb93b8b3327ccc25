"""The compile cache's entries in a store without LIST (gha://): bundled, not one object each.

The GitHub Actions cache service creates about 200 new entries per minute per repository, and one
build makes hundreds of compile-cache entries (sccache #2730 hit exactly that). So `rsnap save`
uploads the local tier's new entries as one object, `cache-bundles/<created_ns>-<rand>`:

    [entry bytes ...][zstd JSON index][index length, 8 bytes big-endian]

The index names every entry the local tier held at that save, as [bundle, offset, length]:
older entries point into older bundles, so a bundle carries only what is new. `rsnap restore`
reads the newest bundle and fetches the entries the local tier lacks (an evicted older bundle
only costs its entries). The local tier keeps the index it last saw as `cache-bundles/index`,
so the next save knows what the store already has.
"""
from __future__ import annotations

import json
import os
import time

import zstandard

from ..errors import StoreError

PREFIX = "cache-bundles/"
SEEN = PREFIX + "index"       # in the local tier: the store's newest index as this runner knows it


def sync_down(remote, local) -> dict:
    name = remote.newest(PREFIX)
    if name is None:
        return {"cache_entries_downloaded": 0, "cache_bytes_downloaded": 0}
    data = remote.get(name)
    index = _index(data)
    have = set(local.list("cache/"))
    want = {n: loc for n, loc in index.items() if n not in have}

    def fetch(item):
        n, (bundle, off, length) = item
        try:
            return n, data[off:off + length] if bundle == name else remote.get_range(bundle, off, length)
        except StoreError:      # an evicted older bundle: those entries are compiled again
            return n, None
    fetched = len(data)
    if want:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(remote.capabilities.connections, len(want))) as pool:
            for n, blob in pool.map(fetch, want.items()):
                if blob is not None and len(blob) == want[n][2]:
                    local.put(n, bytes(blob))
                    fetched += len(blob) if want[n][0] != name else 0
    local.put(SEEN, json.dumps(index).encode())
    return {"cache_entries_downloaded": len(want), "cache_bytes_downloaded": fetched}


def sync_up(remote, local) -> dict:
    seen = json.loads(local.get(SEEN)) if local.exists(SEEN) else {}
    have = local.list("cache/")
    new = [n for n in have if n not in seen]
    if not new:
        return {"cache_entries_uploaded": 0, "cache_bytes_uploaded": 0}
    name = f"{PREFIX}{time.time_ns()}-{os.urandom(4).hex()}"
    index, parts, offset = {n: seen[n] for n in have if n in seen}, [], 0
    for n in new:
        blob = local.get(n)
        index[n] = [name, offset, len(blob)]
        parts.append(blob)
        offset += len(blob)
    packed = zstandard.ZstdCompressor(level=3).compress(json.dumps(index).encode())
    parts += [packed, len(packed).to_bytes(8, "big")]
    data = b"".join(parts)
    remote.put(name, data)
    local.put(SEEN, json.dumps(index).encode())
    return {"cache_entries_uploaded": len(new), "cache_bytes_uploaded": len(data), "cache_bundles": 1}


def _index(data: bytes) -> dict:
    try:
        n = int.from_bytes(data[-8:], "big")
        return json.loads(zstandard.ZstdDecompressor().decompress(data[-8 - n:-8]))
    except (ValueError, zstandard.ZstdError):
        raise StoreError("the compile cache's newest bundle is corrupt") from None
