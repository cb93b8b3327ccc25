"""The lock layer above the backends: restic-style lock objects, with a lease on the server's
clock, for stores without a lock of their own (docs/design.md, "Remote stores").

Saves hold the lock shared, prune exclusively, so prune never deletes a pack that a save in
progress is about to reference. A backend with its own lock (capabilities.lock, e.g. the
local store's flock) overrides `Backend.lock`; every other one comes here:
- with list and delete: lock objects locks/<kind>-<host>-<pid>-<rand>, JSON {time, host, pid,
  exclusive, stale}; the holder's lease is the chain of the object's own LastModified values
  (ObjectLock); others call it stale once its LastModified is more than the larger of their
  STALE and the holder's behind the store's clock (their own fresh lock object's LastModified);
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

    def time_left(self) -> None:
        return None


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


def lease_limit(stale: float) -> float:
    """The longest gap between two links of a lease's chain that keeps it: 3/4 of STALE, so
    that LastModified's resolution (1 s on S3, on both sides) and the time a lock PUT takes to
    become visible fit in the last quarter (75 s of the default 300; STALE >= 12 s on S3)."""
    return stale * 0.75


class ObjectLock:
    """One lock object of ours, and the lease it carries (docs/design.md, "Remote stores").

    The lease is the chain of our object's own LastModified values, on the server's clock:
    each write (acquire, the refresh thread every STALE/6, every `check()`) reads back the
    LastModified it got, and a gap of more than `lease_limit(STALE)` since the previous one
    loses the lease for good, even though that write succeeded: in the gap someone may have
    called the lock stale. A suspended or stopped process cannot see such a gap on its own
    clocks (time.monotonic() stops in suspend; the wall clock may jump), the server's can."""

    def __init__(self, store, exclusive: bool):
        self.store, self.exclusive = store, exclusive
        self.stale = _env_float("RSNAP_S3_LOCK_STALE", 300)
        self.limit = lease_limit(self.stale)
        self.wait = _env_float("RSNAP_LOCK_WAIT", 600)
        host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"
        kind = "exclusive" if exclusive else "shared"
        self.name = f"locks/{kind}-{host}-{os.getpid()}-{random.getrandbits(32):08x}"
        self._host = host
        self._stop = threading.Event()
        self._io = threading.Lock()     # one write of the chain at a time
        self._last: float | None = None  # LastModified of the chain's newest link (server clock)
        self._last_started = 0.0        # time.monotonic() when that link's PUT was sent
        self._lost: str | None = None   # why the lease is gone (never comes back)
        self._thread = None

    def _body(self) -> bytes:
        import json
        return json.dumps({"time": time.time(), "host": self._host, "pid": os.getpid(),
                           "exclusive": self.exclusive, "stale": self.stale}).encode()

    def _own_mtime(self, entries=None) -> float | None:
        entries = self.store.stat_all(self.name) if entries is None else entries
        return next((m for n, _s, m in entries if n == self.name), None)

    def _link(self, mtime: float | None, started: float) -> None:
        """Append a write's LastModified to the chain (caller holds self._io)."""
        if mtime is None:
            self._lost = f"lost the lock on store {self.store.url}: its lock object {self.name} vanished"
        elif self._last is not None and mtime - self._last > self.limit:
            self._lost = (f"lost the lock on store {self.store.url}: refreshed {mtime - self._last:.0f} s after "
                          f"the previous refresh on the store's clock (limit {self.limit:g} s of "
                          f"RSNAP_S3_LOCK_STALE={self.stale:g}; suspended or stalled?)")
        else:
            self._last, self._last_started = mtime, started
            self.store.clock_offset = mtime - time.time()

    def refresh(self) -> float:
        """Write the lock object again and extend the lease; raise StoreError if it is lost."""
        with self._io:
            if self._lost:
                raise StoreError(self._lost)
            started = time.monotonic()
            self.store.put_within(self.name, self._body(), max(1.0, self.limit))
            self._link(self._own_mtime(), started)
            if self._lost:
                raise StoreError(self._lost)
            return self._last

    def time_left(self) -> float:
        """Seconds the lease surely holds from now by our monotonic clock (an overestimate
        after a suspend: the next `check()` finds that out on the server's clock)."""
        return self.limit - (time.monotonic() - self._last_started)

    def _blockers(self, locks, now: float) -> list[tuple[str, float]]:
        """Fresh conflicting locks of others at the store's `now`. A lock is stale when its
        LastModified is more than the larger of our STALE and its holder's behind `now`."""
        out = []
        for name, _size, mtime in locks:
            if name == self.name or not (self.exclusive or name.startswith("locks/exclusive-")):
                continue
            age = now - mtime
            if age > self.stale:
                theirs = self._holders_stale(name)
                if theirs is None or age > theirs:
                    continue            # stale: its holder died or was cut off; ignored
            out.append((name, age))
        return out

    def _holders_stale(self, name: str) -> float | None:
        """The STALE its holder wrote into a lock object; None if it is gone."""
        import json
        from ..errors import NotFoundError
        try:
            return float(json.loads(self.store.get(name)).get("stale", 0))
        except NotFoundError:
            return None
        except (ValueError, TypeError, AttributeError):
            return 0.0          # unreadable: our STALE alone decides

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        told = False
        while True:
            started = time.monotonic()
            self.store.put(self.name, self._body())
            locks = self.store.stat_all("locks/")
            own = self._own_mtime(locks)
            now = own if own is not None else time.time() + self.store.clock_offset
            blockers = self._blockers(locks, now)
            if not blockers:
                with self._io:
                    self._link(own, started)
                if self._lost:
                    raise StoreError(self._lost)
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
        while not self._stop.wait(self.stale / 6):
            try:
                self.refresh()
            except StoreError:
                if self._lost:
                    return      # for good: check() reports it
                # a failed write: the chain's next link measures the gap

    def check(self) -> None:
        """Refresh now and raise StoreError unless the lease held without a gap since it was
        taken. Call right before a destructive step (prune's deletes) or a commit (save's
        manifest), and after the commit."""
        try:
            self.refresh()
        except StoreError as e:
            raise StoreError(str(e) if self._lost else f"lost the lock on store {self.store.url}: "
                             f"cannot refresh it ({e})") from None

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        try:
            self.store.delete(self.name)
        except RsnapError:
            pass                # it goes stale by itself
