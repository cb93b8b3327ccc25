"""Save: turning the roots on disk into a snapshot (walk, hash, chunk, compress, pack, manifest).

Only files whose stat changed since rsnap last saw them are hashed, only content the recent
snapshots of the same family lack is compressed and packed, and the manifest is written
after every pack it names is in the store. Save holds cargo's locks (shared).
"""
from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

from .. import __version__, faults, timings
from ..cargo import mtimes, rustc_info, target_layout
from ..errors import RsnapError, StoreError, EXIT_WORKSPACE
from ..progress import Progress
from ..repository import chunking, manifest as mf, repo
from . import damage, partial, scan, settled
from .roots import WORKERS, RootSpec, arm_usage, cargo_lock_files, cargo_locks, root_specs, units_root

class SaveStats:
    def __init__(self):
        self.files = 0
        self.bytes_total = 0
        self.files_hashed = 0
        self.blobs_new = 0
        self.bytes_new = 0            # uncompressed bytes of new blobs
        self.bytes_written = 0        # compressed bytes written to the store
        self.packs_written = 0


def save(ws, store, key: str, key_inputs: dict, dedupe_prefix: str, progress: bool | None = None,
         home_excluded: frozenset[str] = frozenset()) -> dict:
    started = time.monotonic()
    if not ws.target_dir.is_dir():
        raise RsnapError(f"target dir {ws.target_dir} does not exist: build before saving", EXIT_WORKSPACE)
    with store.lock(exclusive=False) as held:
        return _save(ws, store, key, key_inputs, dedupe_prefix, progress, started, home_excluded, held)


def _save(ws, store, key, key_inputs, dedupe_prefix, progress, started, home_excluded, held) -> dict:
    known, known_chunks = repo.known_blobs(store, repo.recent_blob_tables(store, dedupe_prefix, near=key))
    known, known_chunks = _without_damaged(known, known_chunks, damage.damaged_packs(ws.target_dir))
    timings.mark("dedupe_tables")
    writer = repo.PackWriter(store)
    stats = SaveStats()
    roots, caches = [], []
    blobs: dict[str, list] = {}
    chunks: dict[str, list[str]] = {}
    seen = _Seen(known, known_chunks, blobs, chunks)
    bar = Progress("rsnap save", enabled=progress)
    locks = cargo_lock_files(ws) + ([ws.cargo_home / ".package-cache"] if ws.cargo_home.is_dir() else [])
    with cargo_locks(locks, exclusive=False):
        try:
            with ThreadPoolExecutor(max_workers=WORKERS) as pool:
                # every root is walked and queued first, and sources are recorded while the
                # workers hash and compress; results are then collected root by root
                claims, jobs = _Claims(), []
                specs = [spec for spec in root_specs(ws, home_excluded) if spec.path.is_dir()]
                walked = {spec.name: list(scan.walk(spec.path, spec.subtrees, spec.exclude)) for spec in specs}
                links = _split_hard_links(walked, units_root(ws))
                for spec in specs:
                    caches.append(scan.StatCache(spec.path).load())
                    jobs.append(_start_root(spec, caches[-1], pool, seen, claims, walked[spec.name], *links[spec.name]))
                sources, source_dirs, source_links = mtimes.record_sources(ws)
                timings.mark("walk_sources")
                digests: dict[str, dict[str, str]] = {}
                finished = {}  # the units root first: the other roots' hard links point into it
                for job in sorted(jobs, key=lambda j: j.spec.name != units_root(ws)):
                    finished[job.spec.name] = _finish_root(job, seen, writer, claims, stats, bar, digests)
                roots.extend(finished[job.spec.name] for job in jobs)
                writer.ship()
                timings.mark("hash_compress")  # the last pack is written (and fsynced) while the manifest is made
            for digest in list(blobs):
                if blobs[digest] is None:
                    blobs[digest] = writer.locations[digest]
            carried = _carry_over(ws, store, roots, blobs, chunks)
            stats.files += carried["files"]
            stats.bytes_total += carried["bytes"]
            _check_complete(blobs, chunks)
            bar.finish()
            m = mf.Manifest(
                key=key, created_ns=repo.now_ns(), workspace_root=str(ws.root), cargo_home=str(ws.cargo_home),
                rsnap_version=__version__, key_inputs=key_inputs, roots=roots, sources=sources,
                source_dirs=source_dirs, blobs=blobs, chunks=chunks, source_links=source_links,
                rustc_info=rustc_info.collect({s.name: s.path for s in root_specs(ws)}),
            )
            data = mf.dumps(m)
            _arm_keeping_stat_caches(ws, caches)
            writer.flush()  # every pack is in the store before the manifest that names them
            _recheck(store, blobs, writer.pack_ids)
            faults.point("save.manifest")
            name = _commit(store, held, m, data)
            timings.mark("manifest")
        finally:
            for cache in caches:
                cache.save()
        # a persistent runner's next restore of this snapshot need not compare anything
        m.raw_digest = settled.manifest_digest(data)
        settled.record(ws, name, m, {s.name: s for s in root_specs(ws, home_excluded)},
                       {job.spec.name: job.cache for job in jobs}, found={job.spec.name: job.found for job in jobs},
                       absent={units_root(ws): set(carried.pop("paths"))})
        timings.mark("settled")
    stats.bytes_written += writer.bytes_written
    stats.packs_written = writer.packs_written
    return {"result": "saved", "key": key, "snapshot": name, **stats.__dict__, "carried_over": carried,
            "sources": len(sources), "seconds": round(time.monotonic() - started, 3)}


