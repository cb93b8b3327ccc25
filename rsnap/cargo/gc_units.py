"""GC of target-dir units: the inventory of what each unit hash owns (both layouts, uplifts,
orphans) and the liveness decisions on it (see rsnap.cargo.gc, model points 1-3 and 5)."""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from ..errors import RsnapError
from . import keys, usage
from .fingerprints import read_noatime
from .gc_fs import TRASH, Item, item_of, scandir, tree_bytes
from .gc_incremental import CrateDir, scan_crate_dir
from .hashes import cargo_hash_str
from .layout import EXCLUDED_TARGET_NAMES, RSNAP_DIR
from .target_layout import (LEGACY, NEW, UNIT_DIRS, hashed_file, is_unit_hash, profile_dirs, split_hashed_name,
                            unit_dirs)
# fingerprint hash-file names: [test-|doc-|run-]<kind description>-<target name>
FP_FILE = re.compile(r"^(?:test-|doc-|run-)?(?:lib|bin|integration-test|build-script|bench|example)-(?P<target>.+)$")
RUSTC_TEMP = re.compile(r"^(rmeta|rustc)[0-9A-Za-z]{6}$")


def current_rustc_values(ws) -> dict[int, str]:
    """rustc hash values cargo would record now: `rustc -vV` here and the target's .rustc_info.json."""
    found: dict[int, str] = {}
    try:
        text = keys.rustc_version(str(ws.root))
        if text.startswith("rustc "):
            found[cargo_hash_str(text)] = "rustc -vV"
    except RsnapError:
        pass
    for root in usage.roots(ws):
        for name in (".rustc_info.json", ".rustc-info.json"):
            try:
                info = json.loads((root / name).read_text())
            except (OSError, ValueError):
                continue
            for out in (info.get("outputs") or {}).values():
                text = out.get("stdout") or ""
                if text.startswith("rustc ") and "\nrelease: " in text:
                    found.setdefault(cargo_hash_str(text), name)
    return found


class Unit:
    def __init__(self, profile: Path, hash: str, pkg: str, layout: str, fp_dir: Path):
        self.profile, self.hash, self.pkg = profile, hash, pkg
        self.layout = layout                  # target_layout.LEGACY | NEW
        self.fp_dir = fp_dir                  # removed first
        self.members: list[Item] = []         # everything else the hash owns
        self.fp_bytes = 0
        self.rustc: int | None = None
        self.fp_values: set[int] = set()      # this unit's fingerprint hash value(s)
        self.dep_values: set[int] = set()     # fingerprint values of its dependencies
        self.crates: set[str] = set()         # crate names it compiles (incremental dirs)
        self.targets: set[str] = set()        # target names (crate spelling), any mode
        self.compiles = False
        self.invoked_ns: int | None = None
        self.built_ns = 0                     # newest mtime of its fingerprint files
        self.used_ns = 0                      # newest max(atime, mtime) of the files cargo reads
        self.uplifts: list[Item] = []
        self.incremental: list[CrateDir] = []
        self.keep = True
        self.reason = ""
        self.current = False                  # used or built since the epoch: never evicted

    @property
    def key(self) -> tuple[str, str]:
        """What the cargo log records: (profile dir, hash)."""
        return str(self.profile), self.hash

    @property
    def uid(self) -> tuple[str, str, str]:
        return str(self.profile), self.hash, self.layout

    def bytes(self) -> int:
        return (self.fp_bytes + sum(i.bytes for i in self.members) + sum(i.bytes for i in self.uplifts)
                + sum(c.kept_bytes for c in self.incremental if c.owner is self))


class Inventory:
    def __init__(self, roots: list[Path]):
        self.roots = roots
        self.profiles: list[Path] = []
        self.units: dict[tuple[str, str, str], Unit] = {}
        self.crate_dirs: list[CrateDir] = []
        self.orphans: list[Item] = []
        self.working: list[Item] = []
        self.unowned_uplifts: list[Item] = []
        self.shared: list[tuple[Item, list[Unit]]] = []   # unhashed outputs (cdylib...)
        self.other_bytes = 0                  # files GC does not classify (kept)
        self.trash: list[Item] = []


