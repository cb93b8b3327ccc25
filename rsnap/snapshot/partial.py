"""Partial restore: leave out of the target dir what the coming build replaces or never reads
(docs/design.md, "Restoring only what the build reads").

Two kinds of entries are left out, decided after the fingerprint files are written (under temp
names) and the sources are normalized, before any other file is written:

* whole *units certain to rebuild*: a unit whose dep-info names a source whose content changed
  (or that is gone), and every unit depending on one of those. All of the unit's files go,
  fingerprint files included, and the hard-link groups (uplifts) touching it: cargo rebuilds a
  unit without a fingerprint, then its dependents, so this can never make a build stale. A
  later save simply does not have them: they are stale against the sources that save records,
  so any runner restoring that snapshot would rebuild them anyway.
* *idle incremental dirs*: `<profile>/incremental/<crate>-<id>/` of crates no predicted rebuild
  compiles. rustc validates incremental state and a missing dir only costs a full compile of that
  crate, so a wrong prediction costs time, never correctness. Restore lists them in
  `<target>/.rsnap/unmaterialized.json` (entries and blob locations) and a later save carries a
  listed dir over while it is still absent, so the next runner loses nothing.
"""
from __future__ import annotations

import json
import os

from ..cargo import fingerprints as fpr, target_layout
from ..cargo.layout import RSNAP_DIR
from ..errors import StoreError
from ..repository import manifest as mf

RECORD = "unmaterialized.json"
NON_COMPILING = ("run-build-script",)


def enabled() -> bool:
    return os.environ.get("RSNAP_FULL_RESTORE", "") in ("", "0", "false", "off", "no")


class PlannedTree(fpr.ManifestTree):
    """The target root as this restore will leave it, readable before most data files are written:
    fingerprint files from their temp names (written already), dep-info and kept files from disk,
    mtimes from the manifest (restore sets exactly those)."""

    def __init__(self, root_path, root: mf.Root, held: dict[str, str], store=None, m: mf.Manifest | None = None):
        super().__init__(root.entries)
        self.root = str(root_path)
        self.held = held     # rel path -> temp file holding its content
        self.store, self.m = store, m  # for files an earlier partial restore left out (a settled root)

    def read(self, rel: str) -> bytes | None:
        e = self._file(rel)
        if e is None:
            return None
        try:
            return fpr.read_noatime(self.held.get(rel) or f"{self.root}/{rel}")
        except OSError:
            pass
        if self.store is None or e.size > 1 << 20 or e.digest not in self.m.blobs:
            return None
        from ..repository import repo
        try:
            return repo.read_blob(self.store, self.m.blobs[e.digest], e.digest)
        except StoreError:  # a damaged pack: the file is unreadable, as if absent (rsnap.snapshot.damage)
            return None


class Skip:
    """What this restore leaves out of the root holding cargo's units (`root`), and of the others."""

    def __init__(self):
        self.root = "target"
        self.units: set[tuple[str, str]] = set()    # (profile dir, unit hash)
        self.crate_dirs: set[str] = set()           # <profile>/incremental/<crate>-<id>
        self.entries: list[mf.Entry] = []           # every entry of `root` left out
        self.rewrites: dict[str, mf.Entry] = {}     # entries written differently (split hard-link groups)
        self.across: dict[str, set[str]] = {}       # other root -> its hard links into what is left out
        self.bytes = 0

    def __bool__(self) -> bool:
        return bool(self.units or self.crate_dirs)

    def absent(self) -> dict[str, set[str]]:
        """root name -> paths this restore leaves out."""
        return {self.root: {e.path for e in self.entries}, **self.across}

    def as_dict(self) -> dict:
        return {"units": len(self.units), "incremental_dirs": len(self.crate_dirs),
                "files": sum(e.type in ("f", "h") for e in self.entries), "bytes": self.bytes}


def unit_of(rel: str, profiles: set[str]) -> tuple[str, str] | None:
    """(profile dir, unit hash) of a path a unit owns (rsnap.cargo.target_layout.unit_of)."""
    for profile in profiles:
        h = target_layout.unit_of(rel, profile)
        if h is not None:
            return profile, h
    return None


def crate_dir_of(rel: str, profiles: set[str]) -> tuple[str, str, str] | None:
    """(crate dir, profile dir, crate name) of a path in `<profile>/incremental/<crate>-<id>/`."""
    for profile in profiles:
        where = target_layout.incremental_dir_of(rel, profile)
        if where is not None:
            return where[0], profile, where[1]
    return None


def _crate(u: fpr.Unit) -> str | None:
    return None if u.kind in NON_COMPILING else u.target.replace("-", "_")


