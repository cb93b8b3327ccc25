"""Save and restore: turning roots on disk into snapshots and back.

Restore is ordered so that an interruption at any point leaves nothing cargo would
wrongly trust: fingerprint files that will change are removed first, data files are
written next (fingerprint files too, but only under temp names cargo never reads), then
source mtimes are normalized, and fingerprint files are renamed into place last (a
fingerprint must never vouch for sources whose mtimes are not normalized yet). Every
file is written to a temp name and renamed. Save and restore hold cargo's own locks.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

from . import __version__, faults, scan
from .cargo import layout as cargo_layout, mtimes, usage
from .digest import hash_file
from .store import chunking, repo
from .store import manifest as mf
from .errors import RsnapError, EXIT_NOSPACE, EXIT_WORKSPACE, EXIT_LOCKED
from .progress import Progress

RESTORING_MARKER = "restoring"
RESTORED_INFO = "restored.json"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota (containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return n


WORKERS = usable_cpus()  # more threads than CPUs only contend for the GIL


class RootSpec(NamedTuple):  # NamedTuples and plain classes, not dataclasses: see rsnap.manifest
    name: str
    path: Path
    subtrees: list[str]
    exclude: Callable[[str], bool]
    merge: bool


def root_specs(ws, home_excluded: frozenset[str] = frozenset()) -> list[RootSpec]:
    """`home_excluded`: $CARGO_HOME paths (and everything below them) kept out of the snapshot."""
    specs = [RootSpec("target", ws.target_dir, [""], cargo_layout.is_excluded_target_path, False)]
    if ws.build_dir != ws.target_dir and not ws.build_dir.is_relative_to(ws.target_dir):
        specs.append(RootSpec("build", ws.build_dir, [""], cargo_layout.is_excluded_target_path, False))

    def home_exclude(rel: str) -> bool:
        return cargo_layout.is_cargo_home_excluded(rel) or rel in home_excluded

    specs.append(RootSpec("cargo_home", ws.cargo_home, list(cargo_layout.CARGO_HOME_TREES), home_exclude, True))
    return specs


def _root_path(ws, name: str) -> Path:
    return {"target": ws.target_dir, "build": ws.build_dir, "cargo_home": ws.cargo_home}[name]


# ---------------------------------------------------------------- locking

@contextmanager
def locked(path: Path, what: str, exclusive: bool = True, wait: bool = True):
    """flock(2) on `path` (the same lock cargo takes on .package-cache / .cargo-lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _os_error(f"locking {what}", e) from None
    try:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            raise RsnapError(f"{what} is locked by another process", EXIT_LOCKED) from None
        yield
    finally:
        os.close(fd)


def cargo_lock_files(ws, m: mf.Manifest | None = None) -> list[Path]:
    """Cargo's build-dir locks (`<profile>/.cargo-lock`, flock'ed by cargo for a whole build):
    those on disk, plus, for a restore, those of the profile dirs the snapshot will create."""
    found = set()
    for base in {ws.target_dir, ws.build_dir}:
        for pattern in ("*/.cargo-lock", "*/*/.cargo-lock", "*/.cargo-build-lock", "*/*/.cargo-build-lock"):
            found.update(base.glob(pattern))
    for root in (m.roots if m else []):
        for e in root.entries:
            parts = e.path.split("/")
            if not root.merge and e.type == "d" and len(parts) <= 3 and parts[-1] in (".fingerprint", "deps"):
                found.add(_root_path(ws, root.name).joinpath(*parts[:-1], ".cargo-lock"))
    return sorted(found)


@contextmanager
def cargo_locks(paths: list[Path], exclusive: bool):
    """Hold cargo's flocks on all `paths`, waiting (like cargo does) while a cargo process holds
    one. All or nothing: nothing is held while waiting, so there is no lock-order deadlock."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    fds, held = [], []
    try:
        for p in paths:
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                fds.append(os.open(p, os.O_RDWR | os.O_CREAT, 0o644))
                held.append(p)
            except OSError as e:
                if not exclusive and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    continue  # a read-only dir: nobody can be writing there, reading needs no lock
                raise _os_error(f"locking {p}", e) from None
        announced = False
        while True:
            busy = None
            for i, fd in enumerate(fds):
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    busy = i
                    break
            if busy is None:
                break
            for fd in fds[:busy]:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if not announced:
                print(f"rsnap: waiting for the lock on {held[busy]} (held by cargo or rsnap)", file=sys.stderr)
                announced = True
            fcntl.flock(fds[busy], mode)
            fcntl.flock(fds[busy], fcntl.LOCK_UN)
        yield
    finally:
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------- save

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
    lock = store.lock(exclusive=False) if hasattr(store, "lock") else contextlib.nullcontext()
    with lock:
        return _save(ws, store, key, key_inputs, dedupe_prefix, progress, started, home_excluded)


def _save(ws, store, key, key_inputs, dedupe_prefix, progress, started, home_excluded) -> dict:
    known, known_chunks = repo.known_blobs(store, repo.recent_blob_tables(store, dedupe_prefix))
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
                for spec in root_specs(ws, home_excluded):
                    if spec.path.is_dir():
                        caches.append(scan.StatCache(spec.path).load())
                        jobs.append(_start_root(spec, caches[-1], pool, seen, claims))
                sources, source_dirs, source_links = mtimes.record_sources(ws)
                for job in jobs:
                    roots.append(_finish_root(job, seen, writer, claims, stats, bar))
                writer.ship()  # the last pack is written (and fsynced) while the manifest is made
            for digest in list(blobs):
                if blobs[digest] is None:
                    blobs[digest] = writer.locations[digest]
            _check_complete(blobs, chunks)
            bar.finish()
            m = mf.Manifest(
                key=key, created_ns=repo.now_ns(), workspace_root=str(ws.root), cargo_home=str(ws.cargo_home),
                rsnap_version=__version__, key_inputs=key_inputs, roots=roots, sources=sources,
                source_dirs=source_dirs, blobs=blobs, chunks=chunks, source_links=source_links,
            )
            data = mf.dumps(m)
            _arm_keeping_stat_caches(ws, caches)
            writer.flush()  # every pack is in the store before the manifest that names them
            faults.point("save.manifest")
            name = repo.write_manifest(store, m, data)
        finally:
            for cache in caches:
                cache.save()
    stats.bytes_written += writer.bytes_written
    stats.packs_written = writer.packs_written
    return {"result": "saved", "key": key, "snapshot": name, **stats.__dict__,
            "sources": len(sources), "seconds": round(time.monotonic() - started, 3)}


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
    hard_links: dict[str, str]
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


def _start_root(spec: RootSpec, cache: scan.StatCache, pool, seen: _Seen, claims: _Claims) -> _RootJob:
    """Walk a root and queue its new or changed files on the pool (hash, and compress if new)."""
    found = list(scan.walk(spec.path, spec.subtrees, spec.exclude))

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

    files, hard_links = _split_hard_links(found)
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


def _finish_root(job: _RootJob, seen: _Seen, writer, claims: _Claims, stats: SaveStats, bar) -> mf.Root:
    """Collect a root's results as workers finish them (so packs fill and are written while
    the rest is compressed), then build the manifest entries in walk order."""
    spec, cache = job.spec, job.cache
    root = mf.Root(name=spec.name, path=str(spec.path), merge=spec.merge)
    results = itertools.chain(((f, (job.quick[f.rel], None, False)) for f in job.files if f.rel in job.quick),
                              _as_done(job))
    digests: dict[str, str] = {}
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
            if job.hard_links[f.rel] in digests:
                root.entries.append(mf.Entry(f.rel, "h", f.mode, f.size, f.mtime_ns, job.hard_links[f.rel]))
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


def _split_hard_links(found: list[scan.Found]) -> tuple[list[scan.Found], dict[str, str]]:
    """Files to read, and {path: first path} for the other names of multiply-linked files.

    Cargo hard-links uplifted artifacts; keeping the links halves what restore writes
    and keeps the next build from re-linking (which would defeat the stat cache).
    """
    first_by_inode: dict[int, str] = {}
    files, links = [], {}
    for f in found:
        if f.type != "f":
            continue
        if f.nlink > 1 and not cargo_layout.is_fingerprint_path(f.rel):
            first = first_by_inode.setdefault(f.ino, f.rel)
            if first != f.rel:
                links[f.rel] = first
                continue
        files.append(f)
    return files, links


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


# ---------------------------------------------------------------- restore

class RestorePlan:
    def __init__(self, spec_path: Path, root: mf.Root):
        self.spec_path, self.root = spec_path, root
        self.write: list[mf.Entry] = []
        self.fix_meta: list[tuple[mf.Entry, scan.Found]] = []
        self.remove: list[scan.Found] = []
        self.unchanged = 0


class RestoreStats:
    def __init__(self):
        self.files_written = 0
        self.bytes_written = 0
        self.files_removed = 0
        self.files_unchanged = 0
        self.metadata_fixed = 0


def restore(ws, store, snapshot_name: str, m: mf.Manifest, progress: bool | None = None) -> dict:
    """Hold cargo's locks (build dirs, package cache) for the whole restore, planning included."""
    locks = cargo_lock_files(ws, m) + [ws.cargo_home / ".package-cache", ws.cargo_home / ".package-cache-mutate"]
    with cargo_locks(locks, exclusive=True):
        return _restore(ws, store, snapshot_name, m, progress)


