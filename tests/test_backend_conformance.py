"""The backend conformance suite: every store backend runs these tests unchanged (issue 20).

A backend that passes it is done. It runs against each entry of BACKENDS in
tests/backend_conformance.py: local, s3 (moto), tiered (a local tier in front of s3), ...

To add a backend (e.g. gha://): write a Harness subclass for it (tests/backend_conformance.py
says how: `name`, `proxied`, `error_cases`, a fresh namespace in `__init__`, `open()`,
`broken(case)`) and append it to BACKENDS. Its fixtures come from `request.getfixturevalue`,
so they may live in the backend's own fixtures plugin. Every test below then runs for it too:
- `backend`: every backend; the contract of base.Backend, read against the declared capabilities;
- `networked`: backends with a fault proxy (503 SlowDown, 500, reset, truncated body, 403,
  NoSuchBucket, stalls), each ending in a successful retry or the right error kind;
- `error_case`: each (backend, case) of its `error_cases` (no such bucket, unreachable).

The contract, as tested here:
- put is atomic: a reader sees one whole object. A later put replaces the object on a store
  that can delete; an immutable store (capabilities.delete False) keeps the first content or
  refuses the second put with PermanentStoreError;
- a capability declared False is a clear refusal when used (PermanentStoreError from list,
  delete, put_if_absent; the lock layer's RsnapError), never a silent no-op;
- list(prefix) is string-prefix matching ("snapshots/ab" matches "snapshots/abc/1"), sorted;
  without LIST, newest(prefix) names the newest object;
- errors: NotFoundError (missing object), PermanentStoreError (denied, no such bucket),
  TransientStoreError (throttled, unreachable, timed out, server errors through the retries);
  a range beyond the end is a StoreError ("truncated") of neither kind.
"""
from __future__ import annotations

import os
import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from backend_conformance import BACKENDS, ERROR_CASES, Harness
import rsnap.errors as errors
from rsnap.errors import NotFoundError, PermanentStoreError, RsnapError, StoreError, TransientStoreError
from rsnap.store.base import Backend, Capabilities

LARGE = (17 << 20) + 3      # above the OpenDAL backends' multipart threshold (16 MiB)
PROPERTY = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def conformance_proxy(moto_server):
    from fault_proxy import ProxyProcess
    proxy = ProxyProcess(moto_server.port)
    yield proxy
    proxy.stop()


@pytest.fixture(params=BACKENDS, ids=lambda h: h.name)
def backend(request, tmp_path) -> Harness:
    return request.param(request, tmp_path)


@pytest.fixture(params=[h for h in BACKENDS if h.proxied], ids=lambda h: h.name)
def networked(request, tmp_path) -> Harness:
    return request.param(request, tmp_path)


@pytest.fixture(params=[(h, c) for h in BACKENDS for c in h.error_cases], ids=lambda p: f"{p[0].name}-{p[1]}")
def error_case(request, tmp_path) -> tuple[Harness, str]:
    cls, case = request.param
    return cls(request, tmp_path), case


def _raises(kind, fn, *args):
    with pytest.raises(StoreError) as info:
        fn(*args)
    assert type(info.value) is kind, f"{fn.__name__}: {type(info.value).__name__} ({info.value}), not {kind.__name__}"
    assert "\n" not in str(info.value) and str(info.value)
    return info.value


def _ns() -> str:
    """A namespace of its own inside the store (for each hypothesis example)."""
    return f"t{uuid.uuid4().hex[:12]}"


# -- every backend -----------------------------------------------------------------------------

def test_capabilities_are_declared_data(backend):
    s = backend.store
    assert isinstance(s, Backend) and isinstance(s.capabilities, Capabilities)
    assert s.capabilities.connections >= 1 and isinstance(s.remote_store, bool) and s.url


def test_round_trip_and_overwrite(backend):
    s = backend.store
    data = bytes(range(256)) * 3
    s.put("snapshots/k/1-a", data)
    assert s.get("snapshots/k/1-a") == data and s.size("snapshots/k/1-a") == len(data)
    assert s.exists("snapshots/k/1-a")
    assert backend.open().get("snapshots/k/1-a") == data    # another client sees it
    try:
        s.put("snapshots/k/1-a", b"second")
    except PermanentStoreError:
        assert not s.capabilities.delete, "only an immutable store may refuse to replace an object"
    got = backend.open().get("snapshots/k/1-a")
    assert got == b"second" if s.capabilities.delete else got in (data, b"second")


