"""Garbage collection of the target dir(s) and $CARGO_HOME, run before every save.

Model
-----
A **unit** is everything one cargo unit hash owns inside a profile dir
(`<root>/[<triple>/]<profile>/`):

* legacy layout: `.fingerprint/<pkg>-<hash>/`, `deps/*-<hash>[.*]`,
  `build/<pkg>-<hash>/`, `examples/*-<hash>[.*]`;
* v2 layout (`-Zbuild-dir-new-layout`, default from cargo 1.100):
  `build/<pkg>/<hash>/{fingerprint,out,run}/`;
* plus, in both, the uplifted copies in `<profile>/` and `<profile>/examples/`
  (hard links of a unit output; matched by inode, or by size+mtime after a restore
  broke the links; `foo.d` follows `foo`), and the unit's incremental crate dir
  `incremental/<crate>-<id>/` (matched by crate name and time: rustc names each
  session `s-<µs timestamp>-…`, created a few ms after cargo writes the unit's
  `invoked.timestamp`).

Liveness (see `rsnap.usage` for how "used" is known)
----------------------------------------------------
1. `old-toolchain`: the fingerprint JSON's `rustc` field is cargo's hash of
   `rustc -vV` (SipHasher128 of the text + 0xFF, `l*3+h`; checked against cargo
   1.95 and nightly 1.97). Kept values: 0 (build-script runs), the current
   `rustc -vV` (as run in the workspace root, honouring RUSTC and rustup
   overrides), the ones in `.rustc_info.json`, and those of units used since the
   epoch. The computed value only counts once some unit on disk carries it, so a
   change in cargo's hashing can never make GC delete what was just built
   (cargo-sweep#138).
2. `stale-unused`: with a reliable usage signal, units neither built nor used
   since the epoch go. Dependencies of a kept unit are always kept.
   Without a signal everything is kept (`no-signal`) and only the size cap evicts.
3. `size-cap` (`max_size` bytes for the target + build dirs): least recently used
   units first, never one used or built since the epoch; units depending on an
   evicted unit go with it (they would be rebuilt anyway).
4. Incremental: per crate dir only the newest finalized session (with its lock)
   stays (`incremental-old-session`); `-working` sessions, lockless sessions and
   orphan locks are `working-dir`; a crate dir whose unit is gone is
   `incremental-orphan`. rustc's own GC keeps two sessions per crate dir.
5. `orphan`: hashed outputs whose fingerprint is gone (e.g. an interrupted build);
   rustc temp dirs in `deps/` are `working-dir`.
6. $CARGO_HOME (`cargo-home-unreferenced`): keep `registry/index`, and the
   `.crate` files, extracted `registry/src` dirs, git dbs and checkouts that the
   workspace's Cargo.lock references (git db dir names are recomputed exactly as
   cargo does: `<last url segment>-<short hash of the canonical url>`), plus items
   that cargo's `.global-cache` says were used since the epoch (another workspace
   on a shared runner). `bin/` and everything else is never touched. Runs under
   cargo's `MutateExclusive` lock (`.package-cache-mutate`, then `.package-cache`),
   and the rows of what it deleted are removed from `.global-cache`.

Interruption safety
-------------------
Target dirs are locked like cargo does (`<profile>/.cargo-lock`, flock). Every
deletion is an atomic rename into `<root>/.rsnap/trash/` (never snapshotted,
emptied at the start and end of every GC) or a file unlink. All fingerprint dirs
of removed units go first, then incremental lock files, then data. So a GC killed
at any point leaves units that cargo either sees as complete and fresh, or sees
without a fingerprint and rebuilds; a session dir without its lock is ignored by
rustc. Registry src dirs and git checkouts disappear atomically too, so cargo
never sees a half-deleted dir with its `.cargo-ok` marker. Test hook (rsnap.faults):
`RSNAP_FAULT=gc:N` SIGKILLs the process after its N-th deletion (fault point `gc`).
"""
from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import re
import shutil
import signal
import stat
import struct
import time
import tomllib
from contextlib import ExitStack, contextmanager
from typing import NamedTuple
from pathlib import Path

from . import keys, usage
from .usage import profile_dirs
from .cargo_layout import EXCLUDED_TARGET_NAMES, RSNAP_DIR
from .errors import RsnapError, EXIT_LOCKED

try:
    from .faults import point as _fault_point   # RSNAP_FAULT=<glob>:<n>[:action], shared test hook