def _restore(ws, store, snapshot_name: str, m: mf.Manifest, progress: bool | None) -> dict:
    started = time.monotonic()
    stats = RestoreStats()
    specs = {s.name: s for s in root_specs(ws)}
    plans = []
    for root in m.roots:
        path = _root_path(ws, root.name)
        spec = specs.get(root.name)
        subtrees = _merge_subtrees(root) if root.merge else [""]
        exclude = spec.exclude if spec else cargo_layout.is_excluded_target_path
        plans.append(_plan_root(path, root, subtrees, exclude))
    newest = max((e.mtime_ns for r in m.roots if r.name != "cargo_home" for e in r.entries), default=0)
    markers = [p.spec_path / cargo_layout.RSNAP_DIR / RESTORING_MARKER for p in plans if not p.root.merge]
    try:
        for marker in markers:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(snapshot_name)
        faults.point("restore.marker")
        for plan in plans:
            scan.StatCache(plan.spec_path).invalidate()
        bar = Progress("rsnap restore", total=sum(e.size for p in plans for e in p.write), enabled=progress)
        for plan in plans:
            _clear_the_way(plan, stats)
        held_back = _write_files(store, m, plans, stats, bar)
        try:
            for plan in plans:
                _write_links_and_meta(plan, stats)
            # Sources are normalized before fingerprints are put in place: an interruption before
            # this point leaves no fingerprint that could vouch for a source not yet re-timed.
            retime = mtimes.normalize(ws, m.sources, m.source_dirs, newest, m.source_links)
            _put_in_place(held_back, plans)
        except BaseException:
            _discard(held_back)
            raise
        for plan in plans:
            _set_dir_meta(plan)
        bar.finish()
        for plan in plans:
            if not plan.root.merge:
                info = plan.spec_path / cargo_layout.RSNAP_DIR / RESTORED_INFO
                info.write_text(json.dumps({"snapshot": snapshot_name, "key": m.key, "restored_ns": time.time_ns()}))
        arm_usage(ws)  # before the stat cache is written: arming changes fingerprint files' ctimes
        for plan in plans:
            _remember_restored(plan)
        faults.point("restore.done")
        for marker in markers:
            marker.unlink(missing_ok=True)
    except OSError as e:
        raise _os_error("restore", e) from None
    return {"files_written": stats.files_written, "bytes_written": stats.bytes_written,
            "files_removed": stats.files_removed, "files_unchanged": stats.files_unchanged,
            "metadata_fixed": stats.metadata_fixed, "sources": retime.as_dict(),
            "seconds": round(time.monotonic() - started, 3)}


