"""Damage: a pack the restore cannot use costs only the files in it (docs/design.md, "Failures").

A pack is damaged when the store lacks it (found before any data is written, with the store's
`missing`) or when reading it fails: a truncated range, a read error past the retries, a blob
whose zstd frame or xxh3 does not verify. The files whose blobs lie in it are never written,
and what depends on them is left out with them, so that nothing on disk vouches for a file
that is not there:

* target and build dirs: every unit owning such a file (unit_of, as the partial restore leaves
  units out), the units depending on it (by the dependency fingerprints in their fingerprint
  JSON), the hard-link groups touching any of their files, and any incremental crate dir with
  a damaged file, whole. A unit left out keeps no fingerprint, so cargo rebuilds it, then its
  dependents; a missing incremental dir only costs that crate a full compile.
* $CARGO_HOME: an extracted crate (registry/src/<index>/<crate>/), a git checkout
  (git/checkouts/<repo>/<rev>/) or a git database (git/db/<repo>/) with a damaged file is left
  out whole and removed from disk, so cargo extracts, checks out or clones it again; another
  damaged file (a .crate download, an index cache entry) is simply absent, and cargo downloads
  it again when the build needs it (an --offline build then fails as on a cold CARGO_HOME).
* any other file (the target dir's .rustc_info.json, an uplifted dep-info) is simply absent.

Restore records the damaged packs in <target>/.rsnap/damaged.json; the next save does not
dedupe against blobs in them (a missing pack it sees itself, a corrupt one it could not).
"""
from __future__ import annotations

import json
import os
import threading

from .. import errors
from ..cargo import fingerprints as fpr
from ..cargo.layout import RSNAP_DIR
from ..repository import manifest as mf
from . import partial

RECORD = "damaged.json"
_HOME_GROUP_DEPTH = {("registry", "src"): 4, ("git", "checkouts"): 4, ("git", "db"): 3}


class Damage:
    """The damaged packs of one restore and what was left out because of them."""

    def __init__(self):
        self.packs: dict[str, str] = {}           # pack id -> "missing", "corrupt" or "unreadable"
        self.messages: dict[str, str] = {}        # pack id -> the first error met reading it
        self.failed: dict[str, set[str]] = {}     # root name -> paths whose write failed
        self.left_out: dict[str, set[str]] = {}   # root name -> every path left out for the damage
        self.units: set[tuple[str, str, str]] = set()  # (root name, profile dir, unit hash)
        self.store_failing: Exception | None = None     # a failure retries did not cure: read no more
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.packs)

    def pack_failed(self, pack_id: str, error: Exception) -> None:
        text = str(error)
        kind = "missing" if isinstance(error, errors.NotFoundError) else \
            "corrupt" if not isinstance(error, (errors.TransientStoreError, errors.PermanentStoreError)) \
            and ("corrupt" in text or "truncated" in text) else "unreadable"
        with self._lock:
            self.packs.setdefault(pack_id, kind)
            self.messages.setdefault(pack_id, text)

    def file_failed(self, root: str, path: str) -> None:
        with self._lock:
            self.failed.setdefault(root, set()).add(path)

    def as_dict(self) -> dict:
        kinds = list(self.packs.values())
        files = sum(len(v) for v in self.left_out.values())
        return {"packs": sorted(self.packs), "missing": kinds.count("missing"), "corrupt": kinds.count("corrupt"),
                "unreadable": kinds.count("unreadable"), "units_left_out": len(self.units), "entries_left_out": files}

    def warning(self) -> str:
        """The one line a restore prints about the damage."""
        d = self.as_dict()
        what = ", ".join(f"{d[k]} {k}" for k in ("missing", "corrupt", "unreadable") if d[k])
        first = next(iter(self.messages.values()), "")
        return (f"rsnap: warning: {len(self.packs)} damaged pack(s) in the store ({what}); left out "
                f"{d['units_left_out']} units and {d['entries_left_out']} entries in all, which cargo will "
                f"rebuild or fetch; the next save stores them again (first error: {first})")


def transient(error: Exception) -> bool:
    """A failure of the store rather than of the pack (throttling, unreachable, timed out)."""
    return isinstance(error, errors.TransientStoreError)


def packs_of(m: mf.Manifest, e: mf.Entry) -> set[str]:
    """The packs holding a file entry's content (a chunked file's chunks may lie in several)."""
    if e.type != "f":
        return set()
    if e.digest in m.chunks:
        return {m.blobs[part][0] for part in m.chunks[e.digest]}
    loc = m.blobs.get(e.digest)
    return {loc[0]} if loc else set()


def find_missing(store, m: mf.Manifest, plans, damage: Damage) -> None:
    """Before anything is written: the packs the plans need that the store lacks."""
    from ..repository import repo
    needed = sorted({p for plan in plans for e in plan.write for p in packs_of(m, e)})
    for name in store.missing([repo.pack_name(p) for p in needed]):
        pack_id = name.rsplit("/", 1)[-1]
        damage.packs.setdefault(pack_id, "missing")
        damage.messages.setdefault(pack_id, f"store object {name} is missing from {store.url}")


