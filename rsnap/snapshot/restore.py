"""Restore: turning a snapshot back into roots on disk.

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
import json
import os
import stat
import time
from pathlib import Path
from typing import Callable, NamedTuple

from .. import faults, timings
from ..cargo import layout, mtimes, rustc_info, target_layout
from ..errors import RsnapError, StoreError, EXIT_WORKSPACE
from ..progress import Progress
from ..repository import manifest as mf, repo
from . import clock, damage as dmg, partial, scan, settled
from .plan import RestorePlan, merge_subtrees, plan_root, relink_across, settled_plan
from .roots import (RESTORING_MARKER, WORKERS, arm_usage, cargo_lock_files, cargo_locks, os_error, root_path, root_specs,
                    units_root_of)

RESTORED_INFO = "restored.json"


class RestoreStats:
    def __init__(self):
        self.files_written = 0
        self.bytes_written = 0
        self.files_removed = 0
        self.files_unchanged = 0
        self.metadata_fixed = 0


def restore(ws, store, snapshot_name: str, m: mf.Manifest, progress: bool | None = None,
            predict_with: Callable | None = None) -> dict:
    """Hold cargo's locks (build dirs, package cache) for the whole restore, planning included.
    `predict_with(tree, changed_paths)`: the rebuild prediction (rsnap.snapshot.predict), made
    before the data files are written; with it, a partial restore (rsnap.snapshot.partial)."""
    mtimes.find_outside_packages(ws, m.source_dirs)
    locks = cargo_lock_files(ws, m) + [ws.cargo_home / ".package-cache", ws.cargo_home / ".package-cache-mutate"]
    with cargo_locks(locks, exclusive=True):
        return _restore(ws, store, snapshot_name, m, progress, predict_with)


def _restore(ws, store, snapshot_name: str, m: mf.Manifest, progress: bool | None, predict_with) -> dict:
    started = time.monotonic()
    stats = RestoreStats()
    shift = clock.shift_for(m)
    clock.shift_back(m, shift)
    specs = {s.name: s for s in root_specs(ws)}
    plans = []
    paths = {r.name: root_path(ws, r.name) for r in m.roots}
    # cargo's rustc query cache (not an entry; cargo checks it): before the roots are compared
    rustc_info.put_back(paths, m.rustc_info)
    unchanged = settled.settled_roots(ws, snapshot_name, m, paths)
    others = {r.name: (paths[r.name], {e.path: e for e in r.entries if e.type == "f"}) for r in m.roots if not r.merge}
    for root in m.roots:
        path = root_path(ws, root.name)
        spec = specs.get(root.name)
        if root.name in unchanged:
            plans.append(settled_plan(path, root))
            continue
        subtrees = merge_subtrees(root) if root.merge else [""]
        exclude = spec.exclude if spec else layout.is_excluded_target_path
        plans.append(plan_root(path, root, subtrees, exclude, others))
    relink_across(plans)
    damage = dmg.Damage()
    dmg.find_missing(store, m, [p for p in plans if not p.settled], damage)
    timings.mark("plan")
    newest = clock.newest_artifact_ns(m)
    markers = [p.spec_path / layout.RSNAP_DIR / RESTORING_MARKER for p in plans if not p.root.merge]
    try:
        if len(unchanged) < len(plans):
            settled.forget(ws)
        for marker in markers:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(snapshot_name)
        faults.point("restore.marker")
        for plan in plans:
            if not plan.settled:
                scan.StatCache(plan.spec_path).invalidate()
        bar = Progress("rsnap restore", total=sum(e.size for p in plans for e in p.write), enabled=progress)
        for plan in plans:
            _clear_the_way(plan, stats)
        timings.mark("prepare")
        # Fingerprint files (under temp names) and dep-info first, then sources normalized: together
        # they tell which units the coming build will rebuild, which the other files then leave out.
        held_back = _write_files(store, m, plans, stats, bar, damage, first=True)
        try:
            timings.mark("write_fingerprints")
            # Sources are normalized before fingerprints are put in place: an interruption before
            # this point leaves no fingerprint that could vouch for a source not yet re-timed.
            retime = mtimes.normalize(ws, m.sources, m.source_dirs, newest, m.source_links)
            timings.mark("sources")
            prediction, skip = _predict_and_skip(store, m, plans, held_back, retime, predict_with)
            held_back = _leave_out(skip, plans, held_back, bar)
            held_back = _leave_out_damage(damage, m, plans, held_back)
            timings.mark("predict")
            held_back += _write_files(store, m, plans, stats, bar, damage, first=False)
            held_back = _leave_out_damage(damage, m, plans, held_back)  # packs found damaged while writing
            timings.mark("write")
            for plan in plans:
                _write_links_and_meta(plan, stats, paths)
            timings.mark("links_meta")
            _put_in_place(held_back, plans)
        except BaseException:
            _discard(held_back)
            raise
        for plan in plans:
            if not plan.settled:
                _set_dir_meta(plan)
        rustc_info.put_back(paths, m.rustc_info)  # into a root this restore made
        bar.finish()
        timings.mark("fingerprints_dirs")
        if units_root_of(m) not in unchanged:  # a settled root keeps its record (it left out the same)
            partial.write_record(ws.target_dir, snapshot_name, m, skip)  # or forgets an older one
        dmg.write_record(ws.target_dir, snapshot_name, damage)  # or forgets an older one
        for plan in plans:
            if not plan.root.merge:
                info = plan.spec_path / layout.RSNAP_DIR / RESTORED_INFO
                info.write_text(json.dumps({"snapshot": snapshot_name, "key": m.key, "restored_ns": time.time_ns()}))
        rearmed: list = []
        arm_usage(ws, rearmed)  # before the stat cache is written: arming changes fingerprint files' ctimes
        timings.mark("arm")
        caches = {plan.root.name: _remember_restored(plan, others) for plan in plans if not plan.settled}
        _after_rearm([p for p in plans if p.settled], rearmed)
        timings.mark("stat_cache")
        if caches or rearmed:
            settled.retimed(unchanged, rearmed)
            settled.record(ws, snapshot_name, m, specs, caches, keep=unchanged,
                           absent=_absent(skip, damage))
        timings.mark("settled")
        faults.point("restore.done")
        for marker in markers:
            marker.unlink(missing_ok=True)
    except OSError as e:
        raise os_error("restore", e) from None
    return {"files_written": stats.files_written, "bytes_written": stats.bytes_written,
            "files_removed": stats.files_removed, "files_unchanged": stats.files_unchanged,
            "metadata_fixed": stats.metadata_fixed, "sources": retime.as_dict(), "settled_roots": sorted(unchanged),
            "clock_shift_seconds": round(shift / 1e9, 3),
            "skipped": skip.as_dict(), "prediction": prediction,  # popped by the caller
            "damaged": damage.as_dict() if damage else None, "damage_warning": damage.warning() if damage else None,
            "seconds": round(time.monotonic() - started, 3)}


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


def _write_links_and_meta(plan: RestorePlan, stats: RestoreStats, paths: dict[str, Path]) -> None:
    """After the data files (of every root): hard links (to files now in place, maybe in another
    root), symlinks, and the mode and mtime of files that were kept."""
    root = plan.spec_path
    trusted = _trusted_depth(plan)
    for e in plan.write:
        if e.type == "h":
            first = paths[e.link_root] / e.digest if e.link_root else root / e.digest
            _link_atomic(first, _inside(root, e.path, trusted))
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
    return target_layout.is_fingerprint_path(rel) or rel.endswith("/.cargo-ok")


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
        self.done: list[_File] = []  # the files written (the others: damaged packs)


TASK_COST = 4 << 20     # split restore work into tasks of about this cost (bytes written, plus...)
FILE_COST = 256 << 10   # ...this much per file: creating a file costs about as much as writing 256 KiB


def _written_first(rel: str) -> bool:
    """What the rebuild prediction reads (before the other data files are written): the files
    written last, and rustc's makefile dep-info of each unit (a registry unit's version)."""
    return _written_last(rel) or target_layout.is_makefile_depinfo(rel)


def _write_files(store, m: mf.Manifest, plans: list[RestorePlan], stats: RestoreStats, bar,
                 damage: dmg.Damage, first: bool) -> list[_File]:
    """Step 3: write the files written first (`first`, see `_written_first`), or the others,
    in size-balanced tasks on a thread pool. Data files are renamed into place; files written
    last are returned still under their temp names, for `_put_in_place` after sources are
    normalized. Dirs are made with the other files. A file whose pack is damaged (missing, or
    its read or verification fails) is not written: it goes into `damage` (rsnap.snapshot.damage)."""
    files = []
    root_names = {str(plan.spec_path): plan.root.name for plan in plans}
    for plan in plans:
        dirs = _SafeDirs(plan.spec_path, _trusted_depth(plan))
        root = str(plan.spec_path)
        for e in plan.write:
            if e.type == "d" and not first:
                dirs.make(e.path)
            elif e.type == "f" and _written_first(e.path) == first:
                if damage.packs and dmg.packs_of(m, e) & damage.packs.keys():
                    damage.file_failed(plan.root.name, e.path)
                    continue
                dirs.make(e.path.rpartition("/")[0])
                files.append(_File(root, e, _written_last(e.path)))
    held_back: list[_File] = []

    def run(task: _Task) -> _Task:
        task.done = []
        try:
            span = None if task.pack_id is None else _read_pack(store, damage, task.pack_id, task.start, task.end)
        except _PackDamage as e:
            damage.pack_failed(e.pack_id, e.error)
            for f in task.files:
                damage.file_failed(root_names[f.root], f.entry.path)
            return task
        for f in task.files:
            try:
                _write_atomic(f.dest, f.entry, _content_writer(store, m, f.entry, task, span, damage),
                              keep_temp=f.last)
            except _PackDamage as e:
                damage.pack_failed(e.pack_id, e.error)
                damage.file_failed(root_names[f.root], f.entry.path)
                continue
            task.done.append(f)
            if f.last:
                held_back.append(f)
            faults.point("restore.write")
        return task

    if not files:
        return held_back
    from concurrent.futures import ThreadPoolExecutor  # (+logging: ~10 ms) only when there is work
    from ..repository import transfer
    tasks = _tasks(m, files)
    store = transfer.reader(store, _ranges(m, tasks))  # a remote store: ranges fetched ahead, in parallel
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    try:
        for task in pool.map(run, tasks):
            for f in task.done:
                stats.files_written += 1
                stats.bytes_written += f.entry.size
                bar.advance(f.entry.size)
    except BaseException:
        pool.shutdown(cancel_futures=True)  # waits for the tasks already running
        _discard(held_back)
        raise
    finally:
        transfer.close(store)
    pool.shutdown()
    return held_back


def _predict_and_skip(store, m: mf.Manifest, plans: list[RestorePlan], held_back: list[_File],
                      retime, predict_with) -> tuple[dict | None, partial.Skip]:
    """The rebuild prediction, from the root holding cargo's units as it will be (fingerprint files
    written under temp names, sources normalized), and what the data writes may leave out
    (rsnap.snapshot.partial)."""
    skip = partial.Skip()
    plan = next((p for p in plans if p.root.name == units_root_of(m)), None)
    if predict_with is None or plan is None:
        return None, skip
    held = {f.entry.path: _temp_name(f.dest) for f in held_back if f.root == str(plan.spec_path)}
    tree = partial.PlannedTree(plan.spec_path, plan.root, held, store, m)
    prediction = predict_with(tree, retime.changed_paths)
    units = prediction.pop("_units", None)
    if units and prediction.get("rebuild") is not None and not plan.settled and partial.enabled():
        try:
            skip = partial.choose(plan.spec_path, plan.root, plan.write, units, prediction["rebuild"], held)
            partial.follow_links_across(skip, [p.root for p in plans if p is not plan])
        except Exception as e:  # noqa: BLE001 - a bug here must cost bytes written, not the restore
            if os.environ.get("RSNAP_DEBUG"):
                raise
            skip = partial.Skip()
            prediction.setdefault("notes", []).append(f"partial restore skipped: {type(e).__name__}: {e}")
    return prediction, skip


def _leave_out(skip: partial.Skip, plans: list[RestorePlan], held_back: list[_File], bar) -> list[_File]:
    """Drop what the partial restore leaves out from the plans (its fingerprint files, already
    written under temp names, are deleted: those units keep no fingerprint)."""
    if not skip:
        return held_back
    kept = held_back
    for plan in plans:
        gone = skip.absent().get(plan.root.name)
        if not gone:
            continue
        plan.write = [skip.rewrites.get(e.path, e) if plan.root.name == skip.root else e
                      for e in plan.write if e.path not in gone]
        root = str(plan.spec_path)
        for rel in gone:
            if _written_first(rel) and not _written_last(rel):
                _remove_path(plan.spec_path / rel)  # a left-out unit's dep-info, read by the prediction
        still = []
        for f in kept:
            if f.root == root and f.entry.path in gone:
                with contextlib.suppress(OSError):
                    os.unlink(_temp_name(f.dest))
            else:
                still.append(f)
        kept = still
    bar.total -= skip.bytes
    return kept


def _leave_out_damage(damage: dmg.Damage, m: mf.Manifest, plans: list[RestorePlan],
                      held_back: list[_File]) -> list[_File]:
    """Take what damaged packs touch out of each root's plan (rsnap.snapshot.damage): its files
    written under temp names are deleted, and what of it is on disk is removed."""
    if not damage.packs and not damage.failed:
        return held_back
    pending = [p for p in plans if not p.settled]
    while pending:  # a root's hard links into what another root left out go too, and so on
        plan = pending.pop(0)
        root = str(plan.spec_path)
        held = {f.entry.path: _temp_name(f.dest) for f in held_back if f.root == root}

        def units(plan=plan, held=held):
            from ..cargo import fingerprints as fpr
            return fpr.read_units(partial.PlannedTree(plan.spec_path, plan.root, held))
        out = dmg.leave_out(damage, m, plan, units)
        if not out:
            continue
        plan.fix_meta = [(e, have) for e, have in plan.fix_meta if e.path not in out]
        for f in held_back:
            if f.root == root and f.entry.path in out:
                with contextlib.suppress(OSError):
                    os.unlink(_temp_name(f.dest))
        held_back = [f for f in held_back if not (f.root == root and f.entry.path in out)]
        dmg.clear_on_disk(plan.spec_path, plan.root, out)
        for other in plans:
            links = [e.path for e in other.write if e.type == "h" and e.link_root == plan.root.name and e.digest in out]
            for path in links:
                damage.file_failed(other.root.name, path)
            if links and other not in pending:
                pending.append(other)
    return held_back


def _absent(skip: partial.Skip, damage: dmg.Damage) -> dict[str, set[str]]:
    """Per root, the entries this restore left out (the settled record keeps them absent)."""
    absent = {name: set(paths) for name, paths in skip.absent().items()}
    for name, paths in damage.left_out.items():
        absent.setdefault(name, set()).update(paths)
    return absent


def _ranges(m: mf.Manifest, tasks: list[_Task]):
    """(pack object, start, end) of every read the tasks will make, in the order they make them."""
    for task in tasks:
        if task.pack_id is not None:
            yield repo.pack_name(task.pack_id), task.start, task.end
        else:
            for pack_id, start, end, _run in repo._chunk_reads(m.blobs, m.chunks[task.files[0].entry.digest]):
                yield repo.pack_name(pack_id), start, end


class _PackDamage(Exception):
    """A read or verification of one pack failed while writing a file (rsnap.snapshot.damage)."""

    def __init__(self, pack_id: str, error: StoreError):
        super().__init__(str(error))
        self.pack_id, self.error = pack_id, error


def _read_pack(store, damage: dmg.Damage, pack_id: str, start: int, end: int):
    """A range of a pack, or _PackDamage. Once the store failed in a way retries did not cure
    (throttling, unreachable), the remaining packs are not read: they count as unreadable."""
    if damage.store_failing is not None:
        raise _PackDamage(pack_id, damage.store_failing)
    try:
        return memoryview(store.get_range(repo.pack_name(pack_id), start, end - start))
    except StoreError as err:
        if dmg.transient(err):
            damage.store_failing = err
        raise _PackDamage(pack_id, err) from None


def _content_writer(store, m: mf.Manifest, e: mf.Entry, task: _Task, span, damage: dmg.Damage) -> Callable[[int], None]:
    """What writes e's content into a file descriptor: its blob from the task's span of a pack,
    or its chunks (a chunked file is a task of its own and reads them itself). A failure of
    the pack raises _PackDamage naming it."""
    if task.pack_id is None:
        return lambda fd: _write_chunks(store, m, m.chunks[e.digest], fd, e.digest, e.size, damage)
    _pack, off, clen, _size = m.blobs[e.digest]
    frame = span[off - task.start:off - task.start + clen]

    def write(fd: int) -> None:
        try:
            repo.write_blob(frame, fd, e.digest, e.size, f"pack {task.pack_id}")
        except StoreError as err:
            raise _PackDamage(task.pack_id, err) from None
    return write


def _write_chunks(store, m: mf.Manifest, chunks: list[str], fd: int, digest: str, size: int,
                  damage: dmg.Damage) -> None:
    """repo.write_chunks, naming the pack that failed (each chunk is verified, then the whole file)."""
    import xxhash
    whole = xxhash.xxh3_128()
    for pack_id, start, end, run in repo._chunk_reads(m.blobs, chunks):
        span = _read_pack(store, damage, pack_id, start, end)
        try:
            for part in run:
                _pack, off, clen, psize = m.blobs[part]
                repo.write_blob(span[off - start:off - start + clen], fd, part, psize, f"pack {pack_id}", whole)
        except StoreError as err:
            raise _PackDamage(pack_id, err) from None
    if whole.hexdigest() != digest or sum(m.blobs[c][3] for c in chunks) != size:
        raise _PackDamage(m.blobs[chunks[0]][0], StoreError(
            f"file {digest} assembled from its chunks does not match its digest (corrupt)"))


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
    the temp name, with atime == mtime (armed for gc, see rsnap.cargo.usage: these are the fingerprint files)."""
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
    try:
        os.link(first, tmp, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        import shutil  # the target and build dirs on two filesystems: a copy, as cargo makes then
        shutil.copy2(first, tmp, follow_symlinks=False)
    try:
        os.replace(tmp, dest)
    except BaseException:
        _remove_path(tmp)
        raise


def _after_rearm(plans: list[RestorePlan], rearmed: list) -> None:
    """Settled roots keep their stat caches: move the entries of files arming re-timed along."""
    for plan in plans:
        prefix = f"{plan.spec_path}/"
        mine = [(p[len(prefix):], before, after) for p, before, after in rearmed if p.startswith(prefix)]
        if mine:
            cache = scan.StatCache(plan.spec_path).load()
            for rel, before, after in mine:
                cache.retimed(rel, before, after)
            cache.save()


def _remember_restored(plan: RestorePlan, others: dict) -> scan.StatCache:
    """Record restored files in the stat cache so the next save need not re-hash them.
    `others`: root name -> (path, file entries by path), for hard links into another root."""
    cache = scan.StatCache(plan.spec_path)
    if plan.root.merge:
        cache.load()
    digests = {e.path: e.digest for e in plan.root.entries if e.type == "f"}
    root = str(plan.spec_path)
    for e in plan.root.entries:
        if e.type == "h" and e.link_root:
            first = others.get(e.link_root, (None, {}))[1].get(e.digest)
            digest = first.digest if first is not None else None
        else:
            digest = digests.get(e.digest) if e.type == "h" else digests.get(e.path)
        if digest is not None:
            try:
                cache.remember_path(e.path, f"{root}/{e.path}", digest)
            except OSError:
                pass
    cache.save()
    return cache