def _carry_over(ws, store, roots: list[mf.Root], blobs: dict, chunks: dict) -> dict:
    """Incremental dirs the last (partial) restore left out and nobody recreated since go into
    this snapshot as they were (rsnap.snapshot.partial), if their packs are still in the store."""
    target = next((r for r in roots if r.name == units_root(ws)), None)
    if target is None:
        return {"dirs": 0, "files": 0, "bytes": 0, "paths": []}
    dirs, entries, more_blobs, more_chunks = partial.carried_over(ws.target_dir, ws.build_dir, target.entries)
    packs = sorted({loc[0] for loc in more_blobs.values()})
    if not entries or set(packs) & damage.damaged_packs(ws.target_dir) or \
            store.missing([repo.pack_name(p) for p in packs]):
        return {"dirs": 0, "files": 0, "bytes": 0, "paths": []}
    target.entries.extend(entries)
    for digest, loc in more_blobs.items():
        blobs.setdefault(digest, loc)
    for digest, parts in more_chunks.items():
        chunks.setdefault(digest, parts)
    files = [e for e in entries if e.type in ("f", "h")]
    return {"dirs": len(dirs), "files": len(files), "bytes": sum(e.size for e in files),
            "paths": [e.path for e in entries]}


def _without_damaged(known: dict, known_chunks: dict, damaged: set[str]) -> tuple[dict, dict]:
    """Dedupe tables without the blobs in packs the last restore here found damaged (missing ones
    known_blobs leaves out itself; a corrupt one is still in the store): their content is stored again."""
    if not damaged:
        return known, known_chunks
    known = {digest: loc for digest, loc in known.items() if loc[0] not in damaged}
    return known, {digest: parts for digest, parts in known_chunks.items() if all(p in known for p in parts)}


def _recheck(store, blobs: dict[str, list], written: set[str]) -> None:
    """Before the commit: every pack this snapshot reuses from earlier snapshots is still in
    the store (docs/design.md, "Remote stores"). Otherwise no manifest is written: the save
    fails, nothing is visible."""
    reused = sorted({loc[0] for loc in blobs.values()} - written)
    gone = store.missing([repo.pack_name(p) for p in reused])
    if gone:
        raise StoreError(f"{len(gone)} pack(s) this snapshot reuses vanished from store {store.url} while saving "
                         f"(a concurrent prune?), e.g. {gone[0]}; no snapshot written, run the save again")