def certain_rebuilds(units: list[fpr.Unit], rebuild: list[dict], held: dict[str, str]) -> set[tuple[str, str]]:
    """Units whose sources changed (cargo compares mtimes and normalization pushed changed files
    past every artifact), closed over their dependents; only units whose hash file this restore
    writes (so none of them keeps a fingerprint on disk)."""
    changed = {e["unit"] for e in rebuild if e.get("cause") == "files"}
    skip = {u.hash_rel for u in units if u.unit_hash in changed and u.hash_rel in held}
    by_fp = {u.fingerprint: u for u in units}
    grew = True
    while grew:
        grew = False
        for u in units:
            if u.hash_rel in skip or u.hash_rel not in held:
                continue
            if any((d := by_fp.get(fp)) is not None and d.hash_rel in skip for _n, fp in u.dep_fingerprints()):
                skip.add(u.hash_rel)
                grew = True
    return {(u.profile_dir, u.unit_hash) for u in units if u.hash_rel in skip}


def choose(root_path, root: mf.Root, write: list[mf.Entry], units: list[fpr.Unit], rebuild: list[dict],
           held: dict[str, str]) -> Skip:
    """What to leave out of `write` (the target root's plan), given the restore's prediction."""
    skip = Skip()
    skip.root = root.name
    if not units:
        return skip
    profiles = {u.profile_dir for u in units}
    skip.units = certain_rebuilds(units, rebuild, held)
    predicted = {e["unit"] for e in rebuild} | {h for _p, h in skip.units}
    compiles, busy = set(), set()
    for u in units:
        if (c := _crate(u)) is not None:
            compiles.add((u.profile_dir, c))
            if u.unit_hash in predicted:
                busy.add((u.profile_dir, c))
    for e in write:
        where = crate_dir_of(e.path, profiles)
        if where is not None and where[0] not in skip.crate_dirs:
            crate_dir, profile, crate = where
            if (profile, crate) in compiles and (profile, crate) not in busy \
                    and not os.path.lexists(f"{root_path}/{crate_dir}"):
                skip.crate_dirs.add(crate_dir)
    entries = {e.path: e for e in root.entries}
    left_out = _left_out_paths(entries, write, skip, profiles)
    skip.entries = [_record_form(e, entries, left_out) for e in write if e.path in left_out]
    skip.bytes = sum(e.size for e in write if e.path in left_out and e.type == "f") - \
        sum(e.size for e in skip.rewrites.values() if e.type == "f")
    return skip


def _left_out_paths(entries: dict[str, mf.Entry], write: list[mf.Entry], skip: Skip, profiles: set[str]) -> set[str]:
    """Paths of `write` left out; fills `skip.rewrites` for hard-link groups split by it."""
    out = set()
    for e in write:
        owner = unit_of(e.path, profiles)
        if owner is not None and owner in skip.units:
            out.add(e.path)
        elif (where := crate_dir_of(e.path, profiles)) is not None and where[0] in skip.crate_dirs:
            out.add(e.path)
    groups: dict[str, list[str]] = {}
    for e in entries.values():
        if e.type == "h":
            groups.setdefault(e.digest, [e.digest]).append(e.path)
    in_write = {e.path for e in write}
    for primary, members in groups.items():
        if any(unit_of(p, profiles) in skip.units for p in members):
            # an uplift goes with its unit; a name in an incremental session that stays, stays
            out.update(p for p in members if p in in_write and (
                (where := crate_dir_of(p, profiles)) is None or where[0] in skip.crate_dirs))
        needed = [p for p in members if p not in out]
        if len(needed) == len(members) or not needed or primary not in out:
            continue
        # rustc hard-links a crate's .rmeta into its incremental session: the deps/ name stays,
        # as a file of its own (the left-out session keeps its name in the record, as a file too)
        first, content = needed[0], entries[primary]
        skip.rewrites[first] = mf.Entry(first, "f", content.mode, content.size, entries[first].mtime_ns, content.digest)
        for p in needed[1:]:
            skip.rewrites[p] = entries[p]._replace(digest=first)
    return out


def follow_links_across(skip: Skip, other_roots: list[mf.Root]) -> None:
    """Hard links of other roots (the target dir's uplifts) into files left out go with them."""
    gone = {e.path for e in skip.entries}
    for r in other_roots:
        paths = {e.path for e in r.entries if e.type == "h" and e.link_root == skip.root and e.digest in gone}
        if paths:
            skip.across[r.name] = paths


