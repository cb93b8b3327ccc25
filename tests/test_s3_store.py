"""S3Store against moto's real S3-protocol server, faults injected by the loopback proxy."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rsnap.errors import EXIT_LOCKED, RsnapError, StoreError
from rsnap.store import s3
from s3_fixtures import proxied_bucket

pytest.importorskip("opendal", reason="the opendal wheel is not installed: pip install opendal")
SECRET = "wJalrXUtnFEMI-K7MDENG-sekrit-must-not-leak"


@pytest.fixture
def env(moto_server, fault_proxy, monkeypatch):
    """A fresh bucket; the AWS environment points at the proxy; retries quick."""
    bucket, _env = proxied_bucket(moto_server, fault_proxy, monkeypatch, "rsnap", AWS_SECRET_ACCESS_KEY=SECRET,
                                  RSNAP_S3_RETRIES="3", RSNAP_S3_RETRY_MIN_DELAY="0.02",
                                  RSNAP_S3_LOCK_STALE="3", RSNAP_LOCK_WAIT="1")
    return {"bucket": bucket, "url": f"s3://{bucket}/ci/base", "proxy": fault_proxy, "env": dict(os.environ)}


@pytest.fixture
def store(env):
    return s3.S3Store(env["url"])


def test_import_is_cheap():
    """`import rsnap.store.s3` does not import the client library: opening a store does."""
    out = subprocess.run([sys.executable, "-c", "import sys, rsnap.store.s3; print('opendal' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_round_trip_list_stat(store, env):
    store.put("packs/ab/1", b"one")
    store.put_many([(f"packs/cd/{i}", bytes([i]) * i) for i in range(1, 6)])
    store.put("snapshots/key1/100-aaaa", b"m1")
    store.put("snapshots/key12/200-bbbb", b"m2")
    assert store.get("packs/ab/1") == b"one"
    assert store.exists("packs/cd/3") and not store.exists("packs/cd/9")
    assert store.size("packs/cd/4") == 4 and store.size("nope/x") is None
    assert store.list("packs/cd/") == [f"packs/cd/{i}" for i in range(1, 6)]
    assert store.list("snapshots/key1") == ["snapshots/key1/100-aaaa", "snapshots/key12/200-bbbb"]
    assert store.list("snapshots/key1/") == ["snapshots/key1/100-aaaa"]
    stats = store.stat_all("packs/")
    assert [(n, s) for n, s, _ in stats][:2] == [("packs/ab/1", 3), ("packs/cd/1", 1)]
    assert all(abs(m - time.time()) < 120 for _n, _s, m in stats)
    assert store.get_many(["packs/cd/2", "packs/ab/1"]) == {"packs/cd/2": b"\2\2", "packs/ab/1": b"one"}
    assert store.missing(["packs/ab/1", "packs/zz/9"]) == ["packs/zz/9"]
    store.touch("packs/ab/1")        # documented no-op
    store.delete("packs/ab/1")
    store.delete("packs/ab/1")       # deleting a missing object is fine
    assert not store.exists("packs/ab/1")
    # the objects live under the prefix, path-style on the endpoint
    assert any(p.startswith(f"/{env['bucket']}/ci/base/packs/cd/") for p in env["proxy"].stats().puts())


def test_ranges_and_multipart(store, env):
    data = os.urandom(17 << 20)       # over MULTIPART_FROM: two parts
    env["proxy"].reset_stats()
    store.put("packs/big/1", data)
    st = env["proxy"].stats()
    assert st.requests["POST"] == 2 and st.requests["PUT"] == 2   # create + complete, 2 parts
    for off, n in [(0, 1), (12345, 4096), ((17 << 20) - 10, 10), (5 << 20, 3 << 20)]:
        assert store.get_range("packs/big/1", off, n) == data[off:off + n]
    with pytest.raises(StoreError, match="truncated"):
        store.get_range("packs/big/1", (17 << 20) - 5, 10)
    assert store.get("packs/big/1") == data


def test_missing_object_and_bad_name(store):
    with pytest.raises(StoreError, match=r"^store object packs/no/pe is missing from s3://"):
        store.get("packs/no/pe")
    with pytest.raises(StoreError, match="missing"):
        store.get_range("packs/no/pe", 0, 10)
    with pytest.raises(StoreError, match="invalid object name"):
        store.get("../etc/passwd")


@pytest.mark.parametrize("fault", ["503", "500", "drop", "truncate"])
def test_transient_faults_end_in_success(store, env, fault):
    payload = os.urandom(300_000)
    proxy = env["proxy"]
    proxy.inject(fault, times=2, method="PUT") if fault != "truncate" else None
    store.put("packs/ff/1", payload)
    proxy.inject(fault, times=2, method="GET")
    assert store.get("packs/ff/1") == payload
    proxy.inject(fault, times=2, method="GET")
    assert store.get_range("packs/ff/1", 1000, 50_000) == payload[1000:51_000]
    proxy.inject(fault, times=2, method="GET")
    assert store.list("packs/") == ["packs/ff/1"]
    assert proxy.stats().requests["GET"] >= 6    # the faults were met and retried


def test_latency_and_bandwidth_cap(store, env):
    store.put("packs/aa/1", b"q" * 500_000)
    env["proxy"].set(latency=0.1, bandwidth=2_000_000)
    t = time.monotonic()
    assert store.get("packs/aa/1") == b"q" * 500_000
    assert time.monotonic() - t >= 0.3


def one_line_error(fn) -> str:
    with pytest.raises(StoreError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and SECRET not in msg and "Authorization" not in msg
    assert ei.value.code == 3
    return msg


def test_throttling_outlasting_retries(store, env):
    store.put("packs/aa/1", b"x")
    env["proxy"].inject("503", times=None)
    msg = one_line_error(lambda: store.get("packs/aa/1"))
    assert "kept throttling (SlowDown) through 3 retries" in msg
    assert env["proxy"].stats().requests["GET"] == 4


def test_server_errors_outlasting_retries(store, env):
    env["proxy"].inject("500", times=None)
    assert "HTTP 500 InternalError" in one_line_error(lambda: store.put("packs/aa/1", b"x"))


def test_wrong_credentials(store, env):
    env["proxy"].inject("403", times=None)
    msg = one_line_error(lambda: store.list("snapshots/"))
    assert msg.startswith("S3 access denied (AccessDenied) to s3://")


def test_unknown_bucket(env):
    st = s3.S3Store("s3://no-such-bucket-here/p")
    for fn in (lambda: st.list("snapshots/"), lambda: st.get("x"), lambda: st.put("x", b"1")):
        assert one_line_error(fn) == f"S3 bucket 'no-such-bucket-here' does not exist at {env['proxy'].endpoint}"


def test_unreachable_endpoint(env, monkeypatch):
    from s3_util import free_port
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:{SECRET}@127.0.0.1:{free_port()}")
    msg = one_line_error(lambda: s3.S3Store(env["url"]).list("snapshots/"))
    assert msg.startswith("cannot reach S3 endpoint http://127.0.0.1:") and "Connection refused" in msg


def test_dropped_connections_outlasting_retries(store, env):
    env["proxy"].inject("drop", times=None)
    assert one_line_error(lambda: store.get("packs/aa/1")).startswith("cannot reach S3 endpoint")


def test_profile_credentials_and_endpoint(env, monkeypatch, tmp_path):
    """No AWS_* credentials in the environment: key, region and endpoint come from a profile."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "config").write_text(f"[profile ci]\nregion = us-east-1\nendpoint_url = {env['proxy'].endpoint}\n")
    (tmp_path / "credentials").write_text("[ci]\naws_access_key_id = PROFILEKEY\naws_secret_access_key = x\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "ci")
    env["proxy"].reset_stats()
    st = s3.S3Store(env["url"])
    st.put("packs/aa/1", b"p")
    assert st.get("packs/aa/1") == b"p"
    assert env["proxy"].stats().seen_keys == {"PROFILEKEY"}


HOLDER = textwrap.dedent("""
    import sys
    from rsnap.store.s3 import S3Store
    with S3Store(sys.argv[1]).lock(exclusive=sys.argv[2] == "x") as lk:
        print("locked", flush=True)
        sys.stdin.readline()
        lk.check()
    print("released", flush=True)
""")


def holder(env, exclusive: bool) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, env["url"], "x" if exclusive else "s"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env["env"])
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_conflicts_between_processes(store, env):
    p = holder(env, exclusive=False)              # a save in progress elsewhere
    try:
        with store.lock(exclusive=False):          # saves share
            pass
        with pytest.raises(RsnapError) as ei:      # prune waits RSNAP_LOCK_WAIT=1 s, then gives up
            with store.lock(exclusive=True):
                pass
        assert ei.value.code == EXIT_LOCKED and "locked by shared-" in str(ei.value)
        time.sleep(4)                              # > stale (3 s): the holder's refreshes keep it fresh
        with pytest.raises(RsnapError):
            with store.lock(exclusive=True):
                pass
        p.stdin.write("\n"); p.stdin.flush()
        assert p.stdout.readline().strip() == "released" and p.wait(10) == 0
    finally:
        p.kill()
    with store.lock(exclusive=True) as lk:        # free now
        lk.check()
        assert [n.startswith("locks/exclusive-") for n in store.list("locks/")] == [True]
        with pytest.raises(RsnapError, match="locked by exclusive-"):
            with s3.S3Store(env["url"]).lock(exclusive=False):
                pass
    assert store.list("locks/") == []


def test_lock_of_a_killed_process_goes_stale(store, env):
    p = holder(env, exclusive=True)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(store.list("locks/")) == 1        # left behind
    with pytest.raises(RsnapError):
        with store.lock(exclusive=False):
            pass
    time.sleep(3.5)                               # stale after RSNAP_S3_LOCK_STALE=3 s (server clock)
    with store.lock(exclusive=False):
        pass
