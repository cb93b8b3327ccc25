"""rsnap-rustc's compile cache under stress: two cargo builds sharing one cache at once, a
wrapper killed mid-write at each of the cache's fault points, and a sync up and down through
moto. Each build's programs are compared with an uncached build's (RUSTC_WRAPPER unset), and
a later checkout that builds from the same cache must hit it and still match.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from reliability_util import LANDED_KILLS
from test_wrapper import PATH_DEPENDENT, World, results, run
from wrapper_fixture import cargo_env


def programs(ws) -> dict:
    """What the built programs print; `where` prints its own checkout's path, so it is
    compared relative to the checkout."""
    return {"app": run(ws / "target/debug/app"),
            "where": run(ws / "target/debug/where").replace(str(ws), "<WS>")}


@pytest.fixture(scope="module")
def uncached(tmp_path_factory):
    """The programs of a plain build (no wrapper, no cache)."""
    w = World(tmp_path_factory.mktemp("uncached"))
    ws, home = w.checkout("plain")
    w.build(ws, home, target=ws / "target", RUSTC_WRAPPER="")
    return programs(ws)


def _start_build(w: World, ws, home, **env) -> tuple[subprocess.Popen, object]:
    w.n += 1
    log = w.root / f"log{w.n}"
    proc = subprocess.Popen(["cargo", "build", "--message-format=json", "--target-dir", str(ws / "target")],
                            cwd=ws, env=cargo_env(home, w.store, w.state, log, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, log


def _hits_everything_cacheable(w: World, name: str, uncached: dict, **env) -> None:
    """A new checkout builds from the cache: every crate that is not path-dependent is a hit
    (a damaged entry would be a "miss" after its deletion) and the programs match."""
    ws, home = w.checkout(name)
    _msgs, res = w.build(ws, home, target=ws / "target", **env)
    wrong = {crate: r for crate, r in res.items() if set(r) != {"miss" if crate in PATH_DEPENDENT else "hit"}}
    assert not wrong, wrong
    assert programs(ws) == uncached


def test_two_builds_share_one_cache_at_once(tmp_path, uncached):
    w = World(tmp_path)
    checkouts = [w.checkout(name) for name in ("one", "two")]
    builds = [_start_build(w, ws, home) for ws, home in checkouts]
    for proc, _log in builds:
        _out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    for (ws, _home), (_proc, log) in zip(checkouts, builds):
        assert programs(ws) == uncached
        assert all(set(r) <= {"hit", "miss"} for r in results(log).values()), results(log)
    assert w.stats()["errors_corrupt"] == 0
    _hits_everything_cacheable(w, "three", uncached)


# Every fault point of the compile cache's writes. In a new checkout with a filled cache the
# path-dependent crates miss (marker, entry, manifest: store.cache*, cache.marker, cache.entry)
# and the others hit (cache.output), so one short build passes them all.
KILL_POINTS = ["store.cache.tmp", "store.cache", "cache.marker", "cache.entry", "cache.output"]


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("filled"))
    ws, home = w.checkout("filler")
    w.build(ws, home, target=ws / "target")
    return w


@pytest.mark.parametrize("point", KILL_POINTS)
def test_wrapper_killed_mid_write(tmp_path, uncached, filled_cache, point):
    """RSNAP_FAULT kills every wrapper that reaches `point` (each counts its own hits): cargo
    fails with their SIGKILL. The same target then builds right, and the cache serves the
    next checkout correctly."""
    w = World(tmp_path)
    shutil.copytree(filled_cache.store, w.store)
    ws, home = w.checkout("killed")
    proc, _log = _start_build(w, ws, home, RSNAP_FAULT=f"{point}:1")
    _out, err = proc.communicate(timeout=600)
    landed = len(re.findall(r"signal: 9, SIGKILL", err))
    assert proc.returncode != 0 and landed >= 1, f"no wrapper was killed at {point}:\n{err[-3000:]}"
    LANDED_KILLS[point] += landed
    w.build(ws, home, target=ws / "target")
    assert programs(ws) == uncached
    _hits_everything_cacheable(w, "after", uncached)


def test_sync_up_and_down_through_moto(tmp_path, uncached, moto_server):
    """Runner A builds with its local tier and saves (sync up); runner B, with an empty tier,
    restores (sync down) and builds an empty target from the cache."""
    bucket = "wrapper-sync"
    moto_server.create_bucket(bucket)
    aws = {k: v for k, v in moto_server.env().items() if k.startswith("AWS_")}
    w = World(tmp_path)

    def runner(name):
        ws, home = w.checkout(name)
        env = {**aws, "RSNAP_STORE": f"s3://{bucket}/ci", "RSNAP_LOCAL_STORE": str(tmp_path / f"tier-{name}")}
        return ws, home, env

    def rsnap(ws, home, env, *args):
        full = {**cargo_env(home, w.store, w.state, **env), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        return subprocess.run([sys.executable, "-m", "rsnap", *args, "--json"], cwd=ws, env=full,
                              capture_output=True, text=True)

    ws_a, home_a, env_a = runner("a")
    w.build(ws_a, home_a, target=ws_a / "target", **env_a)
    assert programs(ws_a) == uncached
    tier_a = sorted(p.name for p in (tmp_path / "tier-a" / "cache").rglob("*") if p.is_file())
    assert tier_a
    save = rsnap(ws_a, home_a, env_a, "save")
    assert save.returncode == 0, save.stderr

    ws_b, home_b, env_b = runner("b")
    restore = rsnap(ws_b, home_b, env_b, "restore")
    assert restore.returncode == 0, restore.stderr
    tier_b = sorted(p.name for p in (tmp_path / "tier-b" / "cache").rglob("*") if p.is_file())
    assert tier_b == tier_a                       # every entry came down, and nothing else
    shutil.rmtree(ws_b / "target", ignore_errors=True)   # build from the cache, not the snapshot
    _msgs, res = w.build(ws_b, home_b, target=ws_b / "target", **env_b)
    wrong = {crate: r for crate, r in res.items() if set(r) != {"miss" if crate in PATH_DEPENDENT else "hit"}}
    assert not wrong, wrong
    assert programs(ws_b) == uncached
