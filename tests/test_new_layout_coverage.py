"""Issue 19 deliverable 1, the features tests/test_build_dir_layouts.py leaves out, on cargo 1.100's
build-dir layout with the build dir outside the workspace ("new-outside", cargo_util.layout_env):
the compile cache, the persistent runner's settled restore, `rsnap status`, saves and GCs killed at
a fault point (rsnap/faults.py), key continuity (rsnap/cargo/key_record.py) and clock skew.

Two built states shared by the module: the rsnap-rustc workspace (tests/wrapper_fixture.py) and
the fixture workspace, built and saved once. Tests run in file order and each starts from a fresh
runner or says what it reuses. "Right" means: the program prints what a clean build of the same
sources prints (Workspace.clean_output, an uncached build for the compile cache).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from cargo_util import NEW_LAYOUT_ENV, create_workspace
from reliability_util import check_store, run_rsnap
from rsnap_util import cargo_sets, cold_runner, rebuild_sets, rsnap
from wrapper_fixture import cargo_build, cargo_env, make_cargo_home, make_registry, read_log
from wrapper_fixture import make_workspace as make_wrapper_workspace

LAYOUT = "new-outside"
KILLED = -signal.SIGKILL
CORE = "crates/core/src/lib.rs"
CORE_DEPENDENTS = {"ws-core", "ws-util", "ws-gen", "app"}


# ---------------------------------------------------------------- the compile cache

PATH_DEPENDENT = {"paths", "where"}  # embed env!("CARGO_MANIFEST_DIR"): never shared between checkouts


class CacheWorld:
    """One compile-cache store; checkouts at different paths, each with its own CARGO_HOME and a
    build dir outside the checkout, on the new layout."""

    def __init__(self, root: Path):
        self.root, self.n = root, 0
        self.registry = make_registry(root / "registry")

    def checkout(self, name: str) -> SimpleNamespace:
        ws = make_wrapper_workspace(self.root / name / "src" / "ws")
        return SimpleNamespace(ws=ws, home=make_cargo_home(self.root / name / "cargo-home", self.registry))

    def build(self, co, cached: bool = True, **env) -> tuple[list[dict], dict[str, list[str]], str]:
        """A build into an empty target and build dir: (messages, crate -> wrapper results, app output)."""
        messages, results, target = self.cargo(co, "build", cached, **env)
        out = subprocess.run([target / "debug" / "app"], check=True, capture_output=True, text=True).stdout
        co.where = subprocess.run([target / "debug" / "where"], check=True, capture_output=True, text=True).stdout
        return messages, results, out

    def cargo(self, co, command: str, cached: bool = True, *args: str, **env):
        self.n += 1
        target, log = self.root / f"target{self.n}", self.root / f"log{self.n}"
        env = cargo_env(co.home, self.root / "store", self.root / "state", log, **NEW_LAYOUT_ENV,
                        CARGO_BUILD_BUILD_DIR=self.root / f"build{self.n}", **env)
        if not cached:
            del env["RUSTC_WRAPPER"]
        messages = cargo_build(co.ws, env, target, *args, command=command)
        results: dict[str, list[str]] = {}
        for result, crate, _kinds, _detail in read_log(log):
            if crate not in ("-", "___"):
                results.setdefault(crate, []).append(result)
        return messages, results, target


@pytest.fixture(scope="module")
def cache_world(tmp_path_factory):
    w = CacheWorld(tmp_path_factory.mktemp("cc"))
    w.a = w.checkout("first")
    _msgs, w.res_a, w.out_a = w.build(w.a)
    w.b = w.checkout("second-checkout/deeper")
    shutil.copy(w.a.ws / "Cargo.lock", w.b.ws / "Cargo.lock")
    return w


def test_compile_cache_cold_runner_at_another_path_hits_and_matches_an_uncached_build(cache_world):
    w = cache_world
    assert all(set(r) == {"miss"} for r in w.res_a.values()), w.res_a
    assert (w.root / "build1" / "debug" / "build" / "leaf").is_dir(), "not the new layout in the build dir"
    messages, res, out = w.build(w.b)
    units = [m for m in messages if m.get("reason") == "compiler-artifact"]
    assert len(units) >= 11 and not any(m["fresh"] for m in units)  # empty dirs: cargo ran every unit
    for crate, results in res.items():
        assert set(results) == {"miss" if crate in PATH_DEPENDENT else "hit"}, (crate, results)
    # build scripts, the proc-macro and the bin (cargo gives it `-C metadata` only on this layout)
    assert res["build_script_build"] == ["hit", "hit"] and res["pm"] == ["hit"] and res["app"] == ["hit"], res
    assert w.b.where.strip() == str(w.b.ws / "paths")
    _m, plain_res, plain = w.build(w.b, cached=False)
    assert plain_res == {} and out == plain == w.out_a, (out, plain)


def test_compile_cache_edits_and_build_script_inputs_are_never_served_stale(cache_world):
    w = cache_world
    lib = w.b.ws / "util" / "src" / "lib.rs"
    original = lib.read_text()
    lib.write_text(original.replace('"{}{} leaf={}"', '"{}{} leaf:{}"'))
    try:
        _m, res, out = w.build(w.b)
        assert res["util"] == ["miss"] and res["app"] == ["miss"], res
        assert "leaf:2" in out and out == w.build(w.b, cached=False)[2]
    finally:
        lib.write_text(original)
    # the generated file lives in the build dir outside the checkout: its new content is a new key
    _m, res, out = w.build(w.b, RSNAP_GEN_VALUE="other")
    assert res["gen"] == ["miss"] and "gen=other" in out, (res, out)
    assert out == w.build(w.b, cached=False, RSNAP_GEN_VALUE="other")[2]
    _m, res, out = w.build(w.b)  # back to the first sources: served from the cache, as they were
    assert res["util"] == ["hit"] and res["gen"] == ["hit"] and out == w.out_a, (res, out)


def test_compile_cache_test_harness_hits_at_another_path_and_runs(cache_world):
    """`cargo test` harnesses: built and kept in the build dir on this layout (not uplifted); the
    second checkout's comes from the cache and passes."""
    w = cache_world
    found = {}
    for co in (w.a, w.b):
        messages, res, _target = w.cargo(co, "test", True, "-p", "util", "--no-run")
        found[co.ws] = res
        exe = next(m["executable"] for m in messages if m.get("reason") == "compiler-artifact" and m["profile"]["test"])
        assert Path(exe).is_relative_to(w.root / f"build{w.n}"), exe  # harnesses stay in the build dir
        ran = subprocess.run([exe], capture_output=True, text=True)
        assert ran.returncode == 0 and "test result: ok" in ran.stdout, ran.stdout + ran.stderr
    # util's lib (hit: the first build cached it) and its harness (a miss, then a hit)
    assert sorted(found[w.a.ws]["util"]) == ["hit", "miss"] and found[w.b.ws]["util"] == ["hit", "hit"], found


