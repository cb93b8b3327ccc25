"""What a snapshot covers and how it is held: its roots (target dir, separate build dir,
CARGO_HOME), cargo's locks on them, the marker of an unfinished restore, the worker count."""
from __future__ import annotations

import errno
import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

from ..cargo import layout, usage
from ..errors import RsnapError, EXIT_NOSPACE, EXIT_WORKSPACE, EXIT_LOCKED
from ..repository import manifest as mf

RESTORING_MARKER = "restoring"


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


class RootSpec(NamedTuple):  # NamedTuples and plain classes, not dataclasses: see rsnap.repository.manifest
    name: str
    path: Path
    subtrees: list[str]
    exclude: Callable[[str], bool]
    merge: bool


def root_specs(ws, home_excluded: frozenset[str] = frozenset()) -> list[RootSpec]:
    """`home_excluded`: $CARGO_HOME paths (and everything below them) kept out of the snapshot."""
    specs = [RootSpec("target", ws.target_dir, [""], _excluding(ws.build_dir, ws.target_dir), False)]
    if units_root(ws) == "build":  # build.build-dir set apart (anywhere, even inside the target dir)
        specs.append(RootSpec("build", ws.build_dir, [""], _excluding(ws.target_dir, ws.build_dir), False))

    def home_exclude(rel: str) -> bool:
        return layout.is_cargo_home_excluded(rel) or rel in home_excluded

    specs.append(RootSpec("cargo_home", ws.cargo_home, list(layout.CARGO_HOME_TREES), home_exclude, True))
    return specs


def units_root(ws) -> str:
    """The root holding cargo's units: the build dir, "build" when it is not the target dir."""
    return "build" if ws.build_dir != ws.target_dir else "target"


def units_root_of(m: mf.Manifest) -> str:
    """The root of a snapshot that holds cargo's units."""
    return "build" if m.root("build") is not None else "target"


def _excluding(other: Path, root: Path) -> Callable[[str], bool]:
    """What a target/build root leaves out: what no snapshot holds, and the other of the two
    dirs when it lies inside this one (it is a root of its own)."""
    if other == root or not other.is_relative_to(root):
        return layout.is_excluded_target_path
    inner = other.relative_to(root).as_posix()
    return lambda rel: layout.is_excluded_target_path(rel) or rel == inner or rel.startswith(inner + "/")


def root_path(ws, name: str) -> Path:
    return {"target": ws.target_dir, "build": ws.build_dir, "cargo_home": ws.cargo_home}[name]


@contextmanager
def locked(path: Path, what: str, exclusive: bool = True, wait: bool = True):
    """flock(2) on `path` (the same lock cargo takes on .package-cache / .cargo-lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise os_error(f"locking {what}", e) from None
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
                found.add(root_path(ws, root.name).joinpath(*parts[:-1], ".cargo-lock"))
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
                raise os_error(f"locking {p}", e) from None
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


def os_error(action: str, e: OSError) -> RsnapError:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RsnapError(f"{action} failed: {e.strerror}{where}: disk full or file size limit", EXIT_NOSPACE)
    return RsnapError(f"{action} failed: {e.strerror}{where}", EXIT_WORKSPACE)


def arm_usage(ws, retimed: list | None = None) -> None:
    """Start gc's usage epoch (see rsnap.cargo.usage); failing to is a warning, never an error."""
    try:
        usage.arm(ws, retimed=retimed)
    except OSError as e:
        sys.stderr.write(f"rsnap: warning: could not start usage tracking for gc: {e}\n")


def restore_interrupted(ws) -> bool:
    """True if a previous restore into this target dir did not finish."""
    return any((p / layout.RSNAP_DIR / RESTORING_MARKER).exists() for p in {ws.target_dir, ws.build_dir})
