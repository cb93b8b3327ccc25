"""mtime normalization: make cargo's mtime checks see what they saw at save time.

At save, record (path, size, mtime_ns, xxh3-128) of every file cargo's freshness checks
can read: all files of path packages (dep-info sources, manifests, build-script inputs
and the max-mtime scan for scripts without rerun-if-changed), plus dep-info and
rerun-if-changed paths outside them. Directories are recorded too (rerun-if-changed on
a directory scans it), with a digest of their sorted entry names.

At restore, a file whose content matches gets its recorded mtime back; a file that
differs, or is new, gets an mtime newer than every restored artifact. So cargo's
decision after restore equals its decision on the saving machine: never stale.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import xxhash

from .. import faults
from ..digest import hash_file
from . import layout, target_layout

_SKIP_DIRS = {".git", ".hg", ".svn", layout.RSNAP_DIR}


class RetimeStats:
    def __init__(self):
        self.retimed = 0      # content matched, recorded mtime set back
        self.kept = 0         # content matched, mtime already right
        self.bumped = 0       # changed or new, made newer than every artifact
        self.newer = 0        # changed or new, already newer than every artifact
        # (st_dev, st_ino) of files found changed: a file reached under two names (one a symlink)
        # that matches one record and not the other must end newer, never re-timed back
        self.changed: set[tuple[int, int]] = set()
        self.changed_paths: list[str] = []  # for the rebuild prediction (rsnap.cargo.rebuild)

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("changed", "changed_paths")}


def _skip_dirs(ws) -> set[Path]:
    return {ws.target_dir.resolve(), ws.build_dir.resolve()}


def _walk_sources(top: Path, skip: set[Path]):
    """Yield (abs path, is_dir) below top, not following symlinks, skipping target dirs."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        yield d, True, entries
        for de in entries:
            if de.is_dir(follow_symlinks=False):
                p = Path(de.path)
                if de.name in _SKIP_DIRS or p.resolve() in skip:
                    continue
                stack.append(p)


def _dir_digest(entries) -> str:
    return xxhash.xxh3_128_hexdigest("\0".join(sorted(e.name for e in entries)).encode())


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def _resolve(rec_path: str, root: Path) -> Path:
    return Path(rec_path) if rec_path.startswith("/") else root / rec_path


def source_dirs(ws) -> list[Path]:
    dirs = sorted(set(ws.path_package_dirs) | {ws.root})
    # drop dirs nested in another listed dir: the outer walk covers them
    out: list[Path] = []
    for d in dirs:
        if not any(d != o and d.is_relative_to(o) for o in dirs):
            out.append(d)
    return out


def extra_input_paths(ws) -> list[Path]:
    """dep-info and rerun-if-changed paths the walk of the path packages does not reach: those
    outside them (and outside $CARGO_HOME and the target dirs), and those inside that go through
    a symlinked directory (the walk does not follow one; cargo does)."""
    covered = [str(d) for d in source_dirs(ws)]
    not_inputs = [str(d) for d in (ws.cargo_home, ws.target_dir, ws.build_dir)]
    root = str(ws.root)
    found: set[str] = set()
    for tree in {ws.target_dir, ws.build_dir}:
        for d in target_layout.depinfo_files(tree):
            try:
                text = d.read_text(errors="replace")
            except OSError:
                continue
            for p in layout.parse_makefile_depinfo(text):
                found.add(os.path.normpath(p if p.startswith("/") else os.path.join(root, p)))
        for pkg, out in target_layout.build_script_outputs(tree):
            pkg_dir = ws.package_dirs_by_name.get(pkg)
            if pkg_dir is None:
                continue  # registry/git packages: their inputs live in $CARGO_HOME
            try:
                text = out.read_text(errors="replace")
            except OSError:
                continue
            for p in layout.rerun_if_changed_paths(text):
                found.add(os.path.normpath(os.path.join(pkg_dir, p)))
    linked = _SymlinkedDirs(covered)
    return sorted(Path(p) for p in found
                  if not _below_any(p, not_inputs) and (not _below_any(p, covered) or linked.below_one(p))
                  and os.path.exists(p))


class _SymlinkedDirs:
    """Does a path inside the walked dirs go through a symlinked directory below them?"""

    def __init__(self, covered: list[str]):
        self.covered = {c: os.path.realpath(c) for c in covered}
        self.answers: dict[str, bool] = {}

    def below_one(self, path: str) -> bool:
        parent = os.path.dirname(path)
        if parent not in self.answers:
            top = next((c for c in self.covered if _below_any(parent, [c])), None)
            self.answers[parent] = top is not None and os.path.realpath(parent) != os.path.normpath(
                os.path.join(self.covered[top], os.path.relpath(parent, top)))
        return self.answers[parent]