def _commit(store, held, m: mf.Manifest, data: bytes) -> str:
    """The manifest PUT (the commit) inside the lease: the lock is refreshed right before it
    (the lease held since the save began), the PUT gets the time the lease surely has left,
    and the lease is checked again after it. If it broke, a prune may have deleted a pack the
    manifest names: the manifest is deleted again and the save fails (exit 3)."""
    _lease(held, "no snapshot written")
    name = repo.manifest_name(m)
    faults.point("save.commit")
    left = held.time_left()
    if left is not None and left < 1:
        _lease(held, "no snapshot written")     # stalled since the refresh: again, on the server's clock
        left = held.time_left()
    try:
        repo.write_manifest(store, m, data, name=name, seconds=left)
        _lease(held, "snapshot withdrawn")
    except StoreError as e:
        try:
            store.delete(name)
        except StoreError:
            pass        # not written, or the store is gone: its next lease check fails too
        raise StoreError(f"{e}; the save is not complete, run it again") from None
    return name


def _lease(held, outcome: str) -> None:
    try:
        held.check()
    except StoreError as e:
        raise StoreError(f"{e}: a prune may have gone ahead; {outcome}") from None


def _check_complete(blobs: dict[str, list], chunks: dict[str, list[str]]) -> None:
    """Never write a manifest restore would reject: every chunk of a chunked file is stored."""
    missing = next((part for parts in chunks.values() for part in parts if blobs.get(part) is None), None)
    if missing is not None:
        raise RsnapError(f"internal error: chunk {missing} was not stored; no snapshot written")


def _arm_keeping_stat_caches(ws, caches: list[scan.StatCache]) -> None:
    """Start gc's usage epoch while cargo's locks are still held. Arming (atime := mtime)
    moves the ctime of fingerprint files, which the stat cache keys on; under the locks
    nothing else changed them, so their entries move to the new stat and the next save
    does not re-hash them."""
    retimed: list = []
    arm_usage(ws, retimed)
    for path, before, after in retimed:
        for cache in caches:
            prefix = f"{cache.root}/"
            if path.startswith(prefix):
                cache.retimed(path[len(prefix):], before, after)


class _RootJob(NamedTuple):
    """One root of a save in flight: walked, its new or changed files queued on the pool."""
    spec: RootSpec
    cache: scan.StatCache
    found: list[scan.Found]
    files: list[scan.Found]
    hard_links: dict[str, tuple[str, str]]
    quick: dict[str, str]
    pending: dict


class _Claims:
    """Digests some worker is compressing already (shared by all roots of one save)."""

    def __init__(self):
        self.digests: set[str] = set()
        self.lock = threading.Lock()

    def claim(self, digest: str) -> bool:
        with self.lock:
            if digest in self.digests:
                return False
            self.digests.add(digest)
            return True


class _Seen:
    """What a save can reference without storing it again: the blobs and chunked files of
    recent snapshots (`known`, `known_chunks`) and those this save has added so far."""

    def __init__(self, known, known_chunks, blobs, chunks):
        self.known, self.known_chunks, self.blobs, self.chunks = known, known_chunks, blobs, chunks

    def has_file(self, digest: str) -> bool:
        return digest in self.known or digest in self.known_chunks or digest in self.blobs or digest in self.chunks

    def in_store(self, digest: str) -> bool:
        return digest in self.known or digest in self.known_chunks

    def reference(self, digest: str) -> None:
        """Record a stored file content (whole or chunked) of a recent snapshot in this one."""
        if digest in self.known:
            self.blobs[digest] = self.known[digest]
        else:
            parts = self.chunks[digest] = self.known_chunks[digest]
            for part in parts:
                self.blobs[part] = self.known[part]