except ImportError:  # pragma: no cover - minimal stand-in: RSNAP_FAULT=gc:N kills after N deletions
    _fault_hits = 0

    def _fault_point(name: str) -> None:
        global _fault_hits
        spec = os.environ.get("RSNAP_FAULT", "")
        if spec.split(":")[0] == name and spec.split(":")[1:2] and spec.split(":")[1].isdigit():
            _fault_hits += 1
            if _fault_hits == int(spec.split(":")[1]):
                os.kill(os.getpid(), signal.SIGKILL)

TRASH = "trash"
HEX16 = re.compile(r"^[0-9a-f]{16}$")
HASHED = re.compile(r"^(?P<name>.+)-(?P<hash>[0-9a-f]{16})$")
# fingerprint hash-file names: [test-|doc-|run-]<kind description>-<target name>
FP_FILE = re.compile(r"^(?:test-|doc-|run-)?(?:lib|bin|integration-test|build-script|bench|example)-(?P<target>.+)$")
SESSION = re.compile(r"^s-(?P<ts>[0-9a-z]+)-(?P<rand>[0-9a-z]+)(?:-(?P<tail>[0-9a-z]+))?$")
RUSTC_TEMP = re.compile(r"^(rmeta|rustc)[0-9A-Za-z]{6}$")
INCR_MATCH_WINDOW_NS = 600 * 10**9   # rustc creates its session dir this soon after cargo invokes it
LOCK_TIMEOUT_S = 600.0


# ---------------------------------------------------------------- cargo's hashes

_M64 = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def _sip_round(v0, v1, v2, v3):
    v0 = (v0 + v1) & _M64; v2 = (v2 + v3) & _M64
    v1 = _rotl(v1, 13) ^ v0; v3 = _rotl(v3, 16) ^ v2; v0 = _rotl(v0, 32)
    v2 = (v2 + v1) & _M64; v0 = (v0 + v3) & _M64
    v1 = _rotl(v1, 17) ^ v2; v3 = _rotl(v3, 21) ^ v0; v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def sip128(data: bytes) -> tuple[int, int]:
    """SipHash-1-3 with 128-bit output, keys (0, 0): rustc-stable-hash's SipHasher128."""
    v0, v1 = 0x736F6D6570736575, 0x646F72616E646F6D ^ 0xEE
    v2, v3 = 0x6C7967656E657261, 0x7465646279746573
    n = len(data) // 8
    for i in range(n):
        m = struct.unpack_from("<Q", data, 8 * i)[0]
        v3 ^= m
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
        v0 ^= m
    tail = (data[8 * n:] + b"\0" * 8)[:8]
    b = ((len(data) & 0xFF) << 56) | struct.unpack("<Q", tail)[0]
    v3 ^= b
    v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xEE
    for _ in range(3):
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    lo = v0 ^ v1 ^ v2 ^ v3
    v1 ^= 0xDD
    for _ in range(3):
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    return lo, v0 ^ v1 ^ v2 ^ v3


def cargo_hash_str(s: str) -> int:
    """cargo's `util::hash_u64(&String)` (cargo >= 1.85: StableHasher, str hashed with a 0xFF terminator)."""
    lo, hi = sip128(s.encode() + b"\xff")
    return (lo * 3 + hi) & _M64


def cargo_short_hash_str(s: str) -> str:
    """cargo's `short_hash` of a string-hashed value: the u64 as little-endian hex."""
    return struct.pack("<Q", cargo_hash_str(s)).hex()


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


# ---------------------------------------------------------------- inventory

# NamedTuples and plain classes, not dataclasses: every save imports this module (see rsnap.manifest)

class Item(NamedTuple):
    """A file or dir to delete or keep, with its size."""
    path: Path
    bytes: int
    is_dir: bool


class Unit:
    def __init__(self, profile: Path, hash: str, pkg: str, layout: str, fp_dir: Path):
        self.profile, self.hash, self.pkg = profile, hash, pkg
        self.layout = layout                  # "v1" | "v2"
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


class Session:
    def __init__(self, name: str, ts_ns: int, path: Path | None, lock: Path | None, finalized: bool):
        self.name, self.ts_ns = name, ts_ns
        self.path = path                      # session dir (None: orphan lock)
        self.lock, self.finalized = lock, finalized
        self.bytes = 0


class CrateDir:
    def __init__(self, path: Path, profile: Path, crate: str, sessions: list[Session]):
        self.path, self.profile, self.crate, self.sessions = path, profile, crate, sessions
        self.newest: Session | None = None    # the finalized session that stays
        self.garbage: list[tuple[Session, str]] = []
        self.owner: Unit | None = None
        self.keep = True
        self.reason = ""

    @property
    def kept_bytes(self) -> int:
        return self.newest.bytes if self.newest else 0


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


