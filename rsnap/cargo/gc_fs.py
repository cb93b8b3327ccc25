"""What every part of GC does to files: size them, read them without touching atime, delete
them atomically (rename into `<root>/.rsnap/trash`, then empty it), lock them as cargo does,
and tally what was kept and removed."""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import stat
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

from ..errors import RsnapError, EXIT_LOCKED
from ..faults import point as _fault_point   # RSNAP_FAULT=gc:N: SIGKILL after the N-th deletion
from .layout import RSNAP_DIR

# NamedTuples and plain classes, not dataclasses: every save imports GC (see rsnap.repository.manifest)

TRASH = "trash"
LOCK_TIMEOUT_S = 600.0


class Item(NamedTuple):
    """A file or dir to delete or keep, with its size."""
    path: Path
    bytes: int
    is_dir: bool


def scandir(path) -> list:
    try:
        return list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def tree_bytes(path: Path) -> int:
    """Size of a file or symlink, or the total size of the files below a directory."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return _dir_bytes(path) if stat.S_ISDIR(st.st_mode) else st.st_size


def file_bytes(entry) -> int:
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


def item_of(path: Path) -> Item:
    isdir = path.is_dir() and not path.is_symlink()
    return Item(path, tree_bytes(path), isdir)


def contains_noatime(path: Path, needles: list[bytes]) -> list[bool]:
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


class Deleter:
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
                    _fault_point("gc.trash")   # the trash dir exists, nothing moved yet
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
                _fault_point("gc.empty_trash")
                shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def exclusive_flock(path: Path, what: str, timeout: float = LOCK_TIMEOUT_S, create: bool = True):
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
def target_locks(profiles: list[Path], timeout: float):
    with ExitStack() as stack:
        for p in profiles:
            stack.enter_context(exclusive_flock(p / ".cargo-lock", f"build directory {p}", timeout))
            stack.enter_context(exclusive_flock(p / ".cargo-build-lock", f"build directory {p}", timeout, create=False))
        yield