def arm_usage(ws, retimed: list | None = None) -> None:
    """Start gc's usage epoch (see rsnap.usage); failing to is a warning, never an error."""
    try:
        usage.arm(ws, retimed=retimed)
    except OSError as e:
        sys.stderr.write(f"rsnap: warning: could not start usage tracking for gc: {e}\n")


def _os_error(action: str, e: OSError) -> RsnapError:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RsnapError(f"{action} failed: {e.strerror}{where}: disk full or file size limit", EXIT_NOSPACE)
    return RsnapError(f"{action} failed: {e.strerror}{where}", EXIT_WORKSPACE)


def _merge_subtrees(root: mf.Root) -> list[str]:
    """Top-level trees a merge root covers, as recorded (registry/index, git/db, ...)."""
    tops = set()
    for e in root.entries:
        parts = e.path.split("/")
        tops.add("/".join(parts[:2]) if parts[0] in ("registry", "git") and len(parts) > 1 else parts[0])
    return sorted(tops)


def _plan_root(path: Path, root: mf.Root, subtrees, exclude) -> RestorePlan:
    plan = RestorePlan(spec_path=path, root=root)
    existing = {f.rel: f for f in scan.walk(path, subtrees, exclude)} if path.is_dir() else {}
    on_disk = dict(existing)
    cache = scan.StatCache(path).load()
    links = []
    for e in root.entries:
        if e.type == "h":
            links.append(e)
            continue
        have = existing.pop(e.path, None)
        if have is None:
            plan.write.append(e)
        elif e.type != have.type:
            plan.remove.append(have)
            plan.write.append(e)
        elif e.type == "f" and not _same_content(path, e, have, cache, root.merge):
            plan.write.append(e)
        elif e.type == "l" and have.link != e.digest:
            plan.remove.append(have)
            plan.write.append(e)
        elif e.type == "f" and cargo_layout.is_fingerprint_path(e.path) and (
                have.mtime_ns != e.mtime_ns or have.mode != e.mode):
            plan.write.append(e)  # cargo compares fingerprint mtimes: invalidate first, write last
        else:
            plan.unchanged += 1
            if e.type != "l" and (have.mtime_ns != e.mtime_ns or have.mode != e.mode):
                plan.fix_meta.append((e, have))
    rewritten = {e.path for e in plan.write}
    for e in links:
        have, first = existing.pop(e.path, None), on_disk.get(e.digest)
        if have is not None and have.type == "f" and first is not None and have.ino == first.ino \
                and e.digest not in rewritten:
            plan.unchanged += 1
            continue
        if have is not None and have.type != "f":
            plan.remove.append(have)  # a regular file is replaced by the link atomically
        plan.write.append(e)
    if not root.merge:
        plan.remove.extend(existing.values())
    return plan


