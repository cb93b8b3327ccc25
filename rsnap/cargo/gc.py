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

Liveness (see `rsnap.cargo.usage` for how "used" is known)
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

import re
import time
from contextlib import ExitStack
from pathlib import Path

from . import usage
from .gc_cargo_home import collect_cargo_home
from .gc_fs import LOCK_TIMEOUT_S, Deleter, Report, target_locks
from .gc_incremental import decide_incremental, match_incremental
from .gc_units import apply_size_cap, artifact_dirs, decide_units, inventory
from .target_layout import profile_dirs

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
    with (target_locks(profiles, lock_timeout) if not dry_run else ExitStack()):
        deleter = Deleter(roots, dry_run)
        deleter.empty_trash()          # leftovers of an interrupted GC
        inv = inventory(roots)
        sig = usage.load_signals(ws)
        out["toolchains"] = decide_units(inv, sig, ws, roots)
        match_incremental(inv, sig)
        if max_size is not None:
            decide_incremental(inv, sig)
            out["size_cap"] = apply_size_cap(inv, max_size, sig)
        decide_incremental(inv, sig)
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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5GiB', '123' (bytes) -> bytes (powers of 1024)."""
    m = _SIZE.match(text or "")
    if not m:
        raise ValueError(f"invalid size {text!r} (use e.g. 500M, 2G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def format_report(r: dict) -> str:
    from ..progress import human_bytes
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
