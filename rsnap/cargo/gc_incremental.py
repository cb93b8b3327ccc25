"""GC of incremental sessions: which session of each `incremental/<crate>-<id>/` dir stays,
and which unit made it (see rsnap.cargo.gc, model point 4)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from . import usage
from .gc_fs import contains_noatime, scandir, tree_bytes

if TYPE_CHECKING:  # annotations only: gc_units imports this module
    from .gc_units import Inventory, Unit

SESSION = re.compile(r"^s-(?P<ts>[0-9a-z]+)-(?P<rand>[0-9a-z]+)(?:-(?P<tail>[0-9a-z]+))?$")
INCR_MATCH_WINDOW_NS = 600 * 10**9   # rustc creates its session dir this soon after cargo invokes it


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


def scan_crate_dir(profile: Path, path: Path) -> CrateDir:
    crate = path.name.rsplit("-", 1)[0]
    sessions: dict[str, Session] = {}
    for de in scandir(path):
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
            s.bytes = tree_bytes(s.path)
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


def match_incremental(inv: Inventory, sig: usage.Signals) -> None:
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
            found = contains_noatime(rmeta, [u.hash.encode() for u in cands])
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


def decide_incremental(inv: Inventory, sig: usage.Signals) -> None:
    for cd in inv.crate_dirs:
        if cd.newest is None:
            cd.keep, cd.reason = False, "working-dir"
        elif sig.epoch_ns is not None and cd.newest.ts_ns >= sig.epoch_ns - usage.SLACK_NS:
            cd.keep, cd.reason = True, "used"
        elif cd.owner is not None and cd.owner.keep:
            cd.keep, cd.reason = True, cd.owner.reason
        else:
            cd.keep, cd.reason = False, "incremental-orphan"