def _same_content(root_path: Path, e: mf.Entry, have: scan.Found, cache, merge: bool) -> bool:
    if have.size != e.size:
        return False
    if merge and have.mtime_ns == e.mtime_ns:
        return True  # $CARGO_HOME files are immutable once written (.crate, index, git objects)
    cached = cache.digest_for(have)
    if cached is not None:
        return cached == e.digest
    try:
        return hash_file(root_path / e.path) == e.digest
    except OSError:
        return False


def _clear_the_way(plan: RestorePlan, stats: RestoreStats) -> None:
    """Steps 1 and 2: fingerprint files that will change or go away are removed first
    (invalidating their units), then what the snapshot does not have (deepest first)."""
    root = plan.spec_path
    root.mkdir(parents=True, exist_ok=True)
    fp = _written_last
    trusted = _trusted_depth(plan)
    for e in plan.write:
        path = root / e.path
        if fp(e.path) and os.path.lexists(path) and _symlink_parent(root, e.path, trusted) is None:
            _remove_path(path)
            faults.point("restore.invalidate")
    for f in plan.remove:
        if fp(f.rel):
            _remove_path(root / f.rel)
            faults.point("restore.invalidate")
    for f in sorted(plan.remove, key=lambda f: f.rel.count("/"), reverse=True):
        _remove_path(root / f.rel)
        stats.files_removed += f.type != "d"
        faults.point("restore.remove")


