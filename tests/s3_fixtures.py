"""pytest fixtures of the S3 tests (a plugin: conftest.py lists it in `pytest_plugins`).

moto_server (session)  a moto standalone server on loopback (tests/s3_util.py), skipped without moto;
                       one per session: every test and module uses buckets of its own
fault_proxy            a fault-injecting, counting proxy in front of it (tests/fault_proxy.py)
"""
from __future__ import annotations

import pytest

from s3_util import MotoServer, moto_missing


@pytest.fixture(scope="session")
def moto_server():
    reason = moto_missing()
    if reason:
        pytest.skip(reason)
    server = MotoServer.start()
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(moto_server):
    from fault_proxy import ProxyProcess
    proxy = ProxyProcess(moto_server.port)
    yield proxy
    proxy.stop()