def _scandir(path) -> list:
    try:
        return list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _tree_bytes(path: Path) -> int:
    """Size of a file or symlink, or the total size of the files below a directory."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return _dir_bytes(path) if stat.S_ISDIR(st.st_mode) else st.st_size


def _file_bytes(entry) -> int:
    """Size of a regular file (a DirEntry), 0 for anything else."""
    try:
        return entry.stat(follow_symlinks=False).st_size if entry.is_file(follow_symlinks=False) else 0
    except OSError:
        return 0


def _dir_bytes(path) -> int:
    """Like summing lstat sizes over os.walk: symlinks to dirs are neither followed nor counted."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for de in entries:
        try:
            if de.is_dir():
                if not de.is_symlink():
                    total += _dir_bytes(de.path)
            else:
                total += de.stat(follow_symlinks=False).st_size
        except OSError:
            pass
    return total


def _item(path: Path) -> Item:
    isdir = path.is_dir() and not path.is_symlink()
    return Item(path, _tree_bytes(path), isdir)


def _read_noatime(path: Path) -> bytes:
    """Read without updating atime (so GC never fakes usage); plain read if not permitted."""
    flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _contains_noatime(path: Path, needles: list[bytes]) -> list[bool]:
    """Which needles occur in the file (mapped, not read: session rmeta files run to megabytes)."""
    flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)
    try:
        try:
            fd = os.open(path, flags)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY)
    except OSError:
        return [False] * len(needles)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
            return [data.find(n) >= 0 for n in needles]
    except (OSError, ValueError):  # empty file, or not mappable
        return [False] * len(needles)
    finally:
        os.close(fd)


def _load_fingerprint(u: Unit) -> None:
    """Fill rustc, fingerprint values, deps, crates, timestamps from the unit's fingerprint dir."""
    for de in _scandir(u.fp_dir):
        try:
            st = de.stat(follow_symlinks=False)
        except OSError:
            continue
        u.fp_bytes += st.st_size
        name = de.name
        u.built_ns = max(u.built_ns, st.st_mtime_ns)
        if name.endswith(".json"):
            try:
                data = json.loads(_read_noatime(Path(de.path)))
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
                raw = _read_noatime(Path(de.path)).strip()
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
            inv.trash.append(_item(trash))
        for profile in profile_dirs(root):
            inv.profiles.append(profile)
            _scan_profile(inv, profile, artifact_dirs(roots, profile))
    return inv


def _scan_profile(inv: Inventory, profile: Path, uplift_dirs: list[Path] | None = None) -> None:
    v1: dict[str, Unit] = {}
    v2: dict[str, Unit] = {}
    # fingerprints: v1
    for de in _scandir(profile / ".fingerprint"):
        m = HASHED.match(de.name)
        if m and de.is_dir(follow_symlinks=False):
            v1[m.group("hash")] = Unit(profile, m.group("hash"), m.group("name"), "v1", Path(de.path))
    # build/: v1 <pkg>-<hash>/ and v2 <pkg>/<hash>/{fingerprint,out,run}
    for de in _scandir(profile / "build"):
        if not de.is_dir(follow_symlinks=False):
            continue
        m = HASHED.match(de.name)
        if m:
            (v1[m.group("hash")].members if m.group("hash") in v1 else inv.orphans).append(_item(Path(de.path)))
            continue
        for h in _scandir(Path(de.path)):
            if not (HEX16.match(h.name) and h.is_dir(follow_symlinks=False)):
                continue
            unit_dir = Path(h.path)
            fp = unit_dir / "fingerprint"
            if not fp.is_dir() or h.name in v2:
                inv.orphans.append(_item(unit_dir))
                continue
            u = Unit(profile, h.name, de.name, "v2", fp)
            v2[h.name] = u
            u.members.extend(_item(Path(x.path)) for x in _scandir(unit_dir) if x.name != "fingerprint")
            u.members.append(Item(unit_dir, 0, True))   # the unit dir itself, empty by then
    # deps/, examples/, native/: <name>-<hash>[.ext]
    unhashed_examples, unhashed_deps = [], []
    for sub in ("deps", "examples", "native"):
        for de in _scandir(profile / sub):
            m = HASHED.match(de.name.split(".", 1)[0])
            if m:
                (v1[m.group("hash")].members if m.group("hash") in v1 else inv.orphans).append(_item(Path(de.path)))
            elif sub == "deps" and RUSTC_TEMP.match(de.name):
                inv.working.append(_item(Path(de.path)))
            elif sub == "examples" and de.is_file(follow_symlinks=False):
                unhashed_examples.append(Path(de.path))
            elif sub == "deps" and de.is_file(follow_symlinks=False):
                unhashed_deps.append(Path(de.path))
            else:
                inv.other_bytes += _tree_bytes(Path(de.path))
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
            inv.other_bytes += _tree_bytes(p)
            continue
        it = _item(p)
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
            if u.layout == "v2":
                paths = [Path(x.path) for x in _scandir(it.path)] if it.path.name == "out" else []
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
        candidates += [Path(de.path) for de in _scandir(d)
                       if de.is_file(follow_symlinks=False) and de.name not in EXCLUDED_TARGET_NAMES
                       and not de.name.startswith(".") and de.name != "CACHEDIR.TAG"]
        if d != profile:
            candidates += [Path(de.path) for de in _scandir(d / "examples") if de.is_file(follow_symlinks=False)]
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
        it = _item(p)
        if isinstance(u, list):
            inv.shared.append((it, u))
        else:
            (u.uplifts if u else inv.unowned_uplifts).append(it)
    # incremental
    for de in _scandir(profile / "incremental"):
        if de.is_dir(follow_symlinks=False):
            inv.crate_dirs.append(_scan_crate_dir(profile, Path(de.path)))
        else:
            inv.working.append(_item(Path(de.path)))


