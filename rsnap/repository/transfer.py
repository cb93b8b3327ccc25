"""Restore from a remote store: the pack ranges a restore needs, fetched ahead in parallel.

Restore (rsnap.snapshot.restore) works in tasks, each one contiguous range of one pack, and
reads it with `store.get_range`. Over S3 each of those is a round trip, and restore's pool
has one thread per CPU. `RangePrefetcher` wraps the store: `prefetch(ranges)` is given every
range restore is about to read, in the order it will read them; it coalesces ranges of a pack
that lie within GAP of each other into one ranged GET (so a pack most of which is needed
comes in one request, nearly whole; a pack of which little is needed costs a few small
GETs), and fetches them with `jobs` requests in flight, at most BUDGET bytes held ahead of
the readers. `get_range` then slices the fetched bytes (a range not announced, or not yet
fetched, is read on demand: readers never wait on the budget, so they cannot deadlock on it).
Every byte is still decompressed and verified against its hash by restore, as for a local
store. A failed fetch raises its StoreError in the reader that needed the range.
"""
from __future__ import annotations

import bisect
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import StoreError

GAP = int(os.environ.get("RSNAP_FETCH_GAP", 1 << 20))      # ~ what one round trip costs in transfer
BUDGET = int(os.environ.get("RSNAP_FETCH_BUDGET", 256 << 20))
MAX_FETCH = 32 << 20                                          # one GET covers at most this


class _Fetch:
    __slots__ = ("name", "start", "end", "users", "future", "data")

    def __init__(self, name: str, start: int, end: int):
        self.name, self.start, self.end = name, start, end
        self.users = 0
        self.future: Future | None = None
        self.data = None


class RangePrefetcher:
    def __init__(self, store, jobs: int | None = None, budget: int = BUDGET):
        self.store = store
        self.jobs = jobs or store.capabilities.connections
        self.budget = budget
        self._by_name: dict[str, list[_Fetch]] = {}
        self._starts: dict[str, list[int]] = {}
        self._cond = threading.Condition()
        self._held = 0
        self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="rsnap-fetch")
        self._feeder = None
        self._closed = False
        self.requests = 0
        self.bytes_fetched = 0

    def prefetch(self, ranges) -> None:
        """ranges: (object name, start, end) in the order they will be read."""
        order: list[_Fetch] = []
        per_name: dict[str, list[tuple[int, int]]] = {}
        first_use: dict[str, int] = {}
        for i, (name, start, end) in enumerate(ranges):
            per_name.setdefault(name, []).append((start, end))
            first_use.setdefault(name, i)
        for name, spans in per_name.items():
            spans.sort()
            fetches = []
            for start, end in spans:
                last = fetches[-1] if fetches else None
                if last and start <= last.end + GAP and max(end, last.end) - last.start <= MAX_FETCH:
                    last.end = max(last.end, end)
                else:
                    fetches.append(_Fetch(name, start, end))
                fetches[-1].users += 1
            self._by_name[name] = fetches
            self._starts[name] = [f.start for f in fetches]
        # fetch in the order restore first needs each pack
        for name in sorted(per_name, key=first_use.__getitem__):
            order.extend(self._by_name[name])
        self._feeder = threading.Thread(target=self._feed, args=(order,), daemon=True, name="rsnap-prefetch")
        self._feeder.start()

    def _feed(self, order: list[_Fetch]) -> None:
        for f in order:
            size = f.end - f.start
            with self._cond:
                while not self._closed and self._held and self._held + size > self.budget:
                    self._cond.wait()
                if self._closed:
                    return
                self._submit(f)

    def _submit(self, f: _Fetch) -> None:
        """Under self._cond."""
        if f.future is None and f.users > 0:
            self._held += f.end - f.start
            f.future = self._pool.submit(self._get, f)

    def _get(self, f: _Fetch):
        data = self.store.get_range(f.name, f.start, f.end - f.start)
        with self._cond:
            self.requests += 1
            self.bytes_fetched += f.end - f.start
        return data

    def _find(self, name: str, offset: int, length: int) -> _Fetch | None:
        starts = self._starts.get(name)
        if not starts:
            return None
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0:
            return None
        f = self._by_name[name][i]
        return f if offset + length <= f.end and f.users > 0 else None

    def get_range(self, name: str, offset: int, length: int):
        with self._cond:
            f = self._find(name, offset, length)
            if f is None:
                return self.store.get_range(name, offset, length)
            self._submit(f)          # on demand, if the feeder has not got to it yet
            future = f.future
        try:
            data = future.result()
        finally:
            with self._cond:
                f.users -= 1
                if f.users == 0:
                    self._held -= f.end - f.start
                    f.future = None         # its bytes go once the last reader has them
                    self._cond.notify_all()
        return memoryview(data)[offset - f.start:offset - f.start + length]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._feeder:
            self._feeder.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __getattr__(self, attr):          # everything else: the wrapped store
        return getattr(self.store, attr)


def reader(store, ranges):
    """The store restore should read through, given the (object, start, end) ranges it will
    read in order: a local store as is; a tiered store after copying the packs its local
    directory lacks (whole, in parallel); a remote store behind a RangePrefetcher. Call
    `close(reader)` when done."""
    ranges = list(ranges)
    if not store.remote_store or not ranges:
        return store
    try:
        filled = store.fill(sorted({name for name, _s, _e in ranges}))
    except StoreError:  # a damaged pack: the tier reads each on demand, and restore names the bad one
        filled = 0
    if filled is not None:
        return store            # a local tier holds them now
    fetcher = RangePrefetcher(store)
    fetcher.prefetch(ranges)
    return fetcher


def close(store) -> None:
    if isinstance(store, RangePrefetcher):
        store.close()