def _below_any(path: str, dirs: list[str]) -> bool:
    """Is `path` one of `dirs` or below one (normalized absolute paths)?"""
    return any(path == d or path.startswith(d if d.endswith("/") else d + "/") for d in dirs)


def record_sources(ws) -> tuple[list[list], list[str], list[list]]:
    """[path, type, size, mtime_ns, digest] for every input cargo may check by mtime (a symlinked
    file is recorded like a file, by the content and mtime cargo sees through it), the walked
    dirs, and [path, link text, resolved path] of every symlink in them (see _push_old_targets)."""
    skip = _skip_dirs(ws)
    records: dict[str, list] = {}
    links: dict[str, list] = {}
    tops = source_dirs(ws)
    for top in tops:
        for d, _is_dir, entries in _walk_sources(top, skip):
            _record(records, d, ws.root, entries, links)
    for extra in extra_input_paths(ws):
        if extra.is_dir():
            for d, _is_dir, entries in _walk_sources(extra, skip):
                _record(records, d, ws.root, entries, links)
        else:
            _record_file(records, extra, ws.root)
    return list(records.values()), [_display(t, ws.root) for t in tops], list(links.values())


def _record(records, d: Path, root: Path, entries, links: dict[str, list]) -> None:
    try:
        st = d.stat()
    except OSError:
        return
    name = _display(d, root)
    records[name] = [name, "d", 0, st.st_mtime_ns, _dir_digest(entries)]
    for de in entries:
        if de.is_file():  # follows symlinks, as cargo does
            _record_file(records, Path(de.path), root)
        if de.is_symlink():
            try:
                text = os.readlink(de.path)
            except OSError:
                continue
            link = _display(Path(de.path), root)
            links[link] = [link, text, _display(Path(os.path.realpath(de.path)), root)]


def _record_file(records, path: Path, root: Path) -> None:
    try:
        st = path.stat()
        digest = hash_file(path)
    except OSError:
        return
    name = _display(path, root)
    records[name] = [name, "f", st.st_size, st.st_mtime_ns, digest]


def find_outside_packages(ws, recorded_dirs: list[str]) -> None:
    """The snapshot's build read path packages outside the workspace: find them (the resolving
    `cargo metadata`) before the restore takes cargo's package-cache lock, which that waits for."""
    if any(not _below_any(str(_resolve(d, ws.root)), [str(t) for t in source_dirs(ws)]) for d in recorded_dirs):
        layout.add_outside_path_packages(ws)


def normalize(ws, sources: list[list], recorded_dirs: list[str], newest_artifact_ns: int,
              links: list[list] = ()) -> RetimeStats:
    """Set recorded mtimes back on unchanged inputs; push changed/new ones past every artifact.
    Only inside the workspace's path packages (a store is not trusted to name files: see _Scope)."""
    stats = RetimeStats()
    bump_ns = max(time.time_ns(), newest_artifact_ns + 1_000_000_000)
    by_name = {s[0]: s for s in sources}
    seen: set[str] = set()
    skip = _skip_dirs(ws)
    scope = _Scope(source_dirs(ws))
    for top in source_dirs(ws):  # packages cargo reports, never a dir the manifest names (it may name any)
        if not top.is_dir():
            continue
        for d, _is_dir, entries in _walk_sources(top, skip):
            for de in entries:
                if de.is_file():  # follows symlinks, as cargo does
                    name = _display(Path(de.path), ws.root)
                    if name not in seen:
                        seen.add(name)
                        _retime_file(Path(de.path), by_name.get(name), newest_artifact_ns, bump_ns, stats, scope)
            name = _display(d, ws.root)
            if name not in seen:
                seen.add(name)
                rec = by_name.get(name)
                matches = rec is not None and rec[1] == "d" and rec[4] == _dir_digest(entries)
                _retime(d, rec[3] if matches else None, newest_artifact_ns, bump_ns, stats, scope)
    for name, rec in by_name.items():
        if name not in seen and rec[1] == "f":
            path = _resolve(name, ws.root)
            if path.is_file():
                _retime_file(path, rec, newest_artifact_ns, bump_ns, stats, scope)
    _push_old_targets(ws.root, links, by_name, newest_artifact_ns, bump_ns, stats, scope)
    scope.report()
    return stats