def _scan_crate_dir(profile: Path, path: Path) -> CrateDir:
    crate = path.name.rsplit("-", 1)[0]
    sessions: dict[str, Session] = {}
    for de in _scandir(path):
        name = de.name
        is_lock = name.endswith(".lock")
        stem = name[:-5] if is_lock else name
        m = SESSION.match(stem)
        if not m:
            continue
        base = f"s-{m.group('ts')}-{m.group('rand')}"
        try:
            ts_ns = int(m.group("ts"), 36) * 1000
        except ValueError:
            ts_ns = 0
        s = sessions.setdefault(base, Session(base, ts_ns, None, None, False))
        if is_lock:
            s.lock = Path(de.path)
        else:
            s.path = Path(de.path)
            s.finalized = m.group("tail") not in (None, "working")
            s.bytes = _tree_bytes(s.path)
    cd = CrateDir(path, profile, crate, sorted(sessions.values(), key=lambda s: s.ts_ns))
    good = [s for s in cd.sessions if s.path and s.lock and s.finalized]
    cd.newest = good[-1] if good else None
    for s in cd.sessions:
        if s is cd.newest:
            continue
        if s.path and s.lock and s.finalized:
            cd.garbage.append((s, "incremental-old-session"))
        else:
            cd.garbage.append((s, "working-dir"))   # -working, lockless session, or orphan lock
    return cd


# ---------------------------------------------------------------- decisions

class Tally:
    def __init__(self):
        self.units = 0
        self.bytes = 0

    def add(self, n_bytes: int, units: int = 1) -> None:
        self.units += units
        self.bytes += n_bytes


class Report:
    def __init__(self):
        self.kept: dict[str, Tally] = {}
        self.removed: dict[str, Tally] = {}

    def keep(self, reason: str, n_bytes: int, units: int = 1) -> None:
        self.kept.setdefault(reason, Tally()).add(n_bytes, units)

    def remove(self, reason: str, n_bytes: int, units: int = 1) -> None:
        self.removed.setdefault(reason, Tally()).add(n_bytes, units)

    @staticmethod
    def _section(d: dict[str, Tally]) -> dict:
        return {"units": sum(t.units for t in d.values()), "bytes": sum(t.bytes for t in d.values()),
                "by_reason": {k: {"units": t.units, "bytes": t.bytes} for k, t in sorted(d.items())}}

    def as_dict(self) -> dict:
        return {"kept": self._section(self.kept), "removed": self._section(self.removed)}


def _decide_units(inv: Inventory, sig: usage.Signals, ws, roots: list[Path]) -> dict:
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


