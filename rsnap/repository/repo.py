"""Snapshot repository on top of a store backend (restic-like: packs + snapshots).

Objects:
  packs/<id[:2]>/<id>          concatenated zstd frames, one per blob; id = xxh3-128 of the pack
  snapshots/<key>/<created_ns>-<rand>   zstd JSON manifest (written last, atomically)

A blob is located by its manifest's `blobs` table, so a manifest alone is enough to
restore; a big file may be a list of chunk blobs (manifest `chunks`, rsnap.repository.chunking).
Saves dedupe against the blob and chunk tables of recent snapshots.
"""
from __future__ import annotations

import os
import threading
import time

import xxhash
import zstandard

from ..digest import digest_bytes
from ..errors import StoreError, FormatError
from . import manifest as mf

PACK_TARGET = int(os.environ.get("RSNAP_PACK_SIZE", 16 << 20))  # close a pack once it holds this many compressed bytes
ZSTD_LEVEL = 3


def pack_name(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


def snapshot_prefix(key: str) -> str:
    return f"snapshots/{key}"


class PackWriter:
    """Accumulates compressed blobs into packs. A full pack is written to the store by a
    background thread while the save goes on compressing (each pack costs an fsync); `flush`
    writes the last one and returns once every pack is in the store."""

    MAX_IN_FLIGHT = 2  # full packs waiting to be written, at most (memory); a remote store: its jobs

    def __init__(self, store):
        self.store = store
        # a remote store takes several uploads at once (each a round trip or more); a local one
        # gains nothing from more than one writer (each pack is an fsync)
        self.jobs = min(8, store.capabilities.connections)
        self.max_in_flight = max(self.MAX_IN_FLIGHT, self.jobs)
        self.buf: list[bytes] = []
        self.pending: list[tuple[str, int, int, int]] = []  # digest, offset, clen, size
        self.offset = 0
        self.locations: dict[str, list] = {}
        self.pending_digests: set[str] = set()
        self.bytes_written = 0
        self.packs_written = 0
        self.pack_ids: set[str] = set()
        self._writer = None  # a ThreadPoolExecutor, made when the first pack is written
        self._writes: list = []

    def add(self, digest: str, compressed: bytes, size: int) -> None:
        if digest in self.locations or digest in self.pending_digests:
            return
        self.pending_digests.add(digest)
        self.pending.append((digest, self.offset, len(compressed), size))
        self.buf.append(compressed)
        self.offset += len(compressed)
        if self.offset >= PACK_TARGET:
            self.ship()

    def flush(self) -> None:
        """Write what was added; raise the first error of any pack write."""
        self.ship()
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def ship(self) -> None:
        """Hand the current pack to the writer thread. Its blobs' locations are final already
        (a pack is named by its content); they are only used once flush has returned."""
        if not self.buf:
            return
        data = b"".join(self.buf)
        pack_id = digest_bytes(data)
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor  # not imported by a restore with nothing to write
            self._writer = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="rsnap-pack")
        while len([w for w in self._writes if not w.done()]) >= self.max_in_flight:
            next(w for w in self._writes if not w.done()).result()
        self._writes.append(self._writer.submit(self.store.put, pack_name(pack_id), data))
        for digest, off, clen, size in self.pending:
            self.locations[digest] = [pack_id, off, clen, size]
        self.bytes_written += len(data)
        self.packs_written += 1
        self.pack_ids.add(pack_id)
        self.buf, self.pending, self.offset = [], [], 0
        self.pending_digests = set()


_local = threading.local()


BIG_BLOB = 4 << 20
# zstd's own threads for big blobs, in 2 MiB jobs: its default job for level 3 is 8 MiB, which
# left a 40 MiB debug binary on one core for most of a save (0.127 s vs 0.086 s here)
_BIG_PARAMS = zstandard.ZstdCompressionParameters.from_level(
    ZSTD_LEVEL, threads=max(2, min(8, os.cpu_count() or 2)), job_size=2 << 20)


def compress(data: bytes) -> bytes:
    """One zstd frame (content size recorded); big blobs use zstd's own threads too."""
    if len(data) > BIG_BLOB:
        return zstandard.ZstdCompressor(compression_params=_BIG_PARAMS).compress(data)
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return cctx.compress(data)


def compress_many(parts: list) -> list[bytes]:
    """Compress several blobs (the new chunks of one file), on all cores when there is much."""
    if sum(len(p) for p in parts) <= BIG_BLOB:
        return [compress(p) for p in parts]
    global _chunk_pool
    with _chunk_pool_lock:
        if _chunk_pool is None:  # not the save's pool: its workers are the ones waiting here
            from concurrent.futures import ThreadPoolExecutor
            _chunk_pool = ThreadPoolExecutor(max_workers=_BIG_PARAMS.threads, thread_name_prefix="rsnap-zstd")
    return list(_chunk_pool.map(compress, parts))


