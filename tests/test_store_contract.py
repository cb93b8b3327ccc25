"""The backend contract's layers on the local backend (no cargo): typed errors, conditional
create, the registry, the lock layer's answer for a backend that cannot lock itself, and the
tiered store's parallel get_many. The conformance suite runs every backend unchanged."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rsnap.errors import NotFoundError, PermanentStoreError, RsnapError, StoreError
from rsnap.store import LocalStore, open_store
from rsnap.store.base import Backend, Capabilities
from rsnap.store.registry import SCHEMES, is_remote
from rsnap.store.tiered import TieredStore


def test_every_backend_inherits_the_interface():
    from rsnap.store.s3 import S3Store
    assert all(issubclass(c, Backend) for c in (LocalStore, TieredStore, S3Store))
    assert set(SCHEMES) >= {"", "file", "s3"}
    assert LocalStore.capabilities.lock and not LocalStore.remote_store


def test_local_errors_are_typed(tmp_path):
    st = LocalStore(tmp_path / "s")
    with pytest.raises(NotFoundError, match="is missing"):
        st.get("packs/aa/1")
    with pytest.raises(NotFoundError):
        st.get_range("packs/aa/1", 0, 1)
    with pytest.raises(NotFoundError):
        LocalStore(tmp_path / "nope", create=False)
    assert issubclass(NotFoundError, StoreError) and issubclass(PermanentStoreError, StoreError)


def test_put_if_absent_creates_once(tmp_path):
    st = LocalStore(tmp_path / "s")
    assert st.put_if_absent("locks/a", b"1") is True
    assert st.put_if_absent("locks/a", b"2") is False
    assert st.get("locks/a") == b"1"
    assert st.list("locks/") == ["locks/a"]     # no temp file left behind


def test_registry_and_remote_schemes(tmp_path):
    assert is_remote("s3://b/p") and not is_remote(str(tmp_path)) and not is_remote("file:///x")
    assert not is_remote("nope://x")
    with pytest.raises(StoreError, match="unsupported store URL scheme 'nope'"):
        open_store("nope://x")
    assert isinstance(open_store(f"file://{tmp_path}/f"), LocalStore)


class _NoList(LocalStore):
    """A local directory that says it cannot list and has no lock of its own (like a cache
    service): the lock layer must answer for it."""
    capabilities = Capabilities(list=False, delete=True, lock=False)
    lock = Backend.lock


class _NoDelete(_NoList):
    capabilities = Capabilities(list=False, delete=False, lock=False)


def test_lock_layer_refuses_what_it_cannot_guard(tmp_path):
    with pytest.raises(RsnapError, match=r"cannot be locked \(it cannot list objects\); save refused"):
        with _NoList(tmp_path / "a").lock(exclusive=False):
            pass
    with pytest.raises(RsnapError, match="prune refused"):
        with _NoDelete(tmp_path / "b").lock(exclusive=True):
            pass
    with _NoDelete(tmp_path / "b").lock(exclusive=False) as held:   # nothing can delete under a save
        held.check()


def test_lock_objects_on_a_listing_backend(tmp_path):
    class Objects(LocalStore):
        lock = Backend.lock
    st = Objects(tmp_path / "o")
    with st.lock(exclusive=True) as held:
        held.check()
        assert [n.startswith("locks/exclusive-") for n in st.list("locks/")] == [True]
    assert st.list("locks/") == []


def test_tiered_get_many_reads_local_first_and_fills(tmp_path):
    remote, local = LocalStore(tmp_path / "r"), LocalStore(tmp_path / "l")
    for i in range(5):
        remote.put(f"packs/aa/{i}", bytes([i]) * 10)
    local.put("packs/aa/0", b"local copy")
    tiered = TieredStore(local, remote)
    got = tiered.get_many([f"packs/aa/{i}" for i in range(5)])
    assert got["packs/aa/0"] == b"local copy" and got["packs/aa/3"] == b"\x03" * 10
    assert local.list("packs/") == [f"packs/aa/{i}" for i in range(5)]


def test_no_cycles_and_a_light_registry():
    """Importing the registry (the compile-cache wrapper does) loads no backend module."""
    probe = ("import sys, rsnap.store.registry as r; r.is_remote('s3://b/p'); "
             "print(sorted(m for m in sys.modules if m.startswith('rsnap.store.')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['rsnap.store.registry']"


def test_s3_errors_are_typed_by_opendal_class(moto_server, fault_proxy, monkeypatch):
    """OpenDAL's NotFound / PermissionDenied / RateLimited and a refused connection map onto
    NotFoundError / PermanentStoreError / TransientStoreError."""
    pytest.importorskip("opendal")
    from rsnap.errors import TransientStoreError
    from rsnap.store.s3 import S3Store
    from s3_util import free_port
    bucket = f"rsnap-contract-{free_port()}"
    moto_server.create_bucket(bucket)
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in {**moto_server.env(fault_proxy.endpoint), "RSNAP_S3_RETRIES": "1",
                 "RSNAP_S3_RETRY_MIN_DELAY": "0.01"}.items():
        monkeypatch.setenv(k, v)
    st = S3Store(f"s3://{bucket}/p")
    with pytest.raises(NotFoundError):
        st.get("packs/aa/1")
    assert st.capabilities.conditional_create
    assert st.put_if_absent("locks/x", b"1") is True and st.put_if_absent("locks/x", b"2") is False
    assert st.get("locks/x") == b"1"
    fault_proxy.inject("403", times=None)
    with pytest.raises(PermanentStoreError, match="access denied"):
        st.list("snapshots/")
    fault_proxy.clear()
    fault_proxy.inject("503", times=None)
    with pytest.raises(TransientStoreError, match="kept throttling"):
        st.get("packs/aa/1")
    fault_proxy.clear()
    with pytest.raises(PermanentStoreError, match="does not exist"):
        S3Store("s3://no-such-bucket-contract/p").list("snapshots/")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientStoreError, match="cannot reach S3 endpoint"):
        S3Store(f"s3://{bucket}/p").list("snapshots/")