def _match_incremental(inv: Inventory, sig: usage.Signals) -> None:
    """Find the unit whose compile created each crate dir's newest session.

    Exact for rlib crates: the session's `metadata.rmeta` work product embeds the
    unit's `-C extra-filename` hash. Otherwise (bins, tests, proc-macros, build
    scripts) a one-to-one assignment by the smallest gap between the unit's
    `invoked.timestamp` and the session timestamp (a unit's compile writes into
    exactly one crate dir, and a crate dir's newest session has one author).
    """
    by_crate: dict[tuple[str, str], list[Unit]] = {}
    for u in inv.units.values():
        if u.compiles:
            for c in u.crates:
                by_crate.setdefault((str(u.profile), c), []).append(u)
    taken: set = set()
    pending: list[CrateDir] = []
    for cd in inv.crate_dirs:
        if cd.newest is None:
            continue
        cands = by_crate.get((str(cd.profile), cd.crate), [])
        rmeta = cd.newest.path / "metadata.rmeta"
        if cands and rmeta.is_file():
            found = _contains_noatime(rmeta, [u.hash.encode() for u in cands])
            hits = [u for u, hit in zip(cands, found) if hit and u.uid not in taken]
            if hits:
                cd.owner = hits[0]
                taken.add(hits[0].uid)
                continue
        pending.append(cd)
    pairs = []
    for cd in pending:
        t = cd.newest.ts_ns
        for u in by_crate.get((str(cd.profile), cd.crate), []):
            if u.invoked_ns is None:
                continue
            gap = t - u.invoked_ns
            if -usage.SLACK_NS <= gap <= INCR_MATCH_WINDOW_NS:
                pairs.append((abs(gap), id(cd), cd, u))
    pairs.sort(key=lambda p: (p[0], p[1]))
    for _gap, _i, cd, u in pairs:
        if cd.owner is None and u.uid not in taken:
            cd.owner = u
            taken.add(u.uid)
    for cd in inv.crate_dirs:
        if cd.owner is not None:
            cd.owner.incremental.append(cd)


def _decide_incremental(inv: Inventory, sig: usage.Signals) -> None:
    for cd in inv.crate_dirs:
        if cd.newest is None:
            cd.keep, cd.reason = False, "working-dir"
        elif sig.epoch_ns is not None and cd.newest.ts_ns >= sig.epoch_ns - usage.SLACK_NS:
            cd.keep, cd.reason = True, "used"
        elif cd.owner is not None and cd.owner.keep:
            cd.keep, cd.reason = True, cd.owner.reason
        else:
            cd.keep, cd.reason = False, "incremental-orphan"


def _apply_size_cap(inv: Inventory, max_size: int, sig: usage.Signals) -> dict:
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


# ---------------------------------------------------------------- deleting

class _Deleter:
    """Atomic deletions: rename into <root>/.rsnap/trash, then empty the trash."""

    def __init__(self, roots: list[Path], dry_run: bool):
        self.roots = [Path(r) for r in roots]
        self.dry_run = dry_run
        self.count = 0
        self.n = 0

    def _trash_for(self, path: Path) -> Path | None:
        for r in self.roots:
            if path.is_relative_to(r):
                return r / RSNAP_DIR / TRASH
        return None

    def discard(self, path: Path) -> None:
        if self.dry_run:
            return
        try:
            if path.is_dir() and not path.is_symlink():
                trash = self._trash_for(path)
                moved = False
                if trash is not None:
                    trash.mkdir(parents=True, exist_ok=True)
                    self.n += 1
                    try:
                        os.rename(path, trash / f"{os.getpid()}-{self.n}-{path.name}")
                        moved = True
                    except OSError as e:
                        if e.errno not in (errno.EXDEV, errno.EBUSY, errno.EPERM, errno.EACCES):
                            raise
                if not moved:
                    ok = path / ".cargo-ok"      # registry src / git checkout marker: invalidate first
                    if ok.exists():
                        ok.unlink()
                    shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            return
        self.count += 1
        _fault_point("gc")   # RSNAP_FAULT=gc:N: SIGKILL after the N-th deletion

    def empty_trash(self) -> None:
        if self.dry_run:
            return
        for r in self.roots:
            trash = r / RSNAP_DIR / TRASH
            if trash.is_dir():
                shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _flock(path: Path, what: str, timeout: float = LOCK_TIMEOUT_S, create: bool = True):
    """Exclusive flock(2) on `path`, as cargo takes it; waits up to `timeout` seconds."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RsnapError(f"{what} is locked by another process (cargo running?)", EXIT_LOCKED) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


@contextmanager
def _target_locks(profiles: list[Path], timeout: float):
    with ExitStack() as stack:
        for p in profiles:
            stack.enter_context(_flock(p / ".cargo-lock", f"build directory {p}", timeout))
            stack.enter_context(_flock(p / ".cargo-build-lock", f"build directory {p}", timeout, create=False))
        yield


# ---------------------------------------------------------------- $CARGO_HOME

def _lock_packages(lock_path: Path) -> tuple[set[str], list[tuple[str, str, str]]] | None:
    """(registry '<name>-<version>' set, git [(ident, last segment, rev)]) from Cargo.lock."""
    try:
        data = tomllib.loads(lock_path.read_text())
    except (OSError, ValueError):
        return None
    crates, gits = set(), []
    for pkg in data.get("package", []):
        src = pkg.get("source") or ""
        if src.startswith(("registry+", "sparse+")):
            crates.add(f"{pkg['name']}-{pkg['version']}")
        elif src.startswith("git+"):
            url, _, rev = src[4:].partition("#")
            url = url.split("?")[0]
            canon = canonical_git_url(url)
            seg = canon.rstrip("/").rsplit("/", 1)[-1] or "_empty"
            gits.append((f"{seg}-{cargo_short_hash_str(canon)}", seg, rev))
    return crates, gits


def canonical_git_url(url: str) -> str:
    """cargo's CanonicalUrl: no trailing slash, github.com lowercased over https, no `.git`."""
    u = url.rstrip("/")
    low = u.lower()
    for scheme in ("http://github.com/", "https://github.com/", "git://github.com/"):
        if low.startswith(scheme):
            u = "https://github.com/" + low[len(scheme):]
            break
    if u.endswith(".git"):
        u = u[:-4]
    return u


