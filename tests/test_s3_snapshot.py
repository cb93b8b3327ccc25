"""Issue 12 acceptance: rsnap with an s3:// store (moto on loopback, behind the fault proxy).

One workspace is built and saved once per module; tests restore it on a cold runner (fresh
clone, no target/, CARGO_HOME caches wiped) and check cargo's own verdicts. Faults come from
the proxy (tests/fault_proxy.py), which also counts requests and bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cargo_util import create_workspace
from reliability_util import wait_for_stderr
from rsnap_util import rsnap, one_line_error, cold_runner

pytest.importorskip("opendal", reason="the opendal wheel is not installed")
KEY = "s3test-shared-key"
PRISTINE = "s3test-pristine"   # the module's unedited build: restores of it compile nothing



class S3:
    """The bucket, the proxy in front of moto, and the environment rsnap runs with."""

    def __init__(self, server, proxy, bucket, tmp):
        self.server, self.proxy, self.bucket = server, proxy, bucket
        self.url = f"s3://{bucket}/ci"
        self.env = {k: v for k, v in server.env(proxy.endpoint).items() if k.startswith("AWS_")}
        self.env.update(RSNAP_S3_RETRIES="3", RSNAP_S3_RETRY_MIN_DELAY="0.02", RSNAP_LOCAL_STORE=str(tmp / "local-tier"),
                        RSNAP_S3_LOCK_STALE="4", RSNAP_LOCK_WAIT="60")
        self.env_no_tier = {k: v for k, v in self.env.items() if k != "RSNAP_LOCAL_STORE"}
        self.env_no_tier["XDG_CACHE_HOME"] = str(tmp / "xdg-cache")

    def run(self, ws, *args, env=None, url=None):
        return rsnap(ws, url or self.url, *args, env_extra={**self.env_no_tier, **(env or {})})

    def store(self):
        """An S3Store in this process (the module fixture put the AWS environment in place:
        OpenDAL reads the credentials at each request, not when the store is opened)."""
        from rsnap.store.s3 import S3Store
        return S3Store(self.url)


@pytest.fixture(scope="module")
def s3(moto_server, tmp_path_factory):
    from fault_proxy import ProxyProcess
    proxy = ProxyProcess(moto_server.port)
    bucket = "rsnap-accept"
    moto_server.create_bucket(bucket)
    s3 = S3(moto_server, proxy, bucket, tmp_path_factory.mktemp("s3"))
    saved_env = dict(os.environ)
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    os.environ.update(s3.env_no_tier)
    yield s3
    os.environ.clear()
    os.environ.update(saved_env)
    proxy.stop()


@pytest.fixture(scope="module")
def saved(s3, registry, gitdep_url, tmp_path_factory):
    ws = create_workspace(tmp_path_factory.mktemp("s3snap") / "ws", registry.index_url, gitdep_url)
    ws.build("build")
    s3.proxy.reset_stats()
    res = s3.run(ws, "save", "--json").check().data
    first = s3.proxy.reset_stats()
    assert res["files"] > 50 and res["packs_written"] >= 1
    ws.expected_output = ws.run_app()
    ws.first_save = first
    s3.run(ws, "save", "--key", PRISTINE, "--no-gc", "--json").check()
    return ws


@pytest.fixture(autouse=True)
def _clear_faults(s3):
    s3.proxy.clear()
    yield
    s3.proxy.clear()


def complete(store) -> list[str]:
    """Every snapshot in the store; asserts each one's blobs are all present and verify.

    Each pack is fetched once, whole (`jobs` GETs in flight), and every blob of every manifest
    is verified from it: one ranged GET per blob through the proxy cost ~45 ms, ~9 s a snapshot."""
    from rsnap.repository import repo
    names = [n for n, _k, _c in repo.list_snapshots(store)]
    packs: dict[str, bytes] = {}
    for name in names:
        m = repo.read_manifest(store, name)
        ids = {loc[0] for loc in m.blobs.values()}
        assert not store.missing([repo.pack_name(p) for p in ids]), f"{name} points at a missing pack"
        new = sorted(ids - packs.keys())
        got = store.get_many([repo.pack_name(p) for p in new])
        packs.update((p, got[repo.pack_name(p)]) for p in new)
        for digest, loc in m.blobs.items():
            repo.read_blob(store, loc, digest, packs)
    return names


def test_round_trip_fresh_clone_compiles_nothing(s3, saved):
    ws = saved
    assert ws.first_save.puts(f"/{s3.bucket}/ci/snapshots/")       # a manifest went up last
    cold_runner(ws)
    s3.proxy.reset_stats()
    res = s3.run(ws, "restore", "--json").check().data
    got = s3.proxy.reset_stats()
    assert res["result"] == "exact" and res["files_written"] > 50
    assert got.requests["PUT"] == 0                                # a restore writes nothing remote
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert ws.run_app() == ws.expected_output
    ls = s3.run(ws, "store", "ls", "--json").check().data
    assert ls["store"] == s3.url and len(ls["snapshots"]) >= 1
    st = s3.run(ws, "status", "--json").check().data
    assert st["would_restore"]["result"] == "exact"


def restore_edit_build(s3, ws, path: str, old: str, new: str) -> None:
    """A cold runner restores the newest snapshot, makes a one-line change and builds."""
    cold_runner(ws)
    s3.run(ws, "restore", "--json").check()
    ws.replace(path, old, new)
    ws.build("build", "--offline")


def test_second_save_after_a_one_line_change_uploads_only_new_packs(s3, saved):
    ws = saved
    restore_edit_build(s3, ws, "crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", "const APP_REVISION: u32 = 3;")
    s3.proxy.reset_stats()
    res = s3.run(ws, "save", "--json").check().data
    got = s3.proxy.reset_stats()
    first = ws.first_save
    pack_puts = [p for p in got.puts(f"/{s3.bucket}/ci/packs/")]
    assert res["packs_written"] == len({p.split("?")[0] for p in pack_puts}) or res["packs_written"] <= 2
    # one pack (the app's changed binary chunks, rlib, incremental session) + manifest + lock: on
    # this small fixture ~15% of the first save; the realistic workspace: bench/bench_s3.py
    assert got.bytes_in <= 0.20 * first.bytes_in, (got.bytes_in, first.bytes_in)
    assert len(pack_puts) == res["packs_written"] == 1
    assert got.requests["PUT"] <= 0.5 * first.requests["PUT"] + 4, (got.requests, first.requests)
    complete(s3.store())
    # restore that newest snapshot on a cold runner with the same edit: nothing compiles
    cold_runner(ws)
    ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", "const APP_REVISION: u32 = 3;")
    s3.run(ws, "restore", "--json").check()
    assert ws.build("build", "--offline").all_fresh()
    assert "rev=3" in ws.run_app()


def test_concurrent_saves_of_one_key_leave_complete_snapshots(s3, saved, tmp_path):
    ws = saved
    other = tmp_path / "copy"
    shutil.copytree(ws.root, other, symlinks=True)
    before = set(complete(s3.store()))
    env = {**os.environ, **ws.env, **s3.env_no_tier, "RSNAP_STORE": s3.url}
    env.pop("CI", None)
    procs = [subprocess.Popen([sys.executable, "-m", "rsnap", "save", "--key", KEY, "--json", "--no-gc",
                               "--manifest-path", str(root / "Cargo.toml")],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for root in (ws.root, other)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    names = set(complete(s3.store())) - before
    assert len([n for n in names if f"/{KEY}/" in n]) == 2
    cold_runner(ws)
    res = s3.run(ws, "restore", "--key", KEY, "--allow-relocate", "--json").check().data
    assert res["result"] == "exact"


@pytest.mark.parametrize("fault", ["503", "500", "drop", "truncate"])
def test_transient_faults_still_restore_exactly(s3, saved, fault):
    ws = saved
    cold_runner(ws)
    s3.proxy.inject(fault, times=3, method="GET")
    res = s3.run(ws, "restore", "--key", PRISTINE, "--json").check().data
    assert res["result"] == "exact"
    assert ws.build("build", "--offline").all_fresh()
    assert ws.run_app() == ws.expected_output


def test_store_failing_midway_costs_what_it_could_not_read(s3, saved):
    """Throttling that outlasts the retries, while packs are read: the packs not read are damage
    (rsnap.snapshot.damage): their units are left out, cargo rebuilds them, never stale."""
    ws = saved
    cold_runner(ws)
    s3.proxy.inject("503", times=None, method="GET", path="/packs/")
    res = s3.run(ws, "restore", "--key", PRISTINE, "--json").check()
    damaged = res.data["damaged"]
    assert damaged["unreadable"] >= 1 and damaged["units_left_out"] >= 1, res.data
    assert "throttling" in res.stderr, res.stderr
    s3.proxy.clear()
    build = ws.build("build")              # a miss: cargo fetches and compiles what it needs
    assert build.compiled() >= {"app", "ws-core"}, build.summary()
    assert ws.run_app() == ws.expected_output
    s3.run(ws, "save", "--json").check()        # the target is not marked interrupted


@pytest.mark.parametrize("case", ["unreachable", "no-bucket", "403", "throttled"])
def test_unusable_store_restore_is_a_miss_and_save_fails_cleanly(s3, saved, case):
    ws = saved
    url, env = s3.url, {}
    if case == "unreachable":
        from s3_util import free_port
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "RSNAP_S3_TIMEOUT": "5"}
    elif case == "no-bucket":
        url = "s3://no-such-bucket/ci"
    elif case == "403":
        s3.proxy.inject("403", times=None)
    else:
        s3.proxy.inject("503", times=None)
    before = s3.store().list("snapshots/") if case in ("unreachable", "no-bucket") else None
    res = s3.run(ws, "restore", "--json", env=env, url=url)
    assert res.returncode == 0 and res.data["result"] == "miss", res.stderr
    assert "testing" not in res.stdout + res.stderr                 # no credentials in messages
    save = s3.run(ws, "save", env=env, url=url)
    assert save.returncode == 3, save.stderr
    line = one_line_error(save)
    assert {"unreachable": "cannot reach", "no-bucket": "does not exist", "403": "access denied",
            "throttled": "throttling"}[case] in line, line
    s3.proxy.clear()
    if before is not None:
        assert s3.store().list("snapshots/") == before
    else:
        complete(s3.store())


def test_local_tier_serves_the_second_restore(s3, saved, tmp_path):
    ws = saved
    env = {"RSNAP_LOCAL_STORE": str(tmp_path / "tier")}
    cold_runner(ws)
    assert s3.run(ws, "restore", "--key", PRISTINE, "--json", env=env).check().data["result"] == "exact"
    cold_runner(ws)
    s3.proxy.reset_stats()
    assert s3.run(ws, "restore", "--key", PRISTINE, "--json", env=env).check().data["result"] == "exact"
    got = s3.proxy.reset_stats()
    assert got.bytes_out < 0.05 * ws.first_save.bytes_in, got.bytes_out   # packs came from the tier
    assert ws.build("build", "--offline").all_fresh()


# -- last: these prune the store -----------------------------------------------------------

def _start(s3, ws, *args, env=None):
    e = {**os.environ, **ws.env, **s3.env_no_tier, "RSNAP_STORE": s3.url, **(env or {})}
    e.pop("CI", None)
    return subprocess.Popen([sys.executable, "-m", "rsnap", *args], cwd=ws.root, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_stopped(proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("the save never reached its fault point")


def test_prune_racing_a_save_never_leaves_a_dangling_manifest(s3, saved):
    ws = saved
    restore_edit_build(s3, ws, "crates/core/src/lib.rs", "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 5;")
    # 1. the save holds its (fresh) lock: prune waits for it, then prunes after it
    save = _start(s3, ws, "save", "--json", env={"RSNAP_FAULT": "save.file:1:stop"})
    _wait_stopped(save)
    prune = _start(s3, ws, "store", "prune", "--keep", "1", "--older-than", "0s", "--grace", "0", "--json")
    wait_for_stderr(prune, "waiting for the lock")   # the save's lock is fresh: prune waits
    save.send_signal(signal.SIGCONT)                 # (within the 4 s before that lock goes stale)
    out, err = save.communicate(timeout=300)
    pout, perr = prune.communicate(timeout=300)
    assert save.returncode == 0 and prune.returncode == 0, (err, perr)
    # prune listed after the save's manifest was written: it deleted that snapshot (--older-than 0s)
    # or kept it whole (unused for not quite 0 s by the store's clock)
    new = json.loads(out)["snapshot"]
    assert new in {r["snapshot"] for r in json.loads(pout)["removed"]} | set(complete(s3.store())), pout
    # 2. a save suspended past the lock's stale timeout: prune goes ahead and deletes what the
    # save meant to reuse; the save must notice and write no manifest
    save = _start(s3, ws, "save", "--json", env={"RSNAP_FAULT": "save.file:1:stop"})
    _wait_stopped(save)
    prune = _start(s3, ws, "store", "prune", "--keep", "1", "--older-than", "0s", "--grace", "0", "--json")
    pout, perr = prune.communicate(timeout=300)   # waits for the stale timeout, then prunes all
    assert prune.returncode == 0, perr
    save.send_signal(signal.SIGCONT)
    out, err = save.communicate(timeout=300)
    assert save.returncode == 3 and "no snapshot written" in err, err
    assert complete(s3.store()) == []
    # the store works again: save, and a cold runner restores it exactly
    s3.run(ws, "save", "--json").check()
    cold_runner(ws)
    ws.replace("crates/core/src/lib.rs", "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 5;")
    assert s3.run(ws, "restore", "--json").check().data["result"] == "exact"
    assert ws.build("build", "--offline").all_fresh()
    assert "rev=5" in ws.run_app()


def test_killed_save_leaves_nothing_visible_and_prune_removes_its_packs(s3, saved):
    ws = saved
    st = s3.store()
    ws.append("crates/app/src/main.rs", "\n// killed save\n")
    ws.build("build", "--offline")
    snaps, packs = st.list("snapshots/"), set(st.list("packs/"))
    res = s3.run(ws, "save", "--json", env={"RSNAP_FAULT": "save.manifest:1"})
    assert res.returncode == -signal.SIGKILL
    assert st.list("snapshots/") == snaps                      # nothing visible
    orphans = set(st.list("packs/")) - packs
    assert orphans                                              # its packs went up first
    out = s3.run(ws, "store", "prune", "--keep", "1", "--json").check().data
    assert out["packs_deleted"] == 0                            # inside the grace period: kept
    out = s3.run(ws, "store", "prune", "--keep", "1", "--grace", "0", "--json").check().data
    assert not orphans & set(st.list("packs/"))
    assert out["bytes_freed"] > 0
    complete(st)