def leave_out(damage: Damage, m: mf.Manifest, plan, units_of_root) -> set[str]:
    """Take what the damage touches out of `plan.write` (see the module doc); returns the paths
    newly left out. `units_of_root()` reads the root's units (called only when there is damage)."""
    name = plan.root.name
    seeds = set(damage.failed.get(name, ()))
    if damage.packs:
        seeds |= {e.path for e in plan.write if packs_of(m, e) & damage.packs.keys()}
    seeds -= damage.left_out.get(name, set())
    if not seeds:
        return set()
    if plan.root.merge:
        out = _home_closure(plan.root.entries, seeds)
    else:
        out, units = _unit_closure(plan.root.entries, seeds, units_of_root())
        damage.units |= {(name, profile, h) for profile, h in units}
    out -= damage.left_out.get(name, set())
    damage.left_out.setdefault(name, set()).update(out)
    plan.write = [e for e in plan.write if e.path not in out]
    return out


def _unit_closure(entries: list[mf.Entry], seeds: set[str], units: list[fpr.Unit]):
    """(paths, units) left out of a target or build root for damaged files `seeds`."""
    profiles = {profile for _r, _d, _p, _h, profile, _k, _t in fpr.hash_files(fpr.ManifestTree(entries))}
    by_unit: dict[tuple[str, str], list[str]] = {}
    by_crate_dir: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {}
    for e in entries:
        if (owner := partial.unit_of(e.path, profiles)) is not None:
            by_unit.setdefault(owner, []).append(e.path)
        if (where := partial.crate_dir_of(e.path, profiles)) is not None:
            by_crate_dir.setdefault(where[0], []).append(e.path)
        if e.type == "h" and not e.link_root:  # (a link into another root: see restore._leave_out_damage)
            groups.setdefault(e.digest, [e.digest]).append(e.path)
    group_of = {p: primary for primary, members in groups.items() for p in members}
    by_fp = {u.fingerprint: (u.profile_dir, u.unit_hash) for u in units if u.fingerprint}
    dependents: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for u in units:
        for _n, fp in u.dep_fingerprints():
            if fp in by_fp:
                dependents.setdefault(by_fp[fp], []).append((u.profile_dir, u.unit_hash))
    out, units_out, dirs_out = set(), set(), set()
    todo = list(seeds)

    def add_unit(owner):
        stack = [owner]
        while stack:
            o = stack.pop()
            if o not in units_out:
                units_out.add(o)
                todo.extend(by_unit.get(o, ()))
                stack.extend(dependents.get(o, ()))

    while todo:
        path = todo.pop()
        if path in out:
            continue
        out.add(path)
        if (owner := partial.unit_of(path, profiles)) is not None:
            add_unit(owner)
        if (where := partial.crate_dir_of(path, profiles)) is not None and where[0] not in dirs_out:
            dirs_out.add(where[0])
            todo.extend(by_crate_dir[where[0]])
        if path in group_of:
            todo.extend(groups[group_of[path]])
    return out, units_out


def home_group(rel: str) -> str | None:
    """The $CARGO_HOME dir cargo treats as one whole: an extracted crate, a checkout, a git db."""
    parts = rel.split("/")
    depth = _HOME_GROUP_DEPTH.get(tuple(parts[:2]))
    return "/".join(parts[:depth - 1]) if depth and len(parts) >= depth else None


def _home_closure(entries: list[mf.Entry], seeds: set[str]) -> set[str]:
    out = set(seeds)
    groups = {g for p in seeds if (g := home_group(p)) is not None}
    if groups:
        out |= {e.path for e in entries if home_group(e.path) in groups}
    return out | {e.path for e in entries if e.type == "h" and not e.link_root and e.digest in out}


def clear_on_disk(root_path, root: mf.Root, paths: set[str]) -> None:
    """Remove what a restore left out for damage and already wrote, or found on disk: a damaged
    unit keeps no fingerprint and no file of another content; a $CARGO_HOME group goes whole."""
    import shutil  # only a damaged restore needs it
    groups = {g for p in paths if (g := home_group(p)) is not None} if root.merge else set()
    for group in sorted(groups):
        shutil.rmtree(f"{root_path}/{group}", ignore_errors=True)
    for rel in sorted(paths, key=lambda p: p.count("/"), reverse=True):  # files before their dirs
        if root.merge and home_group(rel) is not None:
            continue
        try:
            os.unlink(f"{root_path}/{rel}")
        except IsADirectoryError:
            shutil.rmtree(f"{root_path}/{rel}", ignore_errors=True)
        except OSError:
            pass


# ---------------------------------------------------------------- the record the next save reads

def record_path(target_dir) -> str:
    return os.path.join(str(target_dir), RSNAP_DIR, RECORD)


def write_record(target_dir, snapshot: str, damage: Damage) -> None:
    path = record_path(target_dir)
    if not damage:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"snapshot": snapshot, "packs": damage.packs}, f)
    os.replace(tmp, path)


def damaged_packs(target_dir) -> set[str]:
    """Packs the last restore into this target dir found damaged (an unreadable record: none)."""
    try:
        with open(record_path(target_dir)) as f:
            packs = json.load(f)["packs"]
        return {p for p in packs if isinstance(p, str)}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