def _start_root(spec: RootSpec, cache: scan.StatCache, pool, seen: _Seen, claims: _Claims, found: list[scan.Found],
                files: list[scan.Found], hard_links: dict[str, tuple[str, str]]) -> _RootJob:
    """Queue a walked root's new or changed files on the pool (hash, and compress if new)."""

    def digest_of(f: scan.Found):
        """Runs in a worker: (digest, content, hashed). content: None when the store has it or
        another worker stores it, else the compressed blob, or for a big file a list of
        (chunk digest, compressed chunk or None, chunk size)."""
        digest = cache.digest_for(f)
        if digest is not None and seen.has_file(digest):
            return digest, None, False
        data, digest = scan.read_and_hash(spec.path / f.rel)
        if seen.in_store(digest) or not claims.claim(digest):
            return digest, None, True
        return digest, _stored_form(data, digest, f.rel, seen, claims), True

    # unchanged files whose content the store has need no worker (most of a save after a small change)
    cached = [cache.digest_for(f) for f in files]
    quick = {f.rel: d for f, d in zip(files, cached) if d is not None and seen.in_store(d)}
    # the rest go to the pool biggest first, so that no big file is compressed at the end alone
    todo = sorted((f for f in files if f.rel not in quick), key=lambda f: f.size, reverse=True)
    pending = {f.rel: pool.submit(_guard(digest_of), f) for f in todo}
    return _RootJob(spec, cache, found, files, hard_links, quick, pending)


def _chunk(data: bytes, seen: _Seen, claims: _Claims) -> list[tuple[str, bytes | None, int]]:
    """Cut a big file into chunks; compress those neither stored nor claimed by another worker."""
    parts = chunking.cut(data)
    digests = [repo.digest_bytes(p) for p in parts]
    new = [i for i, d in enumerate(digests) if d not in seen.known and claims.claim(d)]
    compressed = dict(zip(new, repo.compress_many([parts[i] for i in new])))
    return [(d, compressed.get(i), len(parts[i])) for i, d in enumerate(digests)]


def _finish_root(job: _RootJob, seen: _Seen, writer, claims: _Claims, stats: SaveStats, bar,
                 stored: dict[str, dict[str, str]]) -> mf.Root:
    """Collect a root's results as workers finish them (so packs fill and are written while
    the rest is compressed), then build the manifest entries in walk order. `stored`: root name
    -> {path: digest} of the roots finished so far (this one is added)."""
    spec, cache = job.spec, job.cache
    root = mf.Root(name=spec.name, path=str(spec.path), merge=spec.merge)
    results = itertools.chain(((f, (job.quick[f.rel], None, False)) for f in job.files if f.rel in job.quick),
                              _as_done(job))
    digests: dict[str, str] = stored.setdefault(spec.name, {})
    for f, (digest, content, hashed) in results:
        if digest is None:
            continue  # vanished or unreadable during the walk: not part of this snapshot
        digests[f.rel] = digest
        stats.files += 1
        stats.bytes_total += f.size
        stats.files_hashed += hashed
        if hashed:
            cache.remember(f, digest)
        if seen.in_store(digest):
            seen.reference(digest)
        elif digest not in seen.blobs and digest not in seen.chunks and (
                content is not None or digest not in claims.digests):
            if content is None:  # no worker stores this content: store it here
                content = _content_now(spec.path / f.rel, digest, seen, claims)
                if content is None:
                    del digests[f.rel]  # changed since it was hashed
                    continue
            if isinstance(content, list):
                _add_chunked(digest, content, seen, writer, stats)
            else:
                _add_blob(digest, content, f.size, seen, writer, stats)
        bar.advance(f.size)
        faults.point("save.file")
    for f in job.found:
        if f.type == "f" and f.rel in job.hard_links:
            other, first = job.hard_links[f.rel]
            if first in stored.get(other, ()):
                root.entries.append(mf.Entry(f.rel, "h", f.mode, f.size, f.mtime_ns, first,
                                             other if other != spec.name else ""))
        elif f.type == "f":
            if f.rel in digests:
                root.entries.append(mf.Entry(f.rel, "f", f.mode, f.size, f.mtime_ns, digests[f.rel]))
        elif f.type == "d":
            root.entries.append(mf.Entry(f.rel, "d", f.mode, 0, f.mtime_ns, ""))
        elif f.type == "l" and _link_is_safe(f.rel, f.link):
            root.entries.append(mf.Entry(f.rel, "l", 0o777, 0, f.mtime_ns, f.link))
    return root


