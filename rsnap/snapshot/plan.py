"""Restore step 1: compare a snapshot root with what is on disk, entry by entry, into what to
write, what to remove and what only needs its mode or mtime fixed."""
from __future__ import annotations

from pathlib import Path

from ..cargo import target_layout
from ..digest import hash_file
from ..repository import manifest as mf
from . import scan

class RestorePlan:
    def __init__(self, spec_path: Path, root: mf.Root):
        self.spec_path, self.root = spec_path, root
        self.write: list[mf.Entry] = []
        self.fix_meta: list[tuple[mf.Entry, scan.Found]] = []
        self.remove: list[scan.Found] = []
        self.unchanged = 0
        self.linked_across: list[mf.Entry] = []  # hard links into another root counted unchanged
        self.settled = False  # on disk exactly as last restored/saved (rsnap.snapshot.settled): nothing to do


def settled_plan(spec_path: Path, root: mf.Root) -> RestorePlan:
    plan = RestorePlan(spec_path=spec_path, root=root)
    plan.unchanged, plan.settled = len(root.entries), True
    return plan


def merge_subtrees(root: mf.Root) -> list[str]:
    """Top-level trees a merge root covers, as recorded (registry/index, git/db, ...)."""
    tops = set()
    for e in root.entries:
        parts = e.path.split("/")
        tops.add("/".join(parts[:2]) if parts[0] in ("registry", "git") and len(parts) > 1 else parts[0])
    return sorted(tops)


def plan_root(path: Path, root: mf.Root, subtrees, exclude, others: dict | None = None) -> RestorePlan:
    """`others`: root name -> (its path, its file entries by path), for hard links into another root."""
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
        elif e.type == "f" and target_layout.is_fingerprint_path(e.path) and (
                have.mtime_ns != e.mtime_ns or have.mode != e.mode):
            plan.write.append(e)  # cargo compares fingerprint mtimes: invalidate first, write last
        else:
            plan.unchanged += 1
            if e.type != "l" and (have.mtime_ns != e.mtime_ns or have.mode != e.mode):
                plan.fix_meta.append((e, have))
    rewritten = {e.path for e in plan.write}
    files = {e.path: e for e in root.entries if e.type == "f"}
    for e in links:
        have, first = existing.pop(e.path, None), on_disk.get(e.digest)
        link_files = files
        if e.link_root:
            other_path, link_files = (others or {}).get(e.link_root, (None, {}))
            first, rewritten_there = _lstat_found(other_path, e.digest), False
        else:
            rewritten_there = e.digest in rewritten
        if have is not None and have.type == "f" and first is not None and have.ino == first.ino \
                and not rewritten_there:
            plan.unchanged += 1
            if e.link_root:
                plan.linked_across.append(e)  # unless that root rewrites the file: relink_across()
            continue
        alone = mf.Entry(e.path, "f", e.mode, e.size, e.mtime_ns, link_files[e.digest].digest) \
            if e.digest in link_files else None
        if have is not None and have.type == "f" and first is None and alone is not None and \
                _same_content(path, alone, have, cache, root.merge):
            plan.unchanged += 1  # a file of its own, as a partial restore leaves a split hard link
            if have.mtime_ns != e.mtime_ns or have.mode != e.mode:
                plan.fix_meta.append((alone, have))
            continue
        if have is not None and have.type != "f":
            plan.remove.append(have)  # a regular file is replaced by the link atomically
        plan.write.append(e)
    if not root.merge:
        plan.remove.extend(existing.values())
    return plan


def _lstat_found(root: Path | None, rel: str):
    if root is None:
        return None
    try:
        st = (root / rel).lstat()
    except OSError:
        return None
    return scan.Found(rel, "f", 0, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def relink_across(plans: list[RestorePlan]) -> None:
    """A hard link into another root whose file that root rewrites must be made again."""
    rewritten = {(p.root.name, e.path) for p in plans for e in p.write}
    for plan in plans:
        for e in plan.linked_across:
            if (e.link_root, e.digest) in rewritten:
                plan.unchanged -= 1
                plan.write.append(e)
        plan.linked_across = []


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