def _write_links_and_meta(plan: RestorePlan, stats: RestoreStats) -> None:
    """After the data files: hard links (to files now in place), symlinks, and the mode and
    mtime of files that were kept."""
    root = plan.spec_path
    trusted = _trusted_depth(plan)
    for e in plan.write:
        if e.type == "h":
            _link_atomic(root / e.digest, _inside(root, e.path, trusted))
            stats.files_written += 1
            faults.point("restore.link")
        elif e.type == "l":
            dest = _inside(root, e.path, trusted)
            dest.parent.mkdir(parents=True, exist_ok=True)
            _remove_path(dest)
            os.symlink(e.digest, dest)
            faults.point("restore.link")
    for e, have in plan.fix_meta:
        if e.type == "f":
            _set_meta(root / e.path, e, have)
            stats.metadata_fixed += 1
            faults.point("restore.meta")
    stats.files_unchanged += plan.unchanged


def _set_dir_meta(plan: RestorePlan) -> None:
    """Step 5, last: directory modes and mtimes (creating entries changed them)."""
    root = plan.spec_path
    dirs = [e for e in plan.root.entries if e.type == "d"]
    for e in sorted(dirs, key=lambda e: e.path.count("/"), reverse=True):
        p = root / e.path
        try:
            st = p.lstat()
            if not stat.S_ISDIR(st.st_mode):
                continue
            if stat.S_IMODE(st.st_mode) != e.mode:
                os.chmod(p, e.mode | 0o700)
            if st.st_mtime_ns != e.mtime_ns:
                os.utime(p, ns=(st.st_atime_ns, e.mtime_ns), follow_symlinks=False)
        except FileNotFoundError:
            pass


def _set_meta(path: Path, e: mf.Entry, have: scan.Found) -> None:
    if have.mode != e.mode:
        os.chmod(path, e.mode)
    if have.mtime_ns != e.mtime_ns:
        os.utime(path, ns=(time.time_ns(), e.mtime_ns))


def _written_last(rel: str) -> bool:
    """Files that vouch for others: cargo fingerprints, and the `.cargo-ok` cargo trusts a git
    checkout by. They are removed first when they change and put in place after everything else."""
    return cargo_layout.is_fingerprint_path(rel) or rel.endswith("/.cargo-ok")


def _trusted_depth(plan: RestorePlan) -> int:
    """Leading path components whose symlinks are the user's setup (e.g. $CARGO_HOME/registry/cache)."""
    return 2 if plan.root.merge else 0


def _symlink_parent(root: Path, rel: str, trusted: int = 0) -> Path | None:
    """The first symlinked dir between root and rel (after `trusted` components), if any."""
    p = root
    for i, part in enumerate(rel.split("/")[:-1]):
        p = p / part
        if i >= trusted and p.is_symlink():
            return p
    return None


def _inside(root: Path, rel: str, trusted: int = 0) -> Path:
    """root/rel, refusing to write through a symlinked dir: it could lead out of the root."""
    link = _symlink_parent(root, rel, trusted)
    if link is not None:
        raise RsnapError(f"refusing to restore {rel}: {link} is a symlink", EXIT_WORKSPACE)
    return root / rel


class _SafeDirs:
    """Makes the dirs below a root, each checked and created once. Nothing is written through
    a symlinked dir (it could lead out of the root), except in the first `trusted` components
    (the user's setup). Make a new one after removing things: it remembers what it checked."""

    def __init__(self, root: Path, trusted: int):
        self.root, self.trusted = str(root), trusted
        self.done = {""}

    def make(self, rel_dir: str) -> None:
        if rel_dir in self.done:
            return
        self.make(rel_dir.rpartition("/")[0])
        path = f"{self.root}/{rel_dir}"
        try:
            os.mkdir(path)
        except FileExistsError:
            if rel_dir.count("/") >= self.trusted and os.path.islink(path):
                raise RsnapError(f"refusing to restore into {rel_dir}: {path} is a symlink", EXIT_WORKSPACE) from None
            if not os.path.isdir(path):
                raise
        self.done.add(rel_dir)


