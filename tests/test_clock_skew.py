"""Issue 12 item 8: a snapshot saved where the clock ran ahead must not make later edits stale.

The saving machine's clock is simulated 10 minutes ahead by moving every mtime it would have
written (the target dir and the checkout's sources) 600 s into the future before saving.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cargo_util import create_workspace
from rsnap_util import cold_runner, rsnap

AHEAD_NS = 600 * 1_000_000_000
CORE = "crates/core/src/lib.rs"
CORE_DEPENDENTS = {"ws-core", "ws-util", "ws-gen", "app"}


def move_into_future(top: Path) -> None:
    moved = set()  # cargo hard-links uplifted artifacts: move each inode once
    for dirpath, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files + dirs:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if (st.st_dev, st.st_ino) in moved:
                continue
            moved.add((st.st_dev, st.st_ino))
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + AHEAD_NS), follow_symlinks=False)


@pytest.fixture(scope="module")
def skewed(registry, gitdep_url, tmp_path_factory):
    ws = create_workspace(tmp_path_factory.mktemp("skew") / "ws", registry.index_url, gitdep_url)
    ws.build("build")
    move_into_future(ws.root)  # sources and target alike, as a machine 10 minutes ahead writes them
    store = ws.root.parent / "store"
    rsnap(ws, store, "save", "--json").check()
    return ws, store


def fresh_runner_restore(ws, store) -> dict:
    cold_runner(ws)
    return rsnap(ws, store, "restore", "--json").check().data


def test_future_snapshot_is_shifted_and_unchanged_crates_stay_fresh(skewed):
    ws, store = skewed
    data = fresh_runner_restore(ws, store)
    assert data["result"] == "exact"
    assert 599 < data["clock_shift_seconds"] < 700, data
    newest = max(p.stat().st_mtime_ns for p in ws.target.rglob("*") if p.is_file())
    assert newest < os_now_ns(), "a restored artifact still lies in this machine's future"
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()


def test_edit_after_restoring_a_future_snapshot_rebuilds(skewed):
    ws, store = skewed
    fresh_runner_restore(ws, store)
    ws.replace(CORE, "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 5;")
    build = ws.build("build", "--offline")
    assert build.compiled() == CORE_DEPENDENTS, build.summary()
    assert "rev=5" in ws.run_app()


def test_snapshot_from_the_past_is_not_shifted(saved_now):
    ws, store = saved_now
    data = fresh_runner_restore(ws, store)
    assert data["clock_shift_seconds"] == 0
    assert ws.build("build", "--offline").all_fresh()


@pytest.fixture(scope="module")
def saved_now(registry, gitdep_url, tmp_path_factory):
    ws = create_workspace(tmp_path_factory.mktemp("noskew") / "ws", registry.index_url, gitdep_url)
    ws.build("build")
    store = ws.root.parent / "store"
    rsnap(ws, store, "save", "--json").check()
    return ws, store


def os_now_ns() -> int:
    import time
    return time.time_ns()
