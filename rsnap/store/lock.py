"""The lock layer above the backends: restic-style lock objects for stores without a lock of
their own (docs/design.md, "Remote stores").

Saves hold the lock shared, prune exclusively, so prune never deletes a pack that a save in
progress is about to reference. A backend with its own lock (capabilities.lock, e.g. the
local store's flock) overrides `Backend.lock`; every other one comes here:
- with list and delete: lock objects locks/<kind>-<host>-<pid>-<rand>, JSON {time, host, pid,
  exclusive}, refreshed by rewriting every STALE/4 s; one whose mtime is STALE s behind the
  store's clock (measured from our own lock object) is stale and ignored;
- without delete, a shared lock is trivially held (nothing can delete what a save references)
  and an exclusive one is refused (prune cannot delete there anyway);
- otherwise (no list): refused with one line (RsnapError), never a silent unlocked save.
"""
from __future__ import annotations

import os
import random
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager

from ..errors import EXIT_LOCKED, RsnapError, StoreError


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class _Trivial:
    def check(self) -> None:
        pass


@contextmanager
def lock_objects(store, exclusive: bool):
    """The lock for `store` (a Backend without its own lock); yields an object with check()."""
    caps = store.capabilities
    if not caps.delete and not exclusive:
        yield _Trivial()
        return
    if not (caps.list and caps.delete):
        what = "list" if not caps.list else "delete"
        raise RsnapError(f"store {store.url} cannot be locked (it cannot {what} objects); "
                         f"{'prune' if exclusive else 'save'} refused")
    lk = ObjectLock(store, exclusive)
    lk.acquire()
    try:
        yield lk
    finally:
        lk.release()


class ObjectLock:
    """One lock object of ours; `check()` raises if it was lost (not refreshed in time)."""

    def __init__(self, store, exclusive: bool):
        self.store, self.exclusive = store, exclusive
        self.stale = _env_float("RSNAP_S3_LOCK_STALE", 300)
        self.wait = _env_float("RSNAP_LOCK_WAIT", 600)
        host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"
        kind = "exclusive" if exclusive else "shared"
        self.name = f"locks/{kind}-{host}-{os.getpid()}-{random.getrandbits(32):08x}"
        self._host = host
        self._stop = threading.Event()
        self._refreshed = 0.0   # time.monotonic() of the last successful write
        self._lost = False      # a refresh came too late: others may have called the lock stale
        self._thread = None

    def _write(self, measure: bool = True) -> float:
        """Write (or refresh) the lock object; returns its mtime, the store's now
        (`measure`=False: acquire reads it from its LIST of locks/ instead, one round trip less)."""
        import json
        body = json.dumps({"time": time.time(), "host": self._host, "pid": os.getpid(),
                           "exclusive": self.exclusive}).encode()
        self.store.put(self.name, body)
        self._refreshed = time.monotonic()
        if not measure:
            return 0.0
        mtime = next((m for n, _s, m in self.store.stat_all(self.name) if n == self.name), None)
        if mtime:
            self.store.clock_offset = mtime - time.time()
        return mtime or time.time()

    def _blockers(self, now: float = 0.0) -> list[tuple[str, float]]:
        """Fresh conflicting locks of others. Without `now`, the store's now is our own lock's
        mtime in the same LIST."""
        out = []
        locks = self.store.stat_all("locks/")
        if not now:
            own = next((m for n, _s, m in locks if n == self.name), None)
            if own:
                self.store.clock_offset = own - time.time()
            now = own or time.time() + self.store.clock_offset
        for name, _size, mtime in locks:
            if name == self.name:
                continue
            if now - mtime > self.stale:
                continue                # stale: its holder died or was cut off; ignored
            if self.exclusive or name.startswith("locks/exclusive-"):
                out.append((name, now - mtime))
        return out

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        told = False
        while True:
            self._write(measure=False)
            blockers = self._blockers()
            if not blockers:
                break
            self.store.delete(self.name)
            held = ", ".join(f"{n[len('locks/'):]} (refreshed {max(0, a):.0f} s ago)" for n, a in blockers[:3])
            if time.monotonic() > deadline:
                raise RsnapError(f"store {self.store.url} is locked by {held}", EXIT_LOCKED)
            if not told:
                print(f"rsnap: waiting for the lock on store {self.store.url} (held by {held})", file=sys.stderr)
                told = True
            time.sleep(random.uniform(0.5, 1.5) * min(2.0, self.stale / 10))
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True, name="rsnap-lock")
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.stale / 4):
            if time.monotonic() - self._refreshed > self.stale * 0.75:
                self._lost = True   # (a suspended process): refreshing now would hide that
                return
            try:
                self._write()
            except RsnapError:
                pass            # check() notices when refreshes stop succeeding

    def check(self) -> None:
        """Raise unless the lock was refreshed recently enough that no one calls it stale.
        Call before a destructive step (prune's deletes) or a commit (save's manifest)."""
        if self._lost or time.monotonic() - self._refreshed > self.stale * 0.75:
            raise StoreError(f"lost the lock on store {self.store.url}: it could not be refreshed for "
                             f"{time.monotonic() - self._refreshed:.0f} s")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        try:
            self.store.delete(self.name)
        except RsnapError:
            pass                # it goes stale by itself