def _as_done(job: _RootJob):
    """(file, worker result) as workers finish; each result is dropped once handed out."""
    by_future = {job.pending.pop(f.rel): f for f in job.files if f.rel in job.pending}
    for future in as_completed(list(by_future)):
        yield by_future.pop(future), future.result()


def _content_now(path: Path, digest: str, seen: _Seen, claims: _Claims):
    data, now = scan.read_and_hash(path)
    return _stored_form(data, digest, str(path), seen, claims) if now == digest else None


def _stored_form(data, digest: str, name: str, seen: _Seen, claims: _Claims):
    """What a save stores for new content: one compressed blob, or a big file's chunks."""
    content = _chunk(data, seen, claims) if len(data) >= chunking.CHUNK_FROM else repo.compress(data)
    _check_unchanged(data, digest, name)
    return content


def _check_unchanged(data, digest: str, name: str) -> None:
    """A big file is mapped, not copied (scan.read_and_hash): if something other than cargo (whose
    locks save holds) rewrote it while it was hashed and compressed, the stored bytes might not
    match the digest. Restore would catch that, but the save must not claim it."""
    if not isinstance(data, bytes) and repo.digest_bytes(data) != digest:
        raise RsnapError(f"{name} changed while it was being saved; is something writing to the target dir? "
                         "No snapshot was written", EXIT_WORKSPACE)


def _add_chunked(digest: str, parts: list, seen: _Seen, writer, stats: SaveStats) -> None:
    seen.chunks[digest] = [d for d, _content, _size in parts]
    for d, content, size in parts:
        if d in seen.known:
            seen.blobs[d] = seen.known[d]
        elif content is not None:
            _add_blob(d, content, size, seen, writer, stats)


def _add_blob(digest: str, compressed: bytes, size: int, seen: _Seen, writer, stats: SaveStats) -> None:
    writer.add(digest, compressed, size)
    seen.blobs[digest] = None  # located once its pack is shipped
    stats.blobs_new += 1
    stats.bytes_new += size


def _split_hard_links(walked: dict[str, list[scan.Found]], units: str) -> dict[str, tuple[list, dict]]:
    """Per root: the files to read, and {path: (root, first path)} for the other names of
    multiply-linked files. The first name is taken in the root holding cargo's units (`units`),
    so the target dir's uplifts link into a separate build dir, never the other way round.

    Cargo hard-links uplifted artifacts; keeping the links halves what restore writes
    and keeps the next build from re-linking (which would defeat the stat cache).
    """
    first_by_inode: dict[tuple, tuple[str, str]] = {}
    out: dict[str, tuple[list, dict]] = {}
    for name in sorted(walked, key=lambda n: n != units):
        files, links = [], {}
        for f in walked[name]:
            if f.type != "f":
                continue
            if f.nlink > 1 and not target_layout.is_fingerprint_path(f.rel):
                # across roots only between the target and build dirs ($CARGO_HOME is a merge root)
                scope = name if name == "cargo_home" else ""
                first = first_by_inode.setdefault((f.dev, f.ino, scope), (name, f.rel))
                if first != (name, f.rel):
                    links[f.rel] = first
                    continue
            files.append(f)
        out[name] = (files, links)
    return out


def _guard(fn):
    def run(f):
        try:
            return fn(f)
        except FileNotFoundError:
            return None, None, False
        except PermissionError:
            raise RsnapError(f"cannot read {f.rel}: permission denied", EXIT_WORKSPACE) from None
    return run


def _link_is_safe(rel: str, target: str) -> bool:
    try:
        mf.check_link_target(rel, target)
        return True
    except RsnapError:
        return False  # links pointing out of the root are not carried
