"""The backends the conformance suite (tests/test_backend_conformance.py) runs against.

A Harness gives each test a fresh, empty namespace of one backend: `store` (the client under
test), `open()` (another client on the same namespace, as another runner would open it: for a
tiered store, a new local tier in front of the same remote) and, for a backend that talks over
the network, a fault proxy between client and server and the clients that meet each error
case. BACKENDS lists them; every test of the suite runs once per entry.

Adding a backend: subclass Harness (here, or in the backend's own fixtures module), set `name`,
`proxied` and `error_cases`, build the client in `__init__` from the pytest fixtures you need
(`request.getfixturevalue("my_server")`), and append the class to BACKENDS. Nothing else changes.
"""
from __future__ import annotations

import os
import time

from rsnap.store.base import Backend

# What `broken(case)` returns a client for: each case's error kind (rsnap.errors)
ERROR_CASES = {
    "no_container": "PermanentStoreError",  # the bucket (or the cache, account...) does not exist
    "unreachable": "TransientStoreError",   # nothing answers at the endpoint
}


class Harness:
    name = "?"
    proxied = False             # `proxy` breaks requests between client and server (the fault tests)
    error_cases: tuple[str, ...] = ()   # keys of ERROR_CASES that broken() can build
    stat_timeout = 0.0          # seconds after which a stalled stat (size/exists) gives up; 0: untested

    store: Backend
    proxy = None                # tests/fault_proxy.py's API (FaultProxy or ProxyProcess): inject, set,
                                # clear, reset_stats, stats().log; its faults are HTTP statuses and resets

    def __init__(self, request, tmp_path):
        self.request, self.tmp_path = request, tmp_path

    def open(self) -> Backend:
        """Another client on the namespace of `store`."""
        raise NotImplementedError

    def broken(self, case: str) -> Backend:
        """A client that meets `case` (one of error_cases)."""
        raise NotImplementedError


class LocalHarness(Harness):
    name = "local"

    def __init__(self, request, tmp_path):
        super().__init__(request, tmp_path)
        self.store = self.open()

    def open(self) -> Backend:
        from rsnap.store.local import LocalStore
        return LocalStore(self.tmp_path / "store")


class S3Harness(Harness):
    """S3Store against moto's server, through a fault proxy; one bucket per test, quick retries."""
    name = "s3"
    proxied = True
    error_cases = ("no_container", "unreachable")
    stat_timeout = 0.5

    def __init__(self, request, tmp_path):
        super().__init__(request, tmp_path)
        import pytest
        pytest.importorskip("opendal", reason="the opendal wheel is not installed: pip install opendal")
        moto = request.getfixturevalue("moto_server")
        self.proxy = request.getfixturevalue("conformance_proxy")
        request.addfinalizer(self.proxy.clear)
        self.bucket = f"rsnap-conformance-{time.monotonic_ns()}"
        moto.create_bucket(self.bucket)
        mp = request.getfixturevalue("monkeypatch")
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(k)
        env = moto.env(self.proxy.endpoint)
        env.update(RSNAP_S3_RETRIES="2", RSNAP_S3_RETRY_MIN_DELAY="0.01", RSNAP_S3_TIMEOUT=str(self.stat_timeout),
                   RSNAP_S3_LOCK_STALE="3", RSNAP_LOCK_WAIT="20")
        for k, v in env.items():
            mp.setenv(k, v)
        self.mp = mp
        self.store = self.open()

    def open(self, bucket: str | None = None) -> Backend:
        from rsnap.store.s3 import S3Store
        return S3Store(f"s3://{bucket or self.bucket}/conformance")

    def broken(self, case: str) -> Backend:
        if case == "no_container":
            return self.open(bucket=f"rsnap-no-such-bucket-{time.monotonic_ns()}")
        from s3_util import free_port
        self.mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        return self.open()


class TieredHarness(S3Harness):
    """A local directory in front of S3 (RSNAP_LOCAL_STORE): each client has its own local tier."""
    name = "tiered"

    def open(self, bucket: str | None = None) -> Backend:
        import tempfile
        from rsnap.store.local import LocalStore
        from rsnap.store.tiered import TieredStore
        local = LocalStore(tempfile.mkdtemp(prefix="tier-", dir=self.tmp_path))
        return TieredStore(local, super().open(bucket))


class GhaHarness(Harness):
    """GhaStore against the stand-in GitHub Actions cache service in front of Azurite
    (tests/gha_server.py), a fresh service per test: immutable entries (no delete, no
    overwrite) and no LIST, `newest` through the service's prefix lookup instead."""
    name = "gha"
    proxied = True
    error_cases = ("unreachable",)
    stat_timeout = 0.5

    def __init__(self, request, tmp_path):
        super().__init__(request, tmp_path)
        import pytest
        pytest.importorskip("opendal", reason="the opendal wheel is not installed: pip install opendal")
        from fault_proxy import ProxyProcess
        server = request.getfixturevalue("gha_server")
        self.proxy = ProxyProcess(server.port)
        request.addfinalizer(self.proxy.stop)
        server.behind(self.proxy.endpoint)      # twirp calls and blob traffic both cross the proxy
        self.mp = request.getfixturevalue("monkeypatch")
        for k, v in {**server.env(), "RSNAP_GHA_RETRY_MIN_DELAY": "0.01",
                     "RSNAP_GHA_TIMEOUT": str(self.stat_timeout)}.items():
            self.mp.setenv(k, v)
        self.store = self.open()

    def open(self) -> Backend:
        from rsnap.store.gha import GhaStore
        return GhaStore("gha://conformance")

    def broken(self, case: str) -> Backend:
        from gha_server import free_port
        self.mp.setenv("ACTIONS_RESULTS_URL", f"http://127.0.0.1:{free_port()}/")
        return self.open()


BACKENDS: list[type[Harness]] = [LocalHarness, S3Harness, TieredHarness, GhaHarness]