def _remove_path(p) -> None:
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            import shutil  # rarely needed: imported here, not by every restore
            shutil.rmtree(p)
        else:
            os.unlink(p)
    except FileNotFoundError:
        pass


class _File(NamedTuple):
    """A file to write. One written last waits under its temp name until step 4."""
    root: str
    entry: mf.Entry
    last: bool

    @property
    def dest(self) -> str:
        return f"{self.root}/{self.entry.path}"


class _Task:
    """Files whose blobs lie in one range of one pack: one read, one unit of work for the pool.
    A chunked file is a task of its own (pack_id None)."""

    def __init__(self, pack_id: str | None, start: int, end: int, files: list[_File] | None = None, cost: int = 0):
        self.pack_id, self.start, self.end, self.cost = pack_id, start, end, cost
        self.files = files if files is not None else []


TASK_COST = 4 << 20     # split restore work into tasks of about this cost (bytes written, plus...)
FILE_COST = 256 << 10   # ...this much per file: creating a file costs about as much as writing 256 KiB


def _write_files(store, m: mf.Manifest, plans: list[RestorePlan], stats: RestoreStats, bar) -> list[_File]:
    """Step 3: write every file, in size-balanced tasks on a thread pool. Data files are renamed
    into place; files written last (fingerprints, .cargo-ok) are returned still under their
    temp names, for `_put_in_place` after sources are normalized."""
    files = []
    for plan in plans:
        dirs = _SafeDirs(plan.spec_path, _trusted_depth(plan))
        root = str(plan.spec_path)
        for e in plan.write:
            if e.type == "d":
                dirs.make(e.path)
            elif e.type == "f":
                dirs.make(e.path.rpartition("/")[0])
                files.append(_File(root, e, _written_last(e.path)))
    held_back: list[_File] = []

    def run(task: _Task) -> _Task:
        span = None if task.pack_id is None else \
            memoryview(store.get_range(repo.pack_name(task.pack_id), task.start, task.end - task.start))
        for f in task.files:
            _write_atomic(f.dest, f.entry, _content_writer(store, m, f.entry, task, span), keep_temp=f.last)
            if f.last:
                held_back.append(f)
            faults.point("restore.write")
        return task

    pool = ThreadPoolExecutor(max_workers=WORKERS)
    try:
        for task in pool.map(run, _tasks(m, files)):
            for f in task.files:
                stats.files_written += 1
                stats.bytes_written += f.entry.size
                bar.advance(f.entry.size)
    except BaseException:
        pool.shutdown(cancel_futures=True)  # waits for the tasks already running
        _discard(held_back)
        raise
    pool.shutdown()
    return held_back


def _content_writer(store, m: mf.Manifest, e: mf.Entry, task: _Task, span) -> Callable[[int], None]:
    """What writes e's content into a file descriptor: its blob from the task's span of a pack,
    or its chunks (a chunked file is a task of its own and reads them itself)."""
    if task.pack_id is None:
        return lambda fd: repo.write_chunks(store, m.blobs, m.chunks[e.digest], fd, e.digest, e.size)
    _pack, off, clen, _size = m.blobs[e.digest]
    frame = span[off - task.start:off - task.start + clen]
    return lambda fd: repo.write_blob(frame, fd, e.digest, e.size, f"pack {task.pack_id}")