_chunk_pool = None
_chunk_pool_lock = threading.Lock()


def write_chunks(store, blobs: dict[str, list], chunks: list[str], fd: int, digest: str, size: int) -> None:
    """Write a chunked file into fd: its chunks in order, each verified, and the whole checked
    against the file's digest. Adjacent chunks in one pack are fetched with one read."""
    whole = xxhash.xxh3_128()
    for pack_id, start, end, run in _chunk_reads(blobs, chunks):
        span = memoryview(store.get_range(pack_name(pack_id), start, end - start))
        for part in run:
            _pack, off, clen, psize = blobs[part]
            write_blob(span[off - start:off - start + clen], fd, part, psize, f"pack {pack_id}", whole)
    if whole.hexdigest() != digest or sum(blobs[c][3] for c in chunks) != size:
        raise StoreError(f"file {digest} assembled from its chunks does not match its digest")


READ_GAP = 256 << 10  # blobs further apart in a pack than this are read separately (restore)


def _chunk_reads(blobs: dict[str, list], chunks: list[str]):
    """(pack, start, end, chunk digests) for runs of consecutive chunks read together."""
    reads: list = []
    for part in chunks:
        pack_id, off, clen, _size = blobs[part]
        last = reads[-1] if reads else None
        if last and last[0] == pack_id and last[2] <= off <= last[2] + READ_GAP:
            last[2] = off + clen
            last[3].append(part)
        else:
            reads.append([pack_id, off, off + clen, [part]])
    return reads


def write_blob(frame, fd: int, digest: str, size: int, where: str, whole=None) -> None:
    """Decompress one blob's frame into fd in 1 MiB steps (no blob-sized buffers), verifying
    its size and content hash; raise StoreError (after a partial write) if it is corrupt.
    `whole`, an xxh3 hasher, is fed the content too (a chunked file's whole-file digest)."""
    try:
        if zstandard.frame_content_size(frame) != size:
            raise StoreError(f"blob {digest} in {where} is corrupt (wrong frame size)")
        dctx, buf = _stream_state()
        h, view, written = xxhash.xxh3_128(), memoryview(buf), 0
        with dctx.stream_reader(frame, read_across_frames=False) as reader:
            while n := reader.readinto(buf):
                written += n
                if written > size:
                    break
                h.update(view[:n])
                if whole is not None:
                    whole.update(view[:n])
                _write_all(fd, view[:n])
    except zstandard.ZstdError:
        raise StoreError(f"blob {digest} in {where} is corrupt") from None
    if written != size or h.hexdigest() != digest:
        raise StoreError(f"blob {digest} in {where} is corrupt (content hash mismatch)")


def _stream_state():
    state = getattr(_local, "dstate", None)
    if state is None:
        state = _local.dstate = (zstandard.ZstdDecompressor(), bytearray(1 << 20))
    return state


def _write_all(fd: int, view) -> None:
    while view:
        view = view[os.write(fd, view):]


def read_blob(store, loc: list, digest: str, pack_cache: dict | None = None) -> bytes:
    """Fetch, decompress and verify one blob (through write_blob, the path restore uses)."""
    pack_id, off, clen, size = loc
    raw = None
    if pack_cache is not None and pack_id in pack_cache:
        raw = pack_cache[pack_id][off:off + clen]
        if len(raw) != clen:
            raise StoreError(f"store object {pack_name(pack_id)} is truncated")
    if raw is None:
        raw = store.get_range(pack_name(pack_id), off, clen)
    fd = os.memfd_create("rsnap-blob")
    try:
        write_blob(raw, fd, digest, size, f"pack {pack_id}")
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- snapshots

def manifest_name(m: mf.Manifest) -> str:
    return f"{snapshot_prefix(m.key)}/{m.created_ns}-{os.urandom(4).hex()}"


def write_manifest(store, m: mf.Manifest, data: bytes | None = None, name: str | None = None,
                   seconds: float | None = None) -> str:
    """Store a manifest (`data`: mf.dumps(m), if already made) within `seconds` (a lease's
    time left). Call it only once every pack the manifest names is in the store."""
    name = name or manifest_name(m)
    store.put_within(name, data if data is not None else mf.dumps(m), seconds)
    return name


def read_manifest(store, name: str) -> mf.Manifest:
    return mf.loads(store.get(name))