def _load_fingerprint(u: Unit) -> None:
    """Fill rustc, fingerprint values, deps, crates, timestamps from the unit's fingerprint dir."""
    for de in scandir(u.fp_dir):
        try:
            st = de.stat(follow_symlinks=False)
        except OSError:
            continue
        u.fp_bytes += st.st_size
        name = de.name
        u.built_ns = max(u.built_ns, st.st_mtime_ns)
        if name.endswith(".json"):
            try:
                data = json.loads(read_noatime(Path(de.path)))
                if isinstance(data.get("rustc"), int):
                    u.rustc = data["rustc"] if u.rustc in (None, 0) else u.rustc
                for dep in data.get("deps") or []:
                    if isinstance(dep, list) and dep and isinstance(dep[-1], int):
                        u.dep_values.add(dep[-1])
            except (OSError, ValueError, AttributeError):
                pass
            continue
        u.used_ns = max(u.used_ns, st.st_mtime_ns, st.st_atime_ns)
        if name == "invoked.timestamp":
            u.invoked_ns = st.st_mtime_ns
            continue
        if name.startswith("dep-"):
            u.compiles = True
            continue
        if name.startswith("output-"):
            continue
        m = FP_FILE.match(name)
        if m:
            u.targets.add(m.group("target").replace("-", "_"))
            if not name.startswith(("run-", "doc-")):
                u.crates.add(m.group("target").replace("-", "_"))
            try:
                raw = read_noatime(Path(de.path)).strip()
                if len(raw) == 16:
                    u.fp_values.add(struct.unpack("<Q", bytes.fromhex(raw.decode()))[0])
            except (OSError, ValueError, UnicodeDecodeError):
                pass


def artifact_dirs(roots: list[Path], profile: Path) -> list[Path]:
    """Where cargo uplifts a profile's outputs: the profile dir itself, and with a separate
    build dir (`build.build-dir`) the same relative dir under the target dir (roots[0])."""
    out = [profile]
    if len(roots) > 1 and not profile.is_relative_to(roots[0]):
        for r in roots[1:]:
            if profile.is_relative_to(r):
                other = roots[0] / profile.relative_to(r)
                if other.is_dir():
                    out.append(other)
    return out


def inventory(roots: list[Path]) -> Inventory:
    """roots[0] is the target dir, roots[1] (if any) the separate build dir."""
    inv = Inventory(roots=list(roots))
    for root in roots:
        trash = root / RSNAP_DIR / TRASH
        if trash.is_dir():
            inv.trash.append(item_of(trash))
        for profile in profile_dirs(root):
            inv.profiles.append(profile)
            _scan_profile(inv, profile, artifact_dirs(roots, profile))
    return inv