def _tasks(m: mf.Manifest, files: list[_File]) -> list[_Task]:
    """Contiguous runs of blobs in each pack, cut at about TASK_COST; most costly first, so the
    pool does not end with one thread working on a big task while the others wait."""
    by_pack: dict[str, list[_File]] = {}
    tasks = []
    for f in files:
        if f.entry.digest in m.blobs:
            by_pack.setdefault(m.blobs[f.entry.digest][0], []).append(f)
        else:
            tasks.append(_Task(None, 0, 0, [f], f.entry.size + FILE_COST))
    for pack_id, group in by_pack.items():
        group.sort(key=lambda f: m.blobs[f.entry.digest][1])
        task = None
        for f in group:
            _pack, off, clen, size = m.blobs[f.entry.digest]
            if task is None or task.cost >= TASK_COST or off > task.end + repo.READ_GAP:
                task = _Task(pack_id, off, off + clen)
                tasks.append(task)
            task.end = max(task.end, off + clen)
            task.files.append(f)
            task.cost += size + FILE_COST
    tasks.sort(key=lambda t: t.cost, reverse=True)
    return tasks


def _put_in_place(held_back: list[_File], plans: list[RestorePlan]) -> None:
    """Step 4: rename the files written last from their temp names into place."""
    dirs = {str(p.spec_path): _SafeDirs(p.spec_path, _trusted_depth(p)) for p in plans}
    while held_back:
        f = held_back[-1]
        dirs[f.root].make(f.entry.path.rpartition("/")[0])
        _replace(_temp_name(f.dest), f.dest)
        held_back.pop()
        faults.point("restore.publish")


def _discard(held_back: list[_File]) -> None:
    """Temp files of a restore that failed: they would only be debris."""
    for f in held_back:
        with contextlib.suppress(OSError):
            os.unlink(_temp_name(f.dest))


def _temp_name(dest: str) -> str:
    parent, _, name = dest.rpartition("/")
    return f"{parent}/.{name}.rsnap-tmp"


def _write_atomic(dest: str, e: mf.Entry, write_content: Callable[[int], None], keep_temp: bool = False) -> None:
    """Write a file's content (`write_content(fd)` decompresses and verifies it) into a temp file
    beside dest (parent dir must exist) and rename it over dest; with `keep_temp`, leave it under
    the temp name, with atime == mtime (armed for gc, see rsnap.usage: these are the fingerprint files)."""
    tmp = _temp_name(dest)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:  # left over by an interrupted restore (or a planted symlink/fifo)
            _remove_path(tmp)
            fd = os.open(tmp, flags, 0o600)
        try:
            write_content(fd)
            os.fchmod(fd, e.mode)
            os.utime(fd, ns=(e.mtime_ns if keep_temp else time.time_ns(), e.mtime_ns))
        except OSError as err:
            raise OSError(err.errno, err.strerror, dest) from None
        finally:
            os.close(fd)
        if not keep_temp:
            _replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _replace(tmp: str, dest: str) -> None:
    try:
        os.replace(tmp, dest)
    except IsADirectoryError:
        import shutil
        shutil.rmtree(dest)
        os.replace(tmp, dest)


def _link_atomic(first: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.rsnap-tmp"
    _remove_path(tmp)
    os.link(first, tmp, follow_symlinks=False)
    try:
        os.replace(tmp, dest)
    except BaseException:
        _remove_path(tmp)
        raise


def _remember_restored(plan: RestorePlan) -> None:
    """Record restored files in the stat cache so the next save need not re-hash them."""
    cache = scan.StatCache(plan.spec_path)
    if plan.root.merge:
        cache.load()
    digests = {e.path: e.digest for e in plan.root.entries if e.type == "f"}
    root = str(plan.spec_path)
    for e in plan.root.entries:
        digest = digests.get(e.digest) if e.type == "h" else digests.get(e.path)
        if digest is not None:
            try:
                cache.remember_path(e.path, f"{root}/{e.path}", digest)
            except OSError:
                pass
    cache.save()


def restore_interrupted(ws) -> bool:
    """True if a previous restore into this target dir did not finish."""
    return any((p / cargo_layout.RSNAP_DIR / RESTORING_MARKER).exists() for p in {ws.target_dir, ws.build_dir})
