"""The S3 test harness itself: moto answers, the fault proxy forwards, counts and breaks."""
from __future__ import annotations

import http.client
import time

import pytest

from s3_util import signed_request


def req(proxy, method, path, body=None, timeout=10):
    return signed_request(proxy.port, method, path, body, timeout)


@pytest.fixture
def bucket(moto_server):
    name = f"harness-{time.monotonic_ns()}"
    moto_server.create_bucket(name)
    return name


def test_forwards_and_counts(fault_proxy, bucket):
    assert req(fault_proxy, "PUT", f"/{bucket}/a", b"x" * 1000)[0] == 200
    assert req(fault_proxy, "GET", f"/{bucket}/a") == (200, b"x" * 1000)
    assert req(fault_proxy, "HEAD", f"/{bucket}/a")[0] == 200
    st = fault_proxy.stats()
    assert (st.requests["PUT"], st.requests["GET"], st.requests["HEAD"]) == (1, 1, 1)
    assert st.bytes_in == 1000 and st.bytes_out == 1000
    assert st.puts(f"/{bucket}/") == [f"/{bucket}/a"]
    assert fault_proxy.reset_stats().requests["PUT"] == 1 and not fault_proxy.stats().requests


@pytest.mark.parametrize("fault,status,code", [("503", 503, b"SlowDown"), ("500", 500, b"InternalError"),
                                                ("403", 403, b"AccessDenied"), ("404", 404, b"NoSuchBucket")])
def test_error_faults(fault_proxy, bucket, fault, status, code):
    req(fault_proxy, "PUT", f"/{bucket}/a", b"data")
    fault_proxy.inject(fault, times=2, method="GET")
    for _ in range(2):
        got, body = req(fault_proxy, "GET", f"/{bucket}/a")
        assert got == status and b"<Code>" + code + b"</Code>" in body
    assert req(fault_proxy, "GET", f"/{bucket}/a") == (200, b"data")   # consumed


def test_drop_and_truncate(fault_proxy, bucket):
    req(fault_proxy, "PUT", f"/{bucket}/a", b"y" * 10000)
    fault_proxy.inject("drop", path="/a")
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        req(fault_proxy, "GET", f"/{bucket}/a")
    fault_proxy.inject("truncate")
    with pytest.raises(http.client.IncompleteRead):
        req(fault_proxy, "GET", f"/{bucket}/a")
    assert req(fault_proxy, "GET", f"/{bucket}/a") == (200, b"y" * 10000)
    assert fault_proxy.stats().requests["GET"] == 3


def test_latency_and_bandwidth(fault_proxy, bucket):
    req(fault_proxy, "PUT", f"/{bucket}/a", b"z" * 200_000)
    fault_proxy.set(latency=0.2)
    t = time.monotonic()
    req(fault_proxy, "GET", f"/{bucket}/a")
    assert time.monotonic() - t >= 0.2
    fault_proxy.clear()
    fault_proxy.set(bandwidth=1_000_000)   # 200 kB at 1 MB/s: >= 0.2 s
    t = time.monotonic()
    assert req(fault_proxy, "GET", f"/{bucket}/a")[1] == b"z" * 200_000
    assert time.monotonic() - t >= 0.19
