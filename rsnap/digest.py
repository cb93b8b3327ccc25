"""Content digests (xxh3-128, 32 hex digits): the name of a file's content in manifests, packs,
source records and compile-cache keys."""
from __future__ import annotations

import xxhash


def digest_bytes(data) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