def stat_snapshots(store, key_prefix: str = "") -> list[tuple[str, str, int, int]]:
    """(object name, key, written at in ns, manifest bytes), most recently written first. The
    order is the store's own clock (S3 LastModified, a local file's mtime), never the saving
    machine's clock in the name, which only breaks ties (LastModified has 1 s resolution)."""
    out = []
    for name, size, mtime in store.stat_all("snapshots/" + key_prefix):
        parts = name.split("/")
        if len(parts) != 3:
            continue
        try:
            created = int(parts[2].split("-")[0])
        except ValueError:
            continue
        out.append((name, parts[1], int(mtime * 1e9) if mtime else created, size, created))
    out.sort(key=lambda t: (t[2], t[4]), reverse=True)
    return [t[:4] for t in out]


def list_snapshots(store, key_prefix: str = "") -> list[tuple[str, str, int]]:
    """(object name, key, written at in ns on the store's clock), most recently written first."""
    return [t[:3] for t in stat_snapshots(store, key_prefix)]


def newest_snapshots(store, key_prefix: str, limit: int | None = 1, near: str = "", exact: bool = False) -> list[str]:
    """Names of the newest snapshots whose key starts with `key_prefix` (is it, with `exact`),
    newest first (`limit` of them, None: all), the one nearest `near` first (nearest_first). A store without LIST names only
    the newest one under a prefix (Backend.newest): then that of `near`'s key, then the prefix's."""
    if store.capabilities.list:
        found = [s for s in list_snapshots(store, key_prefix) if not exact or s[1] == key_prefix]
        return nearest_first(found, near)[:limit]
    prefixes = [near + "/"] if near else []
    prefixes.append(key_prefix + "/" if exact else key_prefix)
    names = [store.newest(snapshot_prefix(p)) for p in prefixes]
    return list(dict.fromkeys(n for n in names if n))[:limit]


def find_snapshot(store, key: str, prefixes: list[str]) -> tuple[str | None, str]:
    """Newest snapshot for `key` exactly, else for the first prefix that matches any."""
    exact = newest_snapshots(store, key, exact=True)
    if exact:
        return exact[0], "exact"
    for prefix in prefixes:
        found = newest_snapshots(store, prefix)
        if found:
            return found[0], "partial"
    return None, "miss"


def known_blobs(store, tables: list[tuple[dict, dict]]) -> tuple[dict[str, list], dict[str, list[str]]]:
    """Blob locations saves can reuse, if their packs are still in the store, and the chunk
    lists of files whose chunks are all among them."""
    known: dict[str, list] = {}
    known_chunks: dict[str, list[str]] = {}
    packs = sorted({loc[0] for blobs, _chunks in tables for loc in blobs.values()})
    gone = {n.rsplit("/", 1)[-1] for n in store.missing([pack_name(p) for p in packs])}  # remote: in parallel
    for blobs, _chunks in tables:
        for digest, loc in blobs.items():
            if loc[0] not in gone:
                known[digest] = loc
    for _blobs, chunks in tables:
        for digest, parts in chunks.items():
            if all(p in known for p in parts):
                known_chunks[digest] = parts
    return known, known_chunks


def recent_blob_tables(store, key_prefix: str, limit: int = 2, near: str = "") -> list[tuple[dict, dict]]:
    """The blob and chunk tables of the newest snapshots under key_prefix (unreadable ones skipped).
    With `near` (the key being saved), the first is the newest snapshot whose key shares the most
    leading parts with it (the same key, else the same job): with many jobs in one family, the
    newest snapshots may all be other jobs', which share far fewer files."""
    out = []
    names = newest_snapshots(store, key_prefix, limit, near)
    if len(names) > 1:   # in parallel on a remote store
        try:
            raw = store.get_many(names)
        except StoreError:
            raw = {}
    else:
        raw = {}
    for name in names:
        try:
            out.append(mf.loads_blob_tables(raw[name] if name in raw else store.get(name)))
        except (StoreError, FormatError):
            continue
    return out


def nearest_first(found: list[tuple[str, str, int]], near: str) -> list[str]:
    """Snapshot names of `found` (newest first, as list_snapshots gives them), the one whose key
    shares most leading `-` parts with `near` moved to the front (the newest of those)."""
    if near and found:
        closest = max(found, key=lambda s: (_shared_parts(s[1], near), s[2]))
        found = [closest] + [s for s in found if s is not closest]
    return [name for name, _key, _created in found]


def _shared_parts(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("-"), b.split("-")):
        if x != y:
            break
        n += 1
    return n


def fetch_packs_parallel(store, pack_ids: list[str], workers: int = 4):
    """Yield (pack_id, bytes) for whole packs, fetched concurrently."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from zip(pack_ids, pool.map(lambda p: store.get(pack_name(p)), pack_ids))


def now_ns() -> int:
    return time.time_ns()
