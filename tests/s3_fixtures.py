"""pytest fixtures of the S3 tests (a plugin: conftest.py lists it in `pytest_plugins`).

moto_server (session)  a moto standalone server on loopback (tests/s3_util.py), skipped without moto;
                       one per session: every test and module uses buckets of its own
fault_proxy            a fault-injecting, counting proxy in front of it (tests/fault_proxy.py)
proxied_bucket(...)    a fresh bucket behind the proxy, this process's environment pointed at it
"""
from __future__ import annotations

import os
import time

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


def proxied_bucket(moto_server, fault_proxy, monkeypatch, prefix: str, **settings: str) -> tuple[str, dict]:
    """(name, env) of a fresh bucket behind `fault_proxy`: the AWS variables (no others of this
    process's) plus `settings`, also set in this process through `monkeypatch`."""
    name = f"{prefix}-{time.monotonic_ns()}"
    moto_server.create_bucket(name)
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    env = {k: v for k, v in moto_server.env(fault_proxy.endpoint).items() if k.startswith("AWS_")}
    env.update(settings)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return name, env