# ---------------------------------------------------------------- the fixture workspace, saved once

@pytest.fixture(scope="module")
def runner(registry, gitdep_url, tmp_path_factory):
    """Built with and without the app's `shout` feature, then by default, and saved without GC: the
    snapshot holds units a default build does not use (garbage for the GC tests)."""
    ws = create_workspace(tmp_path_factory.mktemp("newout") / "ws", registry.index_url, gitdep_url, layout=LAYOUT)
    assert ws.build_dir != ws.target and not ws.build_dir.is_relative_to(ws.root)
    ws.build("build", "--features", "app/shout")
    ws.build("build")
    store = ws.root.parent / "store"
    rsnap(ws, store, "save", "--json", "--no-gc").check()
    assert list(ws.build_dir.glob("debug/build/ws-core/*/fingerprint")), "not the new layout"
    return SimpleNamespace(ws=ws, store=store)


def _restore(r, store: Path | None = None) -> dict:
    return rsnap(r.ws, store or r.store, "restore", "--json").check().data


def _a_unit_file(ws, suffix: str) -> Path:
    return next(p for p in sorted(ws.build_dir.glob("debug/build/ws-util/*/out/*")) if p.name.endswith(suffix))


def test_persistent_runner_restore_is_settled_and_repairs_the_build_dir(runner):
    ws = runner.ws
    res = _restore(runner)
    assert sorted(res["settled_roots"]) == ["build", "cargo_home", "target"], res
    assert res["files_written"] == 0 and res["files_removed"] == 0
    # the build dir's files: same size and mtime, other bytes (only ctime moved); a stray; a missing one
    rlib = _a_unit_file(ws, ".rlib")
    original, st = rlib.read_bytes(), rlib.stat()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    rlib.write_bytes(bytes(damaged))
    os.utime(rlib, ns=(st.st_atime_ns, st.st_mtime_ns))
    stray = rlib.parent / "stray.txt"
    stray.write_text("not in the snapshot")
    gone = _a_unit_file(ws, ".rmeta")
    meta = gone.read_bytes()
    gone.unlink()
    res = _restore(runner)
    assert "build" not in res["settled_roots"] and res["files_written"] >= 2, res
    assert rlib.read_bytes() == original and gone.read_bytes() == meta and not stray.exists()
    assert sorted(_restore(runner)["settled_roots"]) == ["build", "cargo_home", "target"]
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert rsnap(ws, runner.store, "status", "--json").check().data["rebuild"] == []
    # a job builds a change (cargo rewrites the units in their dirs) and does not save; the next
    # job, at the saved commit, gets the snapshot's units back and builds nothing
    ws.replace(CORE, "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 5;")
    status = rsnap(ws, runner.store, "status", "--json").check().data
    build = ws.build("build", "--offline")
    assert rebuild_sets(status["rebuild"]) == cargo_sets(build), (status["rebuild"], build.summary())
    assert build.compiled() == CORE_DEPENDENTS and "rev=5" in ws.run_app(), build.summary()
    ws.git("checkout", "--", CORE)
    res = _restore(runner)
    assert "build" not in res["settled_roots"] and res["files_written"] >= 4, res
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert "rev=1" in ws.run_app()