def test_empty_and_large_objects(backend):
    s = backend.store
    s.put("cache/empty", b"")
    assert s.get("cache/empty") == b"" and s.size("cache/empty") == 0 and s.exists("cache/empty")
    big = os.urandom(LARGE)
    s.put("packs/bi/big", big)
    other = backend.open()
    assert other.size("packs/bi/big") == LARGE
    assert other.get("packs/bi/big") == big
    for off, n in [(0, 1), (LARGE - 7, 7), (5 << 20, 3 << 20)]:
        assert bytes(other.get_range("packs/bi/big", off, n)) == big[off:off + n]


def test_ranges(backend):
    s = backend.store
    data = os.urandom(1000)
    s.put("packs/ra/1", data)
    for off, n in [(0, 1000), (0, 1), (999, 1), (10, 500)]:
        assert bytes(s.get_range("packs/ra/1", off, n)) == data[off:off + n]
    for off, n in [(990, 20), (1000, 1), (5000, 10)]:    # beyond the end: truncated, not missing
        e = _raises(StoreError, s.get_range, "packs/ra/1", off, n)
        assert "truncated" in str(e)
    _raises(NotFoundError, s.get_range, "packs/ra/2", 0, 1)


@PROPERTY
@given(size=st.integers(1, 4096), data=st.data())
def test_ranges_property(backend, size, data):
    name = f"packs/{_ns()}/p"
    body = os.urandom(size)
    backend.store.put(name, body)
    other = backend.open()
    for _ in range(3):
        off = data.draw(st.integers(0, size - 1))
        n = data.draw(st.integers(1, size - off))
        assert bytes(other.get_range(name, off, n)) == body[off:off + n]


def test_missing_objects(backend):
    s = backend.store
    _raises(NotFoundError, s.get, "packs/mi/none")
    _raises(NotFoundError, s.get_range, "packs/mi/none", 0, 1)
    assert s.size("packs/mi/none") is None and not s.exists("packs/mi/none")
    s.put("packs/mi/here", b"x")
    assert s.missing(["packs/mi/here", "packs/mi/none", "packs/mi/gone"]) == ["packs/mi/none", "packs/mi/gone"]
    assert s.missing([]) == []
    _raises(NotFoundError, s.get_many, ["packs/mi/here", "packs/mi/none"])


def test_invalid_names_are_refused(backend):
    s = backend.store
    for bad in ["", "/abs", "../up", "a/../b", "a//b", "a/./b", "trailing/", "sp ace", "new\nline"]:
        with pytest.raises(StoreError, match="invalid object name"):
            s.put(bad, b"x")
        with pytest.raises(StoreError, match="invalid object name"):
            s.get(bad)


def test_many(backend):
    s = backend.store
    items = [(f"packs/ma/{i:02}", bytes([i]) * (i * 100)) for i in range(12)]
    s.put_many(iter(items))                   # any iterable
    s.put_many([])
    other = backend.open()
    assert other.get_many([n for n, _ in reversed(items)]) == dict(items)
    assert other.get_many([]) == {}
    assert other.missing([n for n, _ in items]) == []


def test_listing_or_its_absence(backend):
    s = backend.store
    names = ["snapshots/ab/2-x", "snapshots/a/1-x", "snapshots/abc/3-x", "packs/00/p", "cache/c"]
    for i, n in enumerate(names):
        s.put(n, b"x" * i)
    if s.capabilities.list:
        assert s.list("snapshots/ab") == ["snapshots/ab/2-x", "snapshots/abc/3-x"]
        assert s.list("snapshots/ab/") == ["snapshots/ab/2-x"]
        assert s.list("snapshots/") == sorted(n for n in names if n.startswith("snapshots/"))
        assert s.list("nothing/") == []
        assert s.list() == sorted(names)
        stat = s.stat_all("snapshots/a")
        assert [(n, size) for n, size, _m in stat] == [(n, names.index(n)) for n in sorted(names) if n.startswith("snapshots/a")]
        assert all(abs(m - s.now()) < 600 for _n, _s, m in stat)
    else:
        _raises(PermanentStoreError, s.list, "snapshots/")
    s.put("snapshots/n/1-old", b"o")
    s.put("snapshots/n/2-new", b"n")
    assert backend.open().newest("snapshots/n/") == "snapshots/n/2-new"
    assert s.newest("snapshots/none/") is None


def _valid(name: str) -> bool:
    return "//" not in name and not name.startswith("/") and not name.endswith("/")