def _scan_profile(inv: Inventory, profile: Path, uplift_dirs: list[Path] | None = None) -> None:
    v1: dict[str, Unit] = {}
    v2: dict[str, Unit] = {}
    for layout, pkg, h, fp, unit_dir in unit_dirs(profile):
        if layout == LEGACY:
            v1[h] = Unit(profile, h, pkg, LEGACY, fp)
        elif h not in v2:
            u = v2[h] = Unit(profile, h, pkg, NEW, fp)
            u.members.extend(item_of(Path(x.path)) for x in scandir(unit_dir) if x.name != "fingerprint")
            u.members.append(Item(unit_dir, 0, True))   # the unit dir itself, empty by then
    # build/: legacy <pkg>-<hash>/, new <pkg>/<hash>/ without a fingerprint dir
    for de in scandir(profile / "build"):
        if not de.is_dir(follow_symlinks=False):
            continue
        named = split_hashed_name(de.name)
        if named:
            (v1[named[1]].members if named[1] in v1 else inv.orphans).append(item_of(Path(de.path)))
            continue
        for h in scandir(Path(de.path)):
            if h.is_dir(follow_symlinks=False) and h.name not in v2 and is_unit_hash(h.name):
                inv.orphans.append(item_of(Path(h.path)))
    # deps/, examples/, native/: <name>-<hash>[.ext]
    unhashed_examples, unhashed_deps = [], []
    for sub in UNIT_DIRS:
        for de in scandir(profile / sub):
            named = hashed_file(de.name)
            if named:
                (v1[named[1]].members if named[1] in v1 else inv.orphans).append(item_of(Path(de.path)))
            elif sub == "deps" and RUSTC_TEMP.match(de.name):
                inv.working.append(item_of(Path(de.path)))
            elif sub == "examples" and de.is_file(follow_symlinks=False):
                unhashed_examples.append(Path(de.path))
            elif sub == "deps" and de.is_file(follow_symlinks=False):
                unhashed_deps.append(Path(de.path))
            else:
                inv.other_bytes += tree_bytes(Path(de.path))
    units = list(v1.values()) + list(v2.values())
    for u in units:
        _load_fingerprint(u)
        inv.units[u.uid] = u
    # unhashed outputs (path-package cdylib/dylib: deps/libfoo.so, deps/foo.d) belong to every
    # unit compiling that crate here; they go only when all of those go
    by_crate: dict[str, list[Unit]] = {}
    for u in units:
        for c in u.crates:
            by_crate.setdefault(c, []).append(u)
    shared_index: dict[tuple, list[Unit]] = {}
    for p in unhashed_deps:
        stem = p.name.split(".", 1)[0]
        owners = by_crate.get(stem) or (by_crate.get(stem[3:]) if stem.startswith("lib") else None)
        if not owners:
            inv.other_bytes += tree_bytes(p)
            continue
        it = item_of(p)
        inv.shared.append((it, owners))
        try:
            st = os.lstat(p)
            shared_index[(st.st_dev, st.st_ino)] = owners
            shared_index.setdefault((st.st_size, st.st_mtime_ns), owners)
        except OSError:
            pass
    # uplifts: files directly in the profile dir and unhashed examples
    by_inode, by_stat = {}, {}
    for u in units:
        for it in u.members:
            if u.layout == NEW:
                paths = [Path(x.path) for x in scandir(it.path)] if it.path.name == "out" else []
            else:
                paths = [it.path]
            for p in paths:
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not os.path.isfile(p):
                    continue
                by_inode[(st.st_dev, st.st_ino)] = u
                by_stat.setdefault((st.st_size, st.st_mtime_ns), u)
    candidates = list(unhashed_examples)
    for d in uplift_dirs or [profile]:
        candidates += [Path(de.path) for de in scandir(d)
                       if de.is_file(follow_symlinks=False) and de.name not in EXCLUDED_TARGET_NAMES
                       and not de.name.startswith(".") and de.name != "CACHEDIR.TAG"]
        if d != profile:
            candidates += [Path(de.path) for de in scandir(d / "examples") if de.is_file(follow_symlinks=False)]
    owner_of: dict[Path, Unit | None] = {}
    for p in candidates:
        if p.suffix == ".d":
            continue
        try:
            st = os.lstat(p)
        except OSError:
            continue
        owner_of[p] = (by_inode.get((st.st_dev, st.st_ino)) or by_stat.get((st.st_size, st.st_mtime_ns))
                       or shared_index.get((st.st_dev, st.st_ino)) or shared_index.get((st.st_size, st.st_mtime_ns)))
    for p in candidates:
        if p.suffix != ".d":
            continue
        owner = None
        for q, u in owner_of.items():
            if q.parent == p.parent and (q.stem == p.stem or q.name == p.stem):
                owner = u
                break
        owner_of[p] = owner
    for p, u in owner_of.items():
        it = item_of(p)
        if isinstance(u, list):
            inv.shared.append((it, u))
        else:
            (u.uplifts if u else inv.unowned_uplifts).append(it)
    # incremental
    for de in scandir(profile / "incremental"):
        if de.is_dir(follow_symlinks=False):
            inv.crate_dirs.append(scan_crate_dir(profile, Path(de.path)))
        else:
            inv.working.append(item_of(Path(de.path)))