def _fresh_runner_build(r, what: str) -> dict:
    """A fresh runner: restore, `rsnap status`, build. Status and restore predict what cargo
    compiles, and the program is right. Returns the restore's --json."""
    ws = r.ws
    cold_runner(ws)
    expected = ws.start_clean_output()
    restored = _restore(r)
    status = rsnap(ws, r.store, "status", "--json").check().data
    build = ws.build("build", "--offline")
    assert rebuild_sets(restored["rebuild"]) == cargo_sets(build) == rebuild_sets(status["rebuild"]), \
        (what, restored["rebuild"], status["rebuild"], build.summary())
    assert ws.run_app() == expected.result(), f"STALE build ({what}): {build.summary()}"
    return restored


def test_gc_killed_at_a_fault_point_then_builds_are_right(runner):  # before any save with GC
    """kill -9 of `rsnap gc`, and of `rsnap save` in its GC step, after the first deletion in the
    build dir: the kill lands, this runner's next build is right and fresh, a complete GC empties
    the trash, and a fresh runner builds right."""
    ws = runner.ws
    _fresh_runner_build(runner, "before gc")  # the `shout` units came back and this build leaves them unused
    garbage = {p.parent.name for p in ws.build_dir.glob("debug/build/regdep/*/fingerprint")}
    assert len(garbage) >= 2, garbage
    for cmd in (("gc", "--json"), ("save", "--json")):
        before = check_store(runner.store)["snapshots"]
        res = run_rsnap(ws, runner.store, *cmd, env_extra={"RSNAP_FAULT": "gc:1"})
        assert res.returncode == KILLED, (cmd, res.returncode, res.stderr)
        assert check_store(runner.store)["snapshots"] == before
        expected = ws.clean_output()
        build = ws.build("build", "--offline")
        assert build.all_fresh(), (cmd, build.summary())
        assert ws.run_app() == expected, f"STALE build after {cmd[0]} killed in gc"
    rsnap(ws, runner.store, "gc", "--json").check()
    assert len({p.parent.name for p in ws.build_dir.glob("debug/build/regdep/*/fingerprint")}) == 1
    assert not (ws.build_dir / ".rsnap" / "trash").exists() and not (ws.target / ".rsnap" / "trash").exists()
    assert ws.build("build", "--offline").all_fresh()
    _fresh_runner_build(runner, "after the killed gcs")


