"""Issue 22: the lease on the server's clock, snapshot order from the store, stores that fail
fast, and a local tier that verifies (moto on loopback, the fault proxy, real cargo builds).

Each interleaving of the issue's "Found" list has a test here:
  (a) test_save_stopped_before_its_manifest_while_a_prune_runs (SIGSTOP at save.manifest and
      at save.commit: no manifest is left naming a deleted pack)
  (b) test_a_late_refresh_does_not_revive_a_stale_lock
  (c) test_suspend_loses_the_lease (time.monotonic() frozen, as in a system suspend)
  (d) test_prune_with_a_small_stale_honours_the_holders
  (e) test_newest_is_by_the_stores_clock
and the rest of the protocol: prune keeps the packs of manifests it had not seen; the store
fails fast (a silent port, a refused one, bodies that stall); the local tier verifies packs.
Short STALE values (RSNAP_S3_LOCK_STALE) keep them fast; moto's LastModified has ms resolution.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

from cargo_util import Workspace, normalize_output
from rsnap_util import RsnapResult, one_line_error
from s3_fixtures import proxied_bucket

pytest.importorskip("opendal", reason="the opendal wheel is not installed")
STALE = "4"


@pytest.fixture
def bucket(moto_server, fault_proxy, monkeypatch):
    """A fresh bucket behind the fault proxy; this process's AWS environment points at it."""
    name, env = proxied_bucket(moto_server, fault_proxy, monkeypatch, "lease", RSNAP_S3_RETRIES="3",
                               RSNAP_S3_RETRY_MIN_DELAY="0.02", RSNAP_S3_LOCK_STALE=STALE,
                               RSNAP_LOCK_WAIT="60", RSNAP_CACHE_SYNC="0")
    return types.SimpleNamespace(url=f"s3://{name}/ci", env=env, proxy=fault_proxy, name=name)


def s3_store(url):
    from rsnap.store.s3 import S3Store
    return S3Store(url)


# -- the lock layer, in this process -----------------------------------------------------

class GatedLocks:
    """A store whose lock-object PUTs wait at a gate before they reach the server: a refresh
    delayed by retries (b), or a whole process suspended (c)."""

    def __init__(self, store):
        self._store = store
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put(self, name, data):
        self._wait(name)
        self._store.put(name, data)

    def put_within(self, name, data, seconds):
        self._wait(name)
        self._store.put_within(name, data, seconds)

    def _wait(self, name):
        if name.startswith("locks/"):
            self.gate.wait()


def _holder(store, exclusive=False):
    from rsnap.store.lock import ObjectLock
    lk = ObjectLock(store, exclusive)
    lk.acquire()
    return lk