@PROPERTY
@given(names=st.sets(st.text("ab/", min_size=1, max_size=6).filter(_valid), min_size=1, max_size=6),
       prefix=st.text("ab/", max_size=4).filter(lambda p: "//" not in p and not p.startswith("/")))
def test_list_prefix_property(backend, names, prefix):
    """Names are never a directory of another ("a" and "a/b": a file system cannot hold both);
    a prefix is the start of some valid name."""
    s = backend.store
    names = {n for n in names if not any(f.startswith(n + "/") for f in names)}
    if not s.capabilities.list:
        return      # test_listing_or_its_absence checked the refusal
    ns = _ns()
    s.put_many([(f"{ns}/{n}", n.encode()) for n in names])
    assert s.list(f"{ns}/{prefix}") == sorted(f"{ns}/{n}" for n in names if n.startswith(prefix))


def test_delete(backend):
    s = backend.store
    s.put("packs/de/1", b"x")
    if not s.capabilities.delete:
        _raises(PermanentStoreError, s.delete, "packs/de/1")
        assert s.exists("packs/de/1")
        return
    s.delete("packs/de/1")
    s.delete("packs/de/1")          # idempotent
    s.delete("packs/de/never")
    other = backend.open()
    assert not other.exists("packs/de/1") and other.size("packs/de/1") is None
    _raises(NotFoundError, other.get, "packs/de/1")
    if s.capabilities.list:
        assert other.list("packs/de/") == []
    s.put_many([("packs/de/a", b"1"), ("packs/de/b", b"2")])
    s.delete_many(["packs/de/a", "packs/de/b", "packs/de/c"])
    assert other.missing(["packs/de/a", "packs/de/b"]) == ["packs/de/a", "packs/de/b"]


def test_put_if_absent(backend):
    s = backend.store
    if not s.capabilities.conditional_create:
        _raises(PermanentStoreError, s.put_if_absent, "locks/pia", b"1")
        return
    assert s.put_if_absent("locks/pia", b"first") is True
    assert backend.open().put_if_absent("locks/pia", b"second") is False
    assert s.get("locks/pia") == b"first"
    if s.capabilities.list:
        assert s.list("locks/") == ["locks/pia"]     # no temporary object left behind


def _race(n: int, fn) -> list:
    """Run fn(i) for i < n in threads released together; their results (or exceptions)."""
    barrier, out = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - the test judges it
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_conditional_create_first_writer_wins(backend):
    if not backend.store.capabilities.conditional_create:
        return      # test_put_if_absent checked the refusal
    clients = [backend.open() for _ in range(6)]
    won = _race(6, lambda i: clients[i].put_if_absent("locks/race", f"writer {i}".encode() * 1000))
    assert won.count(True) == 1 and won.count(False) == 5, won
    assert backend.store.get("locks/race") == f"writer {won.index(True)}".encode() * 1000


def test_concurrent_writers(backend):
    s = backend.store
    clients = [backend.open() for _ in range(6)]
    bodies = [os.urandom(50_000 + i) for i in range(6)]
    # different names, one shared client and one each
    assert _race(6, lambda i: s.put(f"packs/cw/{i}", bodies[i])) == [None] * 6
    assert _race(6, lambda i: clients[i].put(f"packs/cx/{i}", bodies[i])) == [None] * 6
    assert s.get_many([f"packs/cw/{i}" for i in range(6)]) == {f"packs/cw/{i}": bodies[i] for i in range(6)}
    assert backend.open().get_many([f"packs/cx/{i}" for i in range(6)]) == {f"packs/cx/{i}": bodies[i] for i in range(6)}
    # one name, the same content (two saves writing one content-addressed pack)
    assert _race(6, lambda i: clients[i].put("packs/cs/same", bodies[0])) == [None] * 6
    assert backend.open().get("packs/cs/same") == bodies[0]
    # one name, different contents: one whole content survives
    results = _race(6, lambda i: clients[i].put("snapshots/cd/one", bodies[i]))
    assert all(r is None or (isinstance(r, PermanentStoreError) and not s.capabilities.delete) for r in results), results
    assert backend.open().get("snapshots/cd/one") in bodies