SAVE_KILL_POINTS = ["save.file:1", "store.packs:1", "save.manifest:1", "store.snapshots:1"]


def test_save_killed_at_a_fault_point_then_a_fresh_runner_builds_right(runner):
    """kill -9 of `rsnap save` in hashing, after a pack, before and after the manifest's commit:
    the kill lands, every snapshot in the store stays whole, and a fresh runner restores the newest
    whole snapshot and builds right (the edit since the saved one compiles, as predicted)."""
    ws = runner.ws
    ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", "const APP_REVISION: u32 = 2;")
    ws.commit("app rev 2")
    for spec in SAVE_KILL_POINTS:
        _fresh_runner_build(runner, f"before the save killed at {spec}")
        before = check_store(runner.store)["snapshots"]
        res = run_rsnap(ws, runner.store, "save", "--json", env_extra={"RSNAP_FAULT": spec})
        assert res.returncode == KILLED, (spec, res.returncode, res.stderr)
        committed = spec.startswith("store.snapshots")  # killed after the manifest's rename
        assert check_store(runner.store)["snapshots"] == before + committed, spec
    restored = _fresh_runner_build(runner, "after the saves killed")
    assert restored["result"] == "exact" and restored["rebuild"] == []  # the last one's snapshot is whole
    assert "app rev=2" in ws.run_app()


def test_key_continuity_without_a_committed_lockfile(runner):
    """No Cargo.lock at restore, one at save (cargo wrote it): the save takes the key the restore
    looked up, and the next fresh runner restores that snapshot exactly and compiles nothing."""
    ws = runner.ws
    ws.git("rm", "-q", "--cached", "Cargo.lock")
    ws.append(".gitignore", "Cargo.lock\n")
    ws.commit("no lockfile")
    cold_runner(ws)
    assert not ws.path("Cargo.lock").exists()
    restored = _restore(runner)
    assert restored["result"] == "partial" and "Cargo.lock" in restored["key_differences"], restored
    ws.build("build", "--offline")
    saved = rsnap(ws, runner.store, "save", "--json").check().data
    assert saved["key_source"] == "restore" and saved["key"] == restored["key"], (saved["key"], restored["key"])
    output = ws.run_app()
    cold_runner(ws)
    again = _restore(runner)
    assert again["result"] == "exact" and again["snapshot_key"] == saved["key"]
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert ws.run_app() == output == ws.clean_output()


# ---------------------------------------------------------------- clock skew (last: moves mtimes)

AHEAD_NS = 600 * 1_000_000_000


def _move_into_future(*tops: Path) -> None:
    """Every mtime a machine 10 minutes ahead would have written; each inode once (hard links)."""
    moved = set()
    for top in tops:
        for dirpath, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != ".git"]
            for name in files + dirs:
                st = os.lstat(p := os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in moved:
                    moved.add((st.st_dev, st.st_ino))
                    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + AHEAD_NS), follow_symlinks=False)


def test_snapshot_saved_with_the_clock_ahead_is_shifted_and_edits_rebuild(runner):
    import time
    ws = runner.ws
    skew_store = ws.root.parent / "skew-store"
    assert ws.build("build", "--offline").all_fresh()
    _move_into_future(ws.root, ws.build_dir)  # sources, target dir and the build dir outside it
    rsnap(ws, skew_store, "save", "--json").check()
    cold_runner(ws)
    data = _restore(runner, skew_store)
    assert data["result"] == "exact" and 599 < data["clock_shift_seconds"] < 700, data
    now = time.time_ns()
    for top in (ws.target, ws.build_dir):
        newest = max(p.lstat().st_mtime_ns for p in top.rglob("*"))
        assert newest < now, f"a restored file of {top} still lies in this machine's future"
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    ws.replace(CORE, "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 5;")
    build = ws.build("build", "--offline")
    assert build.compiled() == CORE_DEPENDENTS, build.summary()
    assert "rev=5" in ws.run_app() and ws.run_app() == ws.clean_output()