def _wait_for(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_late_refresh_does_not_revive_a_stale_lock(bucket):
    from rsnap.errors import StoreError
    gated = GatedLocks(s3_store(bucket.url))
    holder = _holder(gated)
    try:
        gated.gate.clear()          # the next refresh PUT is held up (retries, a slow network)
        judge = _holder(s3_store(bucket.url), exclusive=True)   # waits until the holder is stale
        try:
            before = {n: m for n, _s, m in s3_store(bucket.url).stat_all("locks/")}[holder.name]
            gated.gate.set()        # the late refresh lands, after another machine went ahead
            _wait_for(lambda: {n: m for n, _s, m in s3_store(bucket.url).stat_all("locks/")}.get(holder.name, 0) > before,
                      what="the late refresh")
            with pytest.raises(StoreError, match="lost the lock"):
                holder.check()
        finally:
            judge.release()
    finally:
        gated.gate.set()
        holder.release()


def test_suspend_loses_the_lease(bucket, monkeypatch):
    """A system suspend: every thread stops and time.monotonic() does not advance; the server's
    clock goes on. Simulated with a frozen monotonic clock and lock PUTs held at a gate."""
    from rsnap.errors import StoreError
    from rsnap.store import lock as lock_mod
    real = time.monotonic
    clock = {"offset": 0.0, "frozen": None}

    def monotonic():
        return clock["frozen"] if clock["frozen"] is not None else real() - clock["offset"]
    monkeypatch.setattr(lock_mod, "time", types.SimpleNamespace(time=time.time, sleep=time.sleep, monotonic=monotonic))
    gated = GatedLocks(s3_store(bucket.url))
    holder = _holder(gated)
    try:
        clock["frozen"], suspended = monotonic(), real()     # suspend
        gated.gate.clear()
        judge = _holder(s3_store(bucket.url), exclusive=True)   # the others call it stale
        judge.release()
        clock["offset"] += real() - suspended                 # resume: monotonic skipped the gap
        clock["frozen"] = None
        gated.gate.set()
        with pytest.raises(StoreError, match="lost the lock"):
            holder.check()
    finally:
        gated.gate.set()
        holder.release()


def test_prune_with_a_small_stale_honours_the_holders(bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("RSNAP_S3_LOCK_STALE", "30")         # a save's STALE: refreshes every 5 s
    holder = _holder(s3_store(bucket.url))
    try:
        time.sleep(1.5)          # its lock is older than the prune's STALE below
        env = {**os.environ, "RSNAP_S3_LOCK_STALE": "1", "RSNAP_LOCK_WAIT": "3", "XDG_CACHE_HOME": str(tmp_path)}
        env.pop("CI", None)
        prune = subprocess.run([sys.executable, "-m", "rsnap", "store", "prune", "--store", bucket.url, "--json"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert prune.returncode == 6, prune.stdout + prune.stderr          # EXIT_LOCKED
        assert "locked by shared-" in prune.stderr
        holder.check()                                                    # the save's lease held
    finally:
        holder.release()


# -- snapshot order ------------------------------------------------------------------------

def _manifest(store, key: str, created_ns: int, pack: bytes) -> str:
    from rsnap import __version__
    from rsnap.repository import manifest as mf, repo
    pid = repo.digest_bytes(pack)
    store.put(repo.pack_name(pid), pack)
    m = mf.Manifest(key=key, created_ns=created_ns, workspace_root="/ws", cargo_home="/ch", rsnap_version=__version__,
                    key_inputs={}, roots=[], sources=[], source_dirs=[], blobs={"0" * 32: [pid, 0, len(pack), len(pack)]},
                    chunks={})
    return repo.write_manifest(store, m)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_newest_is_by_the_stores_clock(kind, request, tmp_path):
    """A runner whose clock is 10 minutes ahead saved first; a runner with a right clock saved
    after it. Restore's newest and prune --keep 1 take the later write, not the later name."""
    from rsnap.repository import prune, repo
    if kind == "s3":
        store = s3_store(request.getfixturevalue("bucket").url)
    else:
        from rsnap.store import LocalStore
        store = LocalStore(tmp_path / "store")
    ahead = _manifest(store, "k", time.time_ns() + 600 * 10**9, b"written by a clock ahead")
    time.sleep(1.1)                                   # LastModified: 1 s resolution on S3
    later = _manifest(store, "k", time.time_ns(), b"written later")
    assert repo.find_snapshot(store, "k", [])[0] == later
    assert repo.find_snapshot(store, "other", ["k"])[0] == later
    out = prune.prune(store, keep=1, grace_seconds=0)
    assert [r["snapshot"] for r in out["removed"]] == [ahead]
    assert store.list("snapshots/") == [later]


# -- real saves and prunes --------------------------------------------------------------------

@pytest.fixture(scope="module")
def lease_ws(built_workspace, tmp_path_factory):
    """A copy of the session's built workspace (its own target/, the shared CARGO_HOME)."""
    root = tmp_path_factory.mktemp("lease") / "ws"
    shutil.copytree(built_workspace.root, root, symlinks=True)
    ws = Workspace(root, built_workspace.origin, built_workspace.cargo_home)
    ws.expected_output = normalize_output(built_workspace.run_app(), built_workspace.root)
    ws.copied_from = built_workspace.root
    return ws


def app_output(ws) -> str:
    """The app's output, either root as <ROOT>: the copied target's binaries name the original
    root until cargo rebuilds them in the copy."""
    return normalize_output(normalize_output(ws.run_app(), ws.copied_from), ws.root)


def run(ws, bucket, *args, env=None, timeout=300) -> RsnapResult:
    e = {**os.environ, **ws.env, **bucket.env, "RSNAP_STORE": bucket.url, **(env or {})}
    e.pop("CI", None)
    p = subprocess.run([sys.executable, "-m", "rsnap", *args], cwd=ws.root, env=e, capture_output=True, text=True,
                       timeout=timeout)
    return RsnapResult(p.returncode, p.stdout, p.stderr)


def start(ws, bucket, *args, env=None) -> subprocess.Popen:
    e = {**os.environ, **ws.env, **bucket.env, "RSNAP_STORE": bucket.url, **(env or {})}
    e.pop("CI", None)
    return subprocess.Popen([sys.executable, "-m", "rsnap", *args], cwd=ws.root, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_stopped(proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before its fault point: {proc.communicate()}")
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("never reached its fault point")


def dangling(store) -> list[str]:
    """Manifests naming a pack the store no longer has."""
    from rsnap.repository import manifest as mf, repo
    out = []
    for name in store.list("snapshots/"):
        tables = mf.loads_blob_tables(store.get(name))[0]
        if store.missing([repo.pack_name(p) for p in {loc[0] for loc in tables.values()}]):
            out.append(name)
    return out


@pytest.mark.parametrize("point", ["save.manifest", "save.commit"])
def test_save_stopped_before_its_manifest_while_a_prune_runs(lease_ws, bucket, point):
    """(a) The save passed its checks (lease, reused packs present) and stops before its
    manifest PUT (save.manifest) or between the lease refresh and the PUT (save.commit) for
    longer than STALE; a prune deletes the only manifest naming its packs, then the packs. The
    save resumes: it writes no manifest, or withdraws the one it wrote, and fails (exit 3)."""
    ws, st = lease_ws, s3_store(bucket.url)
    run(ws, bucket, "save", "--key", "lease-a", "--no-gc", "--json").check()
    packs = st.list("packs/")
    save = start(ws, bucket, "save", "--key", "lease-a", "--no-gc", "--json", env={"RSNAP_FAULT": f"{point}:1:stop"})
    try:
        wait_stopped(save)
        pruned = run(ws, bucket, "store", "prune", "--keep", "1", "--older-than", "0s", "--grace", "0", "--json").check()
        assert pruned.data["snapshots_deleted"] == 1 and not set(packs) & set(st.list("packs/"))
        save.send_signal(signal.SIGCONT)
        out, err = save.communicate(timeout=120)
    finally:
        if save.poll() is None:
            save.kill()
    assert dangling(st) == []
    assert save.returncode == 3, (out, err)
    line = one_line_error(RsnapResult(save.returncode, out, err))
    assert "lost the lock" in line, line
    assert st.list("snapshots/") == []


# -- stores that fail fast ---------------------------------------------------------------------

class Silent:
    """A loopback port that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def _timed(fn):
    t0 = time.monotonic()
    res = fn()
    return res, time.monotonic() - t0


@pytest.mark.parametrize("case", ["silent", "refused", "stalls-mid-body"])
def test_an_unusable_endpoint_fails_fast(lease_ws, bucket, case, record_property):
    """Restore is a miss within 5 s, save fails (exit 3, one line) within 15 s."""
    from s3_util import free_port
    ws, silent = lease_ws, None
    env = {"RSNAP_S3_RETRIES": "6", "RSNAP_S3_RETRY_MIN_DELAY": "0.2"}    # the defaults
    if case == "silent":
        silent = Silent()
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{silent.port}"
    elif case == "refused":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    else:
        run(ws, bucket, "save", "--key", "lease-stall", "--no-gc", "--json").check()
        bucket.proxy.inject("stall", times=None, method="GET")
    try:
        restore, t_restore = _timed(lambda: run(ws, bucket, "restore", "--key", "lease-stall", "--json", env=env))
        save, t_save = _timed(lambda: run(ws, bucket, "save", "--key", "lease-stall", "--no-gc", env=env))
    finally:
        bucket.proxy.clear()
        if silent:
            silent.close()
    record_property("restore_s", round(t_restore, 2))
    record_property("save_s", round(t_save, 2))
    print(f"{case}: restore miss in {t_restore:.2f} s, save failed in {t_save:.2f} s")
    assert restore.returncode == 0 and restore.data["result"] == "miss", restore.stderr
    assert t_restore <= 5.0
    assert save.returncode == 3, save.stderr
    line = one_line_error(save)
    assert ("cannot reach" if case != "stalls-mid-body" else "stopped answering") in line, line
    assert t_save <= 15.0
    if case == "stalls-mid-body":     # the restore was a miss: its target/ must build right
        assert ws.build("build", "--offline").success
        assert app_output(ws) == ws.expected_output


# -- the local tier verifies -------------------------------------------------------------------

def test_a_corrupt_local_copy_is_fetched_again(lease_ws, bucket, tmp_path):
    from rsnap.digest import hash_file
    ws, local = lease_ws, tmp_path / "local-tier"
    env = {"RSNAP_LOCAL_STORE": str(local)}
    run(ws, bucket, "save", "--key", "lease-tier", "--no-gc", "--json", env=env).check()
    saved_packs = sorted(p for p in local.rglob("packs/*/*"))
    assert saved_packs                                   # the save filled the local tier
    bad = max(saved_packs, key=lambda p: p.stat().st_size)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    target = ws.target
    shutil.rmtree(target)
    res = run(ws, bucket, "restore", "--key", "lease-tier", "--json", env=env).check()
    assert res.data["result"] == "exact", res.stdout
    assert hash_file(bad) == bad.name                    # the bad copy was replaced from the bucket
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert app_output(ws) == ws.expected_output


def test_pack_reads_that_stall_make_the_restore_a_miss_in_time(lease_ws, bucket):
    """The lookup answers, then every pack GET stalls mid-body: within 5 s the restore is done,
    the stalled packs counted as damage (their units left out, or a miss), and the target it
    leaves builds right."""
    ws = lease_ws
    run(ws, bucket, "save", "--key", "lease-packs", "--no-gc", "--json").check()
    shutil.rmtree(ws.target)
    bucket.proxy.inject("stall", times=None, method="GET", path="/packs/")
    try:
        restore, t_restore = _timed(lambda: run(ws, bucket, "restore", "--key", "lease-packs", "--json",
                                               env={"RSNAP_S3_RETRIES": "6", "RSNAP_S3_RETRY_MIN_DELAY": "0.2"}))
    finally:
        bucket.proxy.clear()
    print(f"packs stall: restore done in {t_restore:.2f} s")
    assert restore.returncode == 0, restore.stderr
    data = restore.data
    assert data["result"] == "miss" or data["damaged"]["unreadable"] >= 1, data
    assert "stopped answering" in restore.stdout + restore.stderr
    assert t_restore <= 5.0
    assert ws.build("build", "--offline").success
    assert app_output(ws) == ws.expected_output


def test_prune_keeps_the_packs_of_a_manifest_it_had_not_seen(tmp_path):
    """A manifest written while prune was between its listing and its pack deletes (by a writer
    that does not lock, or a save whose lock prune called stale) keeps its packs."""
    from rsnap.repository import repo
    from rsnap.store import LocalStore
    store = LocalStore(tmp_path / "store")
    old = _manifest(store, "k", time.time_ns(), b"pack of a snapshot prune drops")
    pack = repo.pack_name(repo.digest_bytes(b"pack of a snapshot prune drops"))
    env = {**os.environ, "RSNAP_FAULT": "prune.packs:1:stop", "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("CI", None)
    prune = subprocess.Popen([sys.executable, "-m", "rsnap", "store", "prune", "--store", str(store.root),
                              "--older-than", "0s", "--grace", "0", "--json"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(prune)
        assert store.list("snapshots/") == []          # it deleted the manifest, not yet the pack
        new = _manifest(store, "k2", time.time_ns(), b"pack of a snapshot prune drops")
        prune.send_signal(signal.SIGCONT)
        out, err = prune.communicate(timeout=60)
    finally:
        if prune.poll() is None:
            prune.kill()
    assert prune.returncode == 0, err
    assert store.exists(pack) and store.list("snapshots/") == [new] and old != new