def _global_cache_recent(home: Path, since_s: int | None) -> dict[str, set[str]]:
    """Names .global-cache says were used since `since_s` (unix seconds)."""
    out = {"registry_crate": set(), "registry_src": set(), "git_db": set(), "git_checkout": set()}
    db = home / ".global-cache"
    if since_s is None or not db.exists():
        return out
    import sqlite3  # ~15 ms to import; only CARGO_HOMEs with cargo's usage database need it
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            for table in out:
                for (name,) in con.execute(f"SELECT name FROM {table} WHERE timestamp >= ?", (since_s,)):
                    out[table].add(name)
        finally:
            con.close()
    except sqlite3.Error:
        pass
    return out


def _forget_in_global_cache(home: Path, removed: dict[str, list[tuple[str, str]]]) -> str:
    """Delete the rows of what GC removed, as cargo's own GC does."""
    db = home / ".global-cache"
    if not db.exists() or not any(removed.values()):
        return "unchanged"
    import sqlite3
    try:
        con = sqlite3.connect(str(db), timeout=10)
        try:
            with con:
                for parent, name in removed["registry_crate"]:
                    con.execute("DELETE FROM registry_crate WHERE name = ? AND registry_id IN "
                                "(SELECT id FROM registry_index WHERE name = ?)", (name, parent))
                for parent, name in removed["registry_src"]:
                    con.execute("DELETE FROM registry_src WHERE name = ? AND registry_id IN "
                                "(SELECT id FROM registry_index WHERE name = ?)", (name, parent))
                for parent, name in removed["git_checkout"]:
                    con.execute("DELETE FROM git_checkout WHERE name = ? AND git_id IN "
                                "(SELECT id FROM git_db WHERE name = ?)", (name, parent))
                for _parent, name in removed["git_db"]:
                    con.execute("DELETE FROM git_checkout WHERE git_id IN (SELECT id FROM git_db WHERE name = ?)", (name,))
                    con.execute("DELETE FROM git_db WHERE name = ?", (name,))
        finally:
            con.close()
        return "updated"
    except sqlite3.Error as e:
        return f"not updated: {e}"