def decide_units(inv: Inventory, sig: usage.Signals, ws, roots: list[Path]) -> dict:
    units = list(inv.units.values())
    epoch = sig.epoch_ns
    # usage
    resolved_log = set(sig.log_units)
    for un in sig.log_unresolved:   # e.g. doc units: keep every unit of that package/target
        tname = (un.get("target") or "").replace("-", "_")
        pkg = _pkg_name(un.get("package_id") or "")
        for u in units:
            if u.pkg == pkg and (not tname or tname in u.targets or not u.targets):
                resolved_log.add(u.key)
    built_since = {u.key for u in units if epoch is not None and u.built_ns >= epoch - usage.SLACK_NS}
    # the log is complete only if everything built since the epoch is in it
    log_ok = (sig.log_invocations > 0 and sig.log_failed == 0 and built_since <= resolved_log)
    sig.log = log_ok
    reliable = epoch is not None and (sig.atime or log_ok)
    if reliable and not any(u.key in built_since or (sig.atime and u.used_ns >= epoch - usage.SLACK_NS)
                            or (log_ok and u.key in resolved_log) for u in units):
        # no build since the restore (e.g. `rsnap restore && rsnap save`, or a retried save):
        # "unused" would mean everything, so nothing is known to be stale
        reliable, sig.no_build_since_epoch = False, True
    for u in units:
        if u.key in built_since:
            u.current, u.reason = True, "built-since-restore"
        elif epoch is not None and sig.atime and u.used_ns >= epoch - usage.SLACK_NS:
            u.current, u.reason = True, "used"
        elif log_ok and u.key in resolved_log:
            u.current, u.reason = True, "used"
        elif reliable:
            u.keep, u.reason = False, "stale-unused"
        else:
            u.reason = "no-signal"
    # dependencies of kept units are kept (and current if their dependent is)
    by_value: dict[int, list[Unit]] = {}
    for u in units:
        for v in u.fp_values:
            by_value.setdefault(v, []).append(u)
    stack = [u for u in units if u.keep]
    while stack:
        u = stack.pop()
        for v in u.dep_values:
            for d in by_value.get(v, ()):
                if not d.keep or (u.current and not d.current):
                    d.keep = True
                    if u.current and not d.current:
                        d.current = True
                        d.reason = "dependency-of-used"
                    elif d.reason == "stale-unused":
                        d.reason = "dependency-of-kept"
                    stack.append(d)
    # toolchains
    computed = current_rustc_values(ws)
    on_disk = {u.rustc for u in units if u.rustc is not None}
    keep_rustc = {0} | {u.rustc for u in units if u.current and u.rustc is not None}
    confirmed = {v for v in computed if v in on_disk}
    keep_rustc |= confirmed
    toolchain_known = bool(confirmed) or any(u.current for u in units)
    if toolchain_known:
        for u in units:
            if u.keep and not u.current and u.rustc is not None and u.rustc not in keep_rustc:
                u.keep, u.reason = False, "old-toolchain"
    return {"computed": {str(k): v for k, v in computed.items()}, "confirmed": sorted(map(str, confirmed)),
            "kept": sorted(map(str, keep_rustc)), "pruned": toolchain_known}


def _pkg_name(package_id: str) -> str:
    url, _, frag = package_id.partition("#")
    if "@" in frag:
        return frag.split("@")[0]
    return url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]


def apply_size_cap(inv: Inventory, max_size: int, sig: usage.Signals) -> dict:
    units = list(inv.units.values())
    total = (sum(u.bytes() for u in units if u.keep) + inv.other_bytes
             + sum(i.bytes for i in inv.unowned_uplifts) + sum(i.bytes for i, _ in inv.shared)
             + sum(cd.kept_bytes for cd in inv.crate_dirs if cd.keep and cd.owner is None))
    info = {"max_size": max_size, "before": total, "evicted_units": 0}
    if total <= max_size:
        info["after"] = total
        return info
    dependents: dict[tuple, list[Unit]] = {}
    by_value: dict[int, Unit] = {v: u for u in units for v in u.fp_values}
    for u in units:
        for v in u.dep_values:
            if v in by_value:
                dependents.setdefault(by_value[v].uid, []).append(u)
    lru = lambda u: u.used_ns if sig.atime else u.built_ns  # noqa: E731
    for u in sorted((u for u in units if u.keep and not u.current), key=lru):
        if total <= max_size:
            break
        if not u.keep:
            continue
        stack = [u]
        while stack:
            x = stack.pop()
            if not x.keep or x.current:
                continue
            x.keep, x.reason = False, "size-cap"
            total -= x.bytes()
            info["evicted_units"] += 1
            stack.extend(dependents.get(x.uid, []))
    info["after"] = total
    info["reached"] = total <= max_size
    return info
