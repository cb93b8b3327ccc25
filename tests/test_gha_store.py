"""The gha:// store (rsnap.store.gha) against the stand-in cache service: the backend interface
without LIST or delete, `newest` through the service's prefix lookup, 429s waited out, and a
service that cannot be reached or hangs costing seconds (tests/gha_server.py, Azurite)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsnap.errors import NotFoundError, PermanentStoreError, StoreError, TransientStoreError
from rsnap.store import open_store
from rsnap.store.gha import GhaStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(gha_store):
    url, _env = gha_store
    return open_store(url, scope="")


def test_round_trip_ranges_and_not_found(store, gha_server):
    assert isinstance(store, GhaStore) and store.url == "gha://rsnap-test"
    assert not store.capabilities.list and not store.capabilities.delete
    data = bytes(range(256)) * 64
    store.put("packs/ab/abcd", data)
    assert store.get("packs/ab/abcd") == data
    assert store.get_range("packs/ab/abcd", 100, 1000) == data[100:1100]
    assert store.size("packs/ab/abcd") == len(data) and store.exists("packs/ab/abcd")
    assert store.size("packs/ab/none") is None and store.missing(["packs/ab/abcd", "packs/x/y"]) == ["packs/x/y"]
    with pytest.raises(NotFoundError):
        store.get("packs/ab/none")
    with pytest.raises(StoreError, match="truncated"):
        store.get_range("packs/ab/abcd", len(data) - 10, 100)
    assert gha_server.keys() == ["rsnap-test/packs/ab/abcd"]


def test_entries_are_immutable_first_writer_wins_for_packs(store, gha_server):
    store.put("packs/ab/p", b"first")
    store.put("packs/ab/p", b"first")          # a pack someone wrote first is the same pack
    assert store.put_if_absent("snapshots/k/1-a", b"m1") is True
    assert store.put_if_absent("snapshots/k/1-a", b"m2") is False
    with pytest.raises(PermanentStoreError, match="immutable"):
        store.put("snapshots/k/1-a", b"m3")
    assert store.get("snapshots/k/1-a") == b"m1"
    assert gha_server.counts["CreateCacheEntry"] == 5 and len(gha_server.entries()) == 2
    with pytest.raises(PermanentStoreError, match="cannot list"):
        store.list("snapshots/")
    with pytest.raises(PermanentStoreError, match="cannot delete"):
        store.delete("packs/ab/p")


def test_newest_is_the_latest_written_under_a_prefix(store, gha_server):
    assert store.newest("snapshots/main/") is None
    for name in ("snapshots/main/2-b", "snapshots/main/1-a", "snapshots/main-old/3-c", "packs/aa/x"):
        store.put(name, name.encode())
    assert store.newest("snapshots/main/") == "snapshots/main/1-a"      # written last, not sorted last
    assert store.newest("snapshots/main") == "snapshots/main-old/3-c"
    assert store.newest("snapshots/dev") is None
    gha_server.delete(lambda k: k.endswith("/main-old/3-c"))              # evicted: the next newest
    assert store.newest("snapshots/main") == "snapshots/main/1-a"
    # another prefix (or another tool's entries under the same keys) never matches
    other = GhaStore("gha://rsnap-other")
    assert other.newest("snapshots/") is None


def test_429_is_waited_out_for_its_retry_after(store, gha_server, monkeypatch):
    monkeypatch.setattr("rsnap.store.gha_service._budget_left", [])
    gha_server.throttle(3, retry_after=1, methods={"CreateCacheEntry"})
    started = time.monotonic()
    store.put("packs/aa/t", b"x")
    assert time.monotonic() - started >= 1       # waited (OpenDAL's own 2 quick retries, then Retry-After)
    assert gha_server.counts["throttled"] == 3 and store.get("packs/aa/t") == b"x"
    gha_server.throttle(1, retry_after=1, methods={"GetCacheEntryDownloadURL"})   # within the lookup's 2 s
    assert store.newest("packs/aa/") == "packs/aa/t"
    # a budget spent: the 429 is an error, not a stall
    monkeypatch.setenv("RSNAP_GHA_THROTTLE_BUDGET", "1")
    monkeypatch.setattr("rsnap.store.gha_service._budget_left", [])
    gha_server.throttle(100, retry_after=30)
    started = time.monotonic()
    with pytest.raises(TransientStoreError, match="throttling"):
        store.put("packs/aa/u", b"y")
    with pytest.raises(TransientStoreError, match="HTTP 429"):
        store.newest("snapshots/")
    assert time.monotonic() - started < 10


def test_missing_environment_is_one_clear_line(monkeypatch):
    monkeypatch.delenv("ACTIONS_RUNTIME_TOKEN", raising=False)
    with pytest.raises(PermanentStoreError, match="ACTIONS_RUNTIME_TOKEN"):
        open_store("gha://x", scope="")
    with pytest.raises(PermanentStoreError, match="use gha://<prefix>"):
        GhaStore("gha://")


@pytest.mark.parametrize("how", ["unreachable", "hung"])
def test_a_dead_service_is_a_restore_miss_within_3s(gha_server, tmp_path, how, monkeypatch):
    env = gha_server.env()
    if how == "unreachable":
        from gha_server import free_port
        env["ACTIONS_RESULTS_URL"] = f"http://127.0.0.1:{free_port()}/"
    else:
        gha_server.hang = True
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "Cargo.toml").write_text('[package]\nname = "x"\nversion = "0.1.0"\nedition = "2021"\n')
    (ws / "src").mkdir()
    (ws / "src" / "main.rs").write_text("fn main() {}\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rsnap", "restore", "--store", "gha://ci", "--key", "k"],
                          cwd=ws, env={**os.environ, **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert took <= 3.0 and len(lines) == 1, (took, proc.stderr)
    assert "GitHub Actions cache service" in lines[0] and ("cannot reach" in lines[0] or "no answer" in lines[0])


def test_compile_cache_entries_go_up_bundled(store, gha_server, tmp_path):
    """Hundreds of compile-cache entries cost one cache entry per save, and only new bytes."""
    from rsnap.store import LocalStore
    from rsnap.store.cache_bundle import sync_down, sync_up
    tier = LocalStore(tmp_path / "tier")
    entries = {f"cache/{i:02x}/{i:040x}": os.urandom(300 + i) for i in range(120)}
    for n, b in entries.items():
        tier.put(n, b)
    up = sync_up(store, tier)
    assert up["cache_entries_uploaded"] == 120 and len(gha_server.keys()) == 1
    assert sync_up(store, tier)["cache_entries_uploaded"] == 0            # nothing new: no entry
    fresh = LocalStore(tmp_path / "fresh")
    assert sync_down(store, fresh)["cache_entries_downloaded"] == 120
    assert all(fresh.get(n) == b for n, b in entries.items())
    for i in range(120, 123):
        fresh.put(f"cache/{i:02x}/{i:040x}", b"new %d" % i)
    up = sync_up(store, fresh)
    assert up["cache_entries_uploaded"] == 3 and up["cache_bytes_uploaded"] < 2000
    assert len(gha_server.keys()) == 2
    # the first bundle evicted: a new runner still gets what the newest bundle carries
    first = gha_server.keys()[0]
    gha_server.delete(lambda k: k == first)
    third = LocalStore(tmp_path / "third")
    sync_down(store, third)
    assert sorted(third.list("cache/")) == [f"cache/{i:02x}/{i:040x}" for i in range(120, 123)]
