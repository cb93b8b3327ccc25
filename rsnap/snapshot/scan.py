"""Walking a root into manifest entries, with a stat cache so unchanged files are not re-read.

The stat cache (`<root>/.rsnap/state`) maps relpath -> [size, mtime_ns, ino, ctime_ns, digest].
A file whose (size, mtime_ns, ino, ctime_ns) is unchanged since rsnap last hashed or wrote
it has the recorded digest; any write to a file changes its ctime.
"""
from __future__ import annotations

import json
import mmap
import os
import stat
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import xxhash
import zstandard

from ..cargo.layout import RSNAP_DIR
from ..errors import RsnapError, EXIT_WORKSPACE

STATE_FILE = "state"


class Found(NamedTuple):  # not a dataclass: see rsnap.repository.manifest
    rel: str
    type: str          # "f", "d", "l"
    mode: int
    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    link: str = ""
    nlink: int = 1
    dev: int = 0

    def stat_key(self):
        return [self.size, self.mtime_ns, self.ino, self.ctime_ns]


def walk(root: Path, subtrees: Iterable[str] = ("",), exclude: Callable[[str], bool] = lambda r: False):
    """Yield Found for every file, dir and symlink below root/subtree (not the subtree dir itself)."""
    for sub in subtrees:
        start = root / sub if sub else root
        if not start.is_dir() or start.is_symlink():
            continue
        yield from _walk_dir(start, sub, exclude)


def _walk_dir(path: Path, rel_prefix: str, exclude):
    try:
        it = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return
    except PermissionError:
        raise RsnapError(f"cannot read directory {path}: permission denied", EXIT_WORKSPACE) from None
    for de in it:
        rel = f"{rel_prefix}/{de.name}" if rel_prefix else de.name
        if rel == RSNAP_DIR or exclude(rel):
            continue
        try:
            st = de.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            yield Found(rel, "l", 0o777, 0, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, os.readlink(de.path))
        elif stat.S_ISDIR(st.st_mode):
            yield Found(rel, "d", stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            yield from _walk_dir(Path(de.path), rel, exclude)
        elif stat.S_ISREG(st.st_mode):
            yield Found(rel, "f", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns,
                        nlink=st.st_nlink, dev=st.st_dev)
        # sockets, fifos and devices are never part of a snapshot


MAP_FROM = 1 << 20


def read_and_hash(path) -> tuple[bytes | mmap.mmap, str]:
    """A file's content and its xxh3-128. Big files are mapped, not read: reading a 40 MiB debug
    binary into a new buffer costs ~60 ms of page faults and copying, mapping it ~8 ms. (A file
    truncated while mapped would fault; saves hold cargo's locks, so cargo does not write it.)"""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < MAP_FROM:
            data = f.read()
        else:
            data = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                             prot=mmap.PROT_READ)
    return data, xxhash.xxh3_128_hexdigest(data)


class StatCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / RSNAP_DIR / STATE_FILE
        self.files: dict[str, list] = {}

    def load(self) -> "StatCache":
        try:
            raw = zstandard.ZstdDecompressor().decompress(self.path.read_bytes(), max_output_size=1 << 31)
            doc = json.loads(raw)
            if doc.get("version") == 1:
                self.files = doc["files"]
        except (OSError, ValueError, zstandard.ZstdError, KeyError, TypeError):
            self.files = {}
        return self

    def digest_for(self, f: Found) -> str | None:
        rec = self.files.get(f.rel)
        if rec and rec[:4] == f.stat_key():
            return rec[4]
        return None

    def remember(self, f: Found, digest: str) -> None:
        self.files[f.rel] = f.stat_key() + [digest]

    def retimed(self, rel: str, before: os.stat_result, after: os.stat_result) -> None:
        """rsnap itself changed only the times of `rel` (its ctime moved): keep the digest if
        the entry described the file as it was just before."""
        rec = self.files.get(rel)
        old, new = _stat_key(before), _stat_key(after)
        if rec and rec[:4] == old and new[:3] == old[:3]:
            self.files[rel] = new + [rec[4]]

    def remember_path(self, rel: str, abs_path, digest: str) -> None:
        self.files[rel] = _stat_key(os.lstat(abs_path)) + [digest]

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            raw = json.dumps({"version": 1, "files": self.files}, separators=(",", ":")).encode()
            tmp.write_bytes(zstandard.ZstdCompressor(level=1).compress(raw))
            os.replace(tmp, self.path)
        except OSError:
            pass  # the cache only saves time; losing it is harmless

    def invalidate(self) -> None:
        self.files = {}
        try:
            self.path.unlink()
        except OSError:
            pass


def _stat_key(st: os.stat_result) -> list:
    """What the stat cache compares: size, mtime, inode, ctime (any write moves ctime)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