def collect_cargo_home(ws, *, dry_run: bool = False, epoch_ns: int | None = None,
                       timeout: float = LOCK_TIMEOUT_S) -> dict:
    home = Path(ws.cargo_home)
    rep = Report()
    result = {"cargo_home": str(home)}
    refs = _lock_packages(Path(ws.root) / "Cargo.lock")
    if refs is None:
        result["skipped"] = "no readable Cargo.lock: cannot tell what is referenced"
        return {**result, **rep.as_dict()}
    if not home.is_dir():
        result["skipped"] = "no CARGO_HOME"
        return {**result, **rep.as_dict()}
    crates, gits = refs
    recent = _global_cache_recent(home, None if epoch_ns is None else epoch_ns // 10**9)
    git_idents = {g[0] for g in gits}
    git_segs = {g[1] for g in gits}
    plan: list[tuple[Path, str, str, str]] = []   # path, table, parent, name

    def judge(entry, table: str, parent: str, referenced: bool, removable: bool) -> None:
        """Keep what Cargo.lock references or cargo used since the epoch; plan to remove the rest.
        Kept directories (extracted sources, git dbs and checkouts) are not sized: walking them
        cost more than the rest of a save's GC, so kept bytes count files (.crate) only."""
        if referenced:
            rep.keep("referenced", _file_bytes(entry))
        elif entry.name in recent[table]:
            rep.keep("used-since-restore", _file_bytes(entry))
        elif removable:
            plan.append((Path(entry.path), table, parent, entry.name))
            rep.remove("cargo-home-unreferenced", _tree_bytes(Path(entry.path)))

    for reg in _scandir(home / "registry" / "cache"):
        for f in _scandir(Path(reg.path)):
            stem = f.name[:-6] if f.name.endswith(".crate") else f.name
            judge(f, "registry_crate", reg.name, stem in crates, f.name.endswith(".crate"))
    for reg in _scandir(home / "registry" / "src"):
        for d in _scandir(Path(reg.path)):
            judge(d, "registry_src", reg.name, d.name in crates, d.is_dir(follow_symlinks=False))
    for db in _scandir(home / "git" / "db"):
        seg = db.name.rsplit("-", 1)[0]
        # exact ident; the last-segment fallback only if no exact match exists for that segment
        exact = db.name in git_idents
        fallback = seg in git_segs and not any(i.startswith(seg + "-") and (home / "git" / "db" / i).exists()
                                                for i in git_idents)
        judge(db, "git_db", "", exact or fallback, db.is_dir(follow_symlinks=False))
    for co in _scandir(home / "git" / "checkouts"):
        seg = co.name.rsplit("-", 1)[0]
        revs = [g[2] for g in gits if g[0] == co.name or (g[1] == seg and co.name not in git_idents
                                                           and not (home / "git" / "checkouts" / g[0]).exists())]
        for rev_dir in _scandir(Path(co.path)):
            judge(rev_dir, "git_checkout", co.name, any(r.startswith(rev_dir.name) for r in revs),
                  rev_dir.is_dir(follow_symlinks=False))
    result["unreferenced"] = sorted(p.relative_to(home).as_posix() for p, *_ in plan)
    if not dry_run:
        _Deleter([home], dry_run=False).empty_trash()   # leftovers of an interrupted GC
    if not dry_run and plan:
        deleter = _Deleter([home], dry_run=False)
        removed = {"registry_crate": [], "registry_src": [], "git_db": [], "git_checkout": []}
        # cargo's MutateExclusive: the "mutate" lock first, then the "download" lock. Builds of
        # other workspaces sharing this CARGO_HOME hold "mutate" shared: don't wait for them long.
        try:
            with _flock(home / ".package-cache-mutate", "CARGO_HOME package cache", min(timeout, 30.0)), \
                    _flock(home / ".package-cache", "CARGO_HOME package cache", min(timeout, 30.0)):
                for path, table, parent, name in plan:
                    deleter.discard(path)
                    removed[table].append((parent, name))
                result["global_cache"] = _forget_in_global_cache(home, removed)
                deleter.empty_trash()
        except RsnapError as e:
            result["skipped"] = f"{e}; nothing removed from CARGO_HOME"
            rep.removed.clear()
    result["bin_untouched"] = True
    return {**result, **rep.as_dict()}


# ---------------------------------------------------------------- collect

def collect(ws, *, dry_run: bool = False, max_size: int | None = None, cargo_home: bool = True,
            lock_timeout: float = LOCK_TIMEOUT_S) -> dict:
    """Garbage-collect the target/build dirs and (unless cargo_home=False) $CARGO_HOME.

    Returns a JSON-able report: {"kept": {...}, "removed": {...}} with units/bytes
    totals and `by_reason`, the usage signal used, toolchain values, size-cap
    details and the CARGO_HOME part under "cargo_home".
    """
    started = time.monotonic()
    roots = [r for r in usage.roots(ws) if r.is_dir()]
    profiles = [d for r in roots for p in profile_dirs(r) for d in artifact_dirs(roots, p)]
    rep = Report()
    out: dict = {"dry_run": dry_run, "roots": [str(r) for r in roots]}
    with (_target_locks(profiles, lock_timeout) if not dry_run else ExitStack()):
        deleter = _Deleter(roots, dry_run)
        deleter.empty_trash()          # leftovers of an interrupted GC
        inv = inventory(roots)
        sig = usage.load_signals(ws)
        out["toolchains"] = _decide_units(inv, sig, ws, roots)
        _match_incremental(inv, sig)
        if max_size is not None:
            _decide_incremental(inv, sig)
            out["size_cap"] = _apply_size_cap(inv, max_size, sig)
        _decide_incremental(inv, sig)
        out["signal"] = sig.describe()
        out["signal"]["kind"] = ("+".join(k for k, on in (("atime", sig.atime), ("cargo-log", sig.log)) if on)
                                 or "none")
        if sig.no_build_since_epoch:
            out["signal"]["kind"] = "none (no build since restore)"
        removed_units = [u for u in inv.units.values() if not u.keep]
        # 1. fingerprints of every removed unit: from here on cargo sees them as dirty
        for u in removed_units:
            deleter.discard(u.fp_dir)
        # 2. incremental: lock files before session dirs (rustc ignores lockless sessions)
        incr_remove: list[Path] = []
        for cd in inv.crate_dirs:
            if not cd.keep:
                for s in cd.sessions:
                    if s.lock:
                        deleter.discard(s.lock)
                incr_remove.append(cd.path)
                rep.remove(cd.reason, sum(s.bytes for s in cd.sessions), units=1)
            else:
                rep.keep("incremental-" + cd.reason if not cd.reason.startswith("incremental") else cd.reason,
                         cd.kept_bytes, units=1)
                for s, reason in cd.garbage:
                    if s.lock:
                        deleter.discard(s.lock)
                    if s.path:
                        incr_remove.append(s.path)
                    rep.remove(reason, s.bytes, units=1)
        # 3. the rest of each removed unit, uplifts included
        for u in removed_units:
            for it in u.members + u.uplifts:
                deleter.discard(it.path)
            rep.remove(u.reason, u.fp_bytes + sum(i.bytes for i in u.members + u.uplifts))
        for u in inv.units.values():
            if u.keep:
                rep.keep(u.reason, u.fp_bytes + sum(i.bytes for i in u.members + u.uplifts))
        for it, owners in inv.shared:
            if any(o.keep for o in owners):
                rep.keep("shared-output", it.bytes)
            else:
                deleter.discard(it.path)
                rep.remove(owners[0].reason, it.bytes)
        for p in incr_remove:
            deleter.discard(p)
        for it in inv.orphans:
            deleter.discard(it.path)
            rep.remove("orphan", it.bytes)
        for it in inv.working:
            deleter.discard(it.path)
            rep.remove("working-dir", it.bytes)
        for it in inv.trash:
            rep.remove("interrupted-gc-trash", it.bytes)
        if inv.unowned_uplifts:
            rep.keep("unowned-uplift", sum(i.bytes for i in inv.unowned_uplifts), units=len(inv.unowned_uplifts))
        if inv.other_bytes:
            rep.keep("unclassified", inv.other_bytes, units=0)
        deleter.empty_trash()
    out.update(rep.as_dict())
    out["deletions"] = deleter.count
    if cargo_home:
        out["cargo_home"] = collect_cargo_home(ws, dry_run=dry_run, epoch_ns=sig.epoch_ns, timeout=lock_timeout)
    if not dry_run:
        usage.prune_log(ws, sig.epoch_ns)
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


def before_save(ws, *, enabled: bool = True, max_size: int | None = None, cargo_home: bool = True) -> dict | None:
    """GC step of `rsnap save` (default on; `--no-gc` passes enabled=False). Returns the report."""
    if not enabled:
        return None
    return collect(ws, max_size=max_size, cargo_home=cargo_home)


# ---------------------------------------------------------------- CLI helpers

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5GiB', '123' (bytes) -> bytes (powers of 1024)."""
    m = _SIZE.match(text or "")
    if not m:
        raise ValueError(f"invalid size {text!r} (use e.g. 500M, 2G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def format_report(r: dict) -> str:
    from .progress import human_bytes
    lines = []
    verb = "would remove" if r.get("dry_run") else "removed"
    rm, kp = r["removed"], r["kept"]
    lines.append(f"rsnap gc: {verb} {rm['units']} units ({human_bytes(rm['bytes'])}), "
                 f"kept {kp['units']} ({human_bytes(kp['bytes'])}); signal: {r['signal']['kind']} in {r['seconds']}s")
    for title, sec in ((verb, rm), ("kept", kp)):
        for reason, t in sec["by_reason"].items():
            lines.append(f"  {title:>12} {reason:<28} {t['units']:>6} {human_bytes(t['bytes']):>10}")
    ch = r.get("cargo_home")
    if ch:
        if ch.get("skipped"):
            lines.append(f"  CARGO_HOME: skipped ({ch['skipped']})")
        else:
            lines.append(f"  CARGO_HOME: {verb} {ch['removed']['units']} ({human_bytes(ch['removed']['bytes'])}), "
                         f"kept {ch['kept']['units']} (.crate files {human_bytes(ch['kept']['bytes'])}); "
                         "bin/ untouched")
    if r.get("size_cap") and not r["size_cap"].get("reached", True):
        lines.append(f"  size cap {human_bytes(r['size_cap']['max_size'])} not reached: "
                     "the rest is used by the current build")
    return "\n".join(lines)