def test_lock_matches_capabilities(backend):
    """A backend with its own lock (capabilities.lock) or lock objects (list and delete) excludes
    a second client: prune (exclusive) waits for a save (shared). Otherwise the lock layer refuses."""
    s = backend.store
    caps = s.capabilities
    if not (caps.lock or (caps.list and caps.delete)):
        with pytest.raises(RsnapError, match="cannot be locked"):
            with s.lock(exclusive=True):
                pass
        return
    order: list[str] = []
    other = backend.open()
    with s.lock(exclusive=False) as held:
        held.check()
        if not caps.lock and caps.list:
            assert len(s.list("locks/")) == 1          # the lock layer's object
        waiter = threading.Thread(target=lambda: _take(other, order))
        waiter.start()
        with backend.open().lock(exclusive=False) as shared:   # shared locks do not exclude each other
            shared.check()
        order.append("released")
    waiter.join()
    assert order == ["released", "acquired"]
    if caps.list:
        assert s.list("locks/") == []


def _take(store, order: list) -> None:
    with store.lock(exclusive=True) as held:
        held.check()
        order.append("acquired")


# -- through the fault proxy -------------------------------------------------------------------

def _ops(h: Harness):
    """(name, fn) of reads and writes that cross the network: each reads an object of its own
    that another client wrote (a tiered store has no local copy of it)."""
    body = b"payload" * 100
    h.open().put_many([(f"packs/fa/{op}", body) for op in ("get", "range", "size", "list")])
    s = h.store
    ops = [("get", lambda: s.get("packs/fa/get") == body),
           ("range", lambda: bytes(s.get_range("packs/fa/range", 7, 14)) == body[7:21]),
           ("size", lambda: s.size("packs/fa/size") == len(body)),
           ("put", lambda: s.put("packs/fa/put", b"new") is None and h.open().get("packs/fa/put") == b"new")]
    if s.capabilities.list:
        ops.append(("list", lambda: s.list("packs/fa/list") == ["packs/fa/list"]))
    return ops


FAULT_STATUS = {"503": 503, "500": 500, "drop": 0, "403": 403, "404": 404}


@pytest.mark.parametrize("fault", ["503", "500", "drop"])
def test_a_passing_fault_is_retried(networked, fault):
    for what, op in _ops(networked):
        networked.proxy.reset_stats()
        networked.proxy.inject(fault, times=1)
        assert op(), f"{what} after one {fault}"
        # the fault met a request, so the right answer came from a retry (the proxy logs an
        # answer after sending it: the retry's own entry may not be there yet)
        statuses = [status for _m, _p, status in networked.proxy.stats().log]
        assert statuses.count(FAULT_STATUS[fault]) == 1, (what, statuses)


def test_a_truncated_body_is_retried_or_refused(networked):
    body = os.urandom(300_000)
    networked.open().put("packs/tr/1", body)
    networked.proxy.inject("truncate", times=1, method="GET")
    try:
        got = networked.store.get("packs/tr/1")
    except StoreError as e:
        assert "truncated" in str(e)
    else:
        assert got == body


@pytest.mark.parametrize("fault,kind", [("503", TransientStoreError), ("500", TransientStoreError),
                                        ("drop", TransientStoreError), ("403", PermanentStoreError),
                                        ("404", PermanentStoreError)])
def test_a_lasting_fault_has_its_kind(networked, fault, kind):
    ops = _ops(networked)
    networked.proxy.inject(fault, times=None)
    for what, op in ops:
        if fault == "404" and what == "size":
            continue    # a HEAD answer has no body to say NoSuchBucket: a missing object, by HTTP
        _raises(kind, op)


def test_a_stall_is_waited_out_or_times_out(networked):
    """A server slower than usual but within the timeout is waited for; a stat that stalls past
    the backend's timeout is a TransientStoreError. (Reads and writes run under a separate
    data timeout, see opendal_backend: not shortened here.)"""
    if not networked.stat_timeout:
        return
    ops = dict(_ops(networked))
    networked.proxy.set(latency=networked.stat_timeout / 3)
    assert ops["get"]() and ops["size"]()
    networked.open().put("packs/fa/stalled", b"x")
    networked.proxy.set(latency=networked.stat_timeout * 2)
    _raises(TransientStoreError, networked.store.size, "packs/fa/stalled")


# -- each backend's error cases ----------------------------------------------------------------

def test_error_case_has_its_kind(error_case):
    harness, case = error_case
    kind = getattr(errors, ERROR_CASES[case])
    try:
        s = harness.broken(case)
    except StoreError as e:           # refused on opening: as good, if of the right kind
        assert type(e) is kind
        return
    _raises(kind, s.get, "packs/ec/1")
    _raises(kind, s.put, "packs/ec/1", b"x")
    if s.capabilities.list:
        _raises(kind, s.list, "snapshots/")