def _record_form(e: mf.Entry, entries: dict[str, mf.Entry], left_out: set[str]) -> mf.Entry:
    """A left-out hard link whose file is written (or kept) stands on its own in the record."""
    if e.type == "h" and e.digest not in left_out:
        content = entries[e.digest]
        return mf.Entry(e.path, "f", e.mode, content.size, e.mtime_ns, content.digest)
    return e


# ---------------------------------------------------------------- the record a save carries over

def record_path(target_dir) -> str:
    return os.path.join(str(target_dir), RSNAP_DIR, RECORD)


def write_record(target_dir, snapshot: str, m: mf.Manifest, skip: Skip) -> None:
    """Remember the idle incremental dirs left out (entries, blob locations) for the next save."""
    path = record_path(target_dir)
    if not skip.crate_dirs:
        forget(target_dir)
        return
    entries = [e.to_list() for e in skip.entries if _under_any(e.path, skip.crate_dirs)]
    blobs, chunks = {}, {}
    for e in skip.entries:
        if e.type != "f":
            continue
        if e.digest in m.chunks:
            chunks[e.digest] = m.chunks[e.digest]
            for part in m.chunks[e.digest]:
                blobs[part] = m.blobs[part]
        elif e.digest in m.blobs:
            blobs[e.digest] = m.blobs[e.digest]
    doc = {"snapshot": snapshot, "crate_dirs": sorted(skip.crate_dirs), "entries": entries,
           "blobs": blobs, "chunks": chunks}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def _profile_of_dir(crate_dir: str) -> str:
    return crate_dir.rsplit("/incremental/", 1)[0] if "/incremental/" in crate_dir else ""


def forget(target_dir) -> None:
    try:
        os.unlink(record_path(target_dir))
    except FileNotFoundError:
        pass


def carried_over(target_dir, units_dir, root_entries: list[mf.Entry]) -> tuple[list[str], list[mf.Entry], dict, dict]:
    """For a save: the entries, blob locations and chunk lists of the incremental dirs the last
    restore left out that are still absent (rustc did not recompile those crates) and whose crate
    a unit in the target dir still compiles. Any doubt (unreadable record, an entry in conflict
    with the walk) carries nothing over: the cost is a cold incremental compile, never a wrong one.
    The record is in the target dir's rsnap state; its dirs are in `units_dir` (the build dir).
    Returns (crate dirs, entries, blobs, chunks)."""
    try:
        with open(record_path(target_dir)) as f:
            doc = json.load(f)
        dirs = [d for d in doc["crate_dirs"] if isinstance(d, str)]
        raw_entries, blobs, chunks = doc["entries"], doc["blobs"], doc["chunks"]
    except (OSError, ValueError, KeyError, TypeError):
        return [], [], {}, {}
    on_disk = {e.path for e in root_entries}
    live = _crates_with_units(units_dir)
    keep = set()
    for d in dirs:
        profile = _profile_of_dir(d)
        crate = d.rsplit("/", 1)[-1].rsplit("-", 1)[0]
        if not os.path.lexists(os.path.join(str(units_dir), d)) and (profile, crate) in live and d not in on_disk:
            keep.add(d)
    try:  # the record is checked like a manifest read from the store: a save must not write a bad one
        blobs, chunks = mf._check_blobs(blobs), mf._check_chunks(chunks, blobs)
        sizes = {digest: mf.chunked_size(parts, blobs) for digest, parts in chunks.items()}
        carried = [e for e in (mf._entry(x, blobs, sizes) for x in raw_entries if isinstance(x, list) and x
                               and isinstance(x[0], str) and _under_any(x[0], keep))]
    except (mf.FormatError, KeyError, TypeError, ValueError):
        return [], [], {}, {}
    paths = {e.path for e in carried}
    if any(e.type == "h" and e.digest not in paths for e in carried) or paths & on_disk:
        return [], [], {}, {}
    used_chunks = {e.digest: chunks[e.digest] for e in carried if e.type == "f" and e.digest in chunks}
    digests = {e.digest for e in carried if e.type == "f" and e.digest not in chunks}
    digests |= {p for parts in used_chunks.values() for p in parts}
    return sorted(keep), carried, {d: blobs[d] for d in digests}, used_chunks


def _under_any(path: str, dirs: set[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def _crates_with_units(units_dir) -> set[tuple[str, str]]:
    """(profile dir, crate) of every compiling unit whose hash file is in the build dir now."""
    return {(profile, target.replace("-", "_"))
            for _rel, _fp_dir, _pkg, _hash, profile, kind, target in fpr.hash_files(fpr.DiskTree(units_dir))
            if kind not in NON_COMPILING}