class _Scope:
    """Which files a restore may re-time. A store is not trusted: whoever can write one could
    otherwise move the mtime of any file this user can reach (into the past, making another
    workspace build stale). Inside the path packages (as `cargo metadata` reports them, by real
    path): everything. Reached by name inside them through a symlink that leads out (the
    workspace's own link, cargo reads through it): only pushed forward when changed, never set
    back. Anything else: left alone, said once."""

    def __init__(self, package_dirs: list[Path]):
        self.names = [str(d) for d in package_dirs]
        self.real = [os.path.realpath(d) for d in package_dirs]
        self.ignored: list[str] = []

    def verdict(self, path: Path) -> str | None:
        """"all" (set back or push forward), "forward" (push forward only), or None (leave alone)."""
        p = os.path.normpath(str(path))
        if not _below_any(p, self.names):
            return None
        return "all" if _below_any(os.path.realpath(p), self.real) else "forward"

    def report(self) -> None:
        if self.ignored:
            sys.stderr.write(f"rsnap: warning: the snapshot names {len(self.ignored)} input(s) outside the "
                             f"workspace's packages (e.g. {self.ignored[0]}); their mtimes were left alone\n")


def _push_old_targets(root: Path, links: list[list], by_name: dict, newest_artifact_ns: int, bump_ns: int,
                      stats: RetimeStats, scope: "_Scope | None" = None) -> None:
    """Cargo's fingerprints name a symlinked source by the path it resolved to at build time. A
    link that now points elsewhere (or is gone) leaves that old target unchanged and looking
    fresh, though rustc would read other content: push the old target (and, for a linked dir,
    the recorded files below it) past every artifact. Plain cargo misses this case."""
    for name, text, old_real in links:
        path = _resolve(name, root)
        try:
            if os.readlink(path) == text:
                continue
        except OSError:
            pass  # no longer a symlink
        old, prefix = _resolve(old_real, root), name + "/"
        for p in [old] + [old / n[len(prefix):] for n in by_name if n.startswith(prefix)]:
            if p.is_file():
                _retime(p, None, newest_artifact_ns, bump_ns, stats, scope)


def _retime_file(path: Path, rec, newest_artifact_ns: int, bump_ns: int, stats: RetimeStats, scope=None) -> None:
    target = None
    if rec is not None and rec[1] == "f":
        try:
            if path.stat().st_size == rec[2] and hash_file(path) == rec[4]:
                target = rec[3]
        except OSError:
            return
    _retime(path, target, newest_artifact_ns, bump_ns, stats, scope)


def _retime(path: Path, recorded_mtime: int | None, newest_artifact_ns: int, bump_ns: int, stats,
           scope: _Scope | None = None) -> None:
    try:
        st = path.stat()
        verdict = scope.verdict(path) if scope is not None else "all"
        if verdict is None or (verdict == "forward" and recorded_mtime is not None):
            if verdict is None and st.st_mtime_ns != recorded_mtime:
                scope.ignored.append(str(path))
            return  # outside the packages; or unchanged behind a link out: its mtime stays
        inode = (st.st_dev, st.st_ino)
        if recorded_mtime is not None and inode not in stats.changed:
            if st.st_mtime_ns == recorded_mtime:
                stats.kept += 1
            else:
                os.utime(path, ns=(st.st_atime_ns, recorded_mtime))
                stats.retimed += 1
                faults.point("restore.retime")
        elif recorded_mtime is not None:
            pass  # also reached under another name (a symlink) that found it changed: stays newer
        elif st.st_mtime_ns <= newest_artifact_ns:
            stats.changed.add(inode)
            stats.changed_paths.append(str(path))
            _push_forward(path, st, bump_ns, newest_artifact_ns)
            stats.bumped += 1
            faults.point("restore.retime")
        else:
            stats.changed.add(inode)
            stats.changed_paths.append(str(path))
            stats.newer += 1
    except OSError:
        pass  # unreadable or vanished: cargo will see it as changed or missing


def _push_forward(path: Path, st, bump_ns: int, newest_artifact_ns: int) -> None:
    """Make a changed input newer than every restored artifact. Setting an explicit time needs
    ownership; setting "now" only write access (a file of another user, e.g. outside the
    workspace). If neither works cargo would trust a stale artifact: say so."""
    try:
        os.utime(path, ns=(st.st_atime_ns, bump_ns))
        return
    except PermissionError:
        pass
    try:
        os.utime(path)
        if path.stat().st_mtime_ns > newest_artifact_ns:
            return
    except OSError:
        pass
    sys.stderr.write(f"rsnap: warning: {path} changed since the snapshot but its mtime cannot be made newer "
                     "than the restored artifacts (permission denied); run `cargo clean -p` on the packages "
                     "that read it\n")
