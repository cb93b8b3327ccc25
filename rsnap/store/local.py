"""The local backend: store objects are files under a directory (a path or file:// URL)."""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .. import faults
from ..errors import EXIT_NOSPACE, NotFoundError, PermanentStoreError, RsnapError, StoreError
from .base import Backend, Capabilities, HeldLock, check_name

MAP_FROM = 1 << 20  # get_range maps ranges this long instead of reading them


class LocalStore(Backend):
    """Objects are files under `root`; writes go to a temp file, fsync, then rename."""

    capabilities = Capabilities(list=True, delete=True, lock=True, conditional_create=True,
                                ranged_reads=True, connections=1)

    def __init__(self, root: Path, create: bool = True):
        self.root = Path(root)
        self.url = str(self.root)
        if not self.root.is_dir():
            if not create:
                raise NotFoundError(f"store {self.root} does not exist")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store {self.root}: {e.strerror}") from None

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int | None:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            return None

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"store object {name} is missing from {self.root}") from None
        except OSError as e:
            raise _error(e)(f"cannot read {name} from store {self.root}: {e.strerror}") from None

    def get_range(self, name: str, offset: int, length: int):
        """bytes, or for a long range a memoryview of the mapped object: packs are immutable
        (prune unlinks, never truncates), and mapping spares a copy of every restored byte."""
        try:
            with open(self._path(name), "rb") as f:
                if offset + length > os.fstat(f.fileno()).st_size:
                    raise StoreError(f"store object {name} is truncated")
                if length >= MAP_FROM:
                    mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                    return memoryview(mapped)[offset:offset + length]
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:
            raise NotFoundError(f"store object {name} is missing from {self.root}") from None
        except OSError as e:
            raise _error(e)(f"cannot read {name} from store {self.root}: {e.strerror}") from None
        if len(data) != length:
            raise StoreError(f"store object {name} is truncated")
        return data

    def put(self, name: str, data: bytes) -> None:
        self._write(name, data, os.replace)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create `name` unless it exists (a hard link fails if the name is taken)."""
        created = True

        def link(tmp, path):
            nonlocal created
            try:
                os.link(tmp, path)
            except FileExistsError:
                created = False
            os.unlink(tmp)
        self._write(name, data, link)
        return created

    def _write(self, name: str, data: bytes, commit) -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            import tempfile  # only saves write to the store; restore need not import it
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                faults.point(f"store.{name.split('/')[0]}.tmp")
                commit(tmp, path)
                faults.point(f"store.{name.split('/')[0]}")
            except BaseException:
                _unlink_quietly(tmp)
                raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise RsnapError(f"cannot write {name} to store {self.root}: {e.strerror} (disk full or file size limit)",
                                 EXIT_NOSPACE) from None
            raise _error(e)(f"cannot write {name} to store {self.root}: {e.strerror}") from None

    def delete(self, name: str) -> None:
        _unlink_quietly(self._path(name))

    def touch(self, name: str) -> None:
        """Mark an object as recently used (LRU for the compile cache)."""
        try:
            os.utime(self._path(name))
        except OSError:
            pass

    def list(self, prefix: str = "") -> list[str]:
        """Names of all objects whose name starts with `prefix` (temp files excluded)."""
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        out = []
        if not base.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(base):
            for fn in files:
                if fn.startswith(".tmp-") or fn.startswith(".lock"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fn), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def stat_all(self, prefix: str = "") -> list[tuple[str, int, float]]:
        """(name, size, mtime) of objects under prefix, for LRU eviction."""
        out = []
        for name in self.list(prefix):
            try:
                st = self._path(name).stat()
            except FileNotFoundError:
                continue
            out.append((name, st.st_size, st.st_mtime))
        return out

    def lock_path(self) -> Path:
        return self.root / ".lock"

    @contextmanager
    def lock(self, exclusive: bool):
        """flock on <store>/.lock: saves hold it shared (from reading the blobs they dedupe
        against until their manifest is written), prune exclusive, so prune never deletes a
        pack that a save in progress is about to reference."""
        try:
            fd = os.open(self.lock_path(), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _error(e)(f"cannot lock store {self.root}: {e.strerror}") from None
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"rsnap: waiting for the lock on store {self.root}", file=sys.stderr)
                fcntl.flock(fd, mode)
            yield HeldLock()
        finally:
            os.close(fd)


def _error(e: OSError) -> type[StoreError]:
    return PermanentStoreError if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else StoreError


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
