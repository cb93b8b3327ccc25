"""Issue 5: rsnap under crashes, disk faults, concurrency and hostile input.

Never a stale build, never a damaged store. Fault points come from rsnap/faults.py
(RSNAP_FAULT=<point glob>:<n>[:action]); hypothesis chooses the point. "Correct" always
means: the program's output equals a clean build of the same sources (`clean_output()`).

Budgets (CI defaults; raise them locally):
  RSNAP_CRASH_EXAMPLES       restores killed at a random point (default 9)
  RSNAP_SAVE_CRASH_EXAMPLES  saves killed at a random point (default 5)
  RSNAP_GC_CRASH_EXAMPLES    gc runs killed after their k-th deletion (default 3)
Each test prints a `[rsnap reliability]` summary line (cases, kills, steps).
"""
from __future__ import annotations

import collections
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from cargo_util import create_workspace
from reliability_util import (OLD_MTIME_NS, check_store, checkout, copy_tree, drop_dac_caps, file_size_limit,
                              permissions_enforced, run_killed, run_rsnap, set_source_mtimes, start_rsnap, store_files,
                              trace_points, try_mount, umount, wait_for_stderr)
from rsnap.repository import manifest as mf, repo
from rsnap.store import LocalStore
from rsnap_util import one_line_error

CRASH_EXAMPLES = int(os.environ.get("RSNAP_CRASH_EXAMPLES", "9"))
SAVE_CRASH_EXAMPLES = int(os.environ.get("RSNAP_SAVE_CRASH_EXAMPLES", "5"))
GC_CRASH_EXAMPLES = int(os.environ.get("RSNAP_GC_CRASH_EXAMPLES", "3"))
HYPOTHESIS = dict(deadline=None, derandomize=bool(os.environ.get("CI")), database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def report(config, line: str) -> None:
    """Write a summary line to the terminal, past output capturing (shows with -q too)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None:
        print(line)
        return
    with capman.global_and_fixture_disabled():
        tr.write_line("")
        tr.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    for test, counts in STATS.items():
        report(request.config, f"[rsnap reliability] {test}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


@dataclass
class Scene:
    """One workspace, two commits, a store with a snapshot of each build (c2's is the newest)."""
    ws: object
    base: Path
    store: Path
    revs: dict
    t1: Path                                   # target built from c1: a persistent runner's old target
                                               # (and t1.build: its build dir, if outside)
    restore_points: dict = field(default_factory=dict)
    save_points: collections.Counter | None = None
    n: int = 0
    home_config: bytes = b""


def _edit_c2(ws) -> None:
    ws.replace("crates/core/src/lib.rs", "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 5;")
    ws.write("crates/gen/data/words.txt", "alpha beta zeta\n")


def _scene(registry, gitdep_url, tmp_path_factory, layout: str) -> Scene:
    base = tmp_path_factory.mktemp("rel")
    ws = create_workspace(base / "ws", registry.index_url, gitdep_url, layout=layout)
    store = base / "store"
    c1 = ws.head()
    ws.build("build")
    copy_tree(ws.target, base / "t1")
    if ws.build_dir != ws.target:
        copy_tree(ws.build_dir, base / "t1.build")
    run_rsnap(ws, store, "save", "--json").check()
    _edit_c2(ws)
    c2 = ws.commit("c2")
    ws.build("build")
    run_rsnap(ws, store, "save", "--json").check()
    return Scene(ws, base, store, {"c1": c1, "c2": c2}, base / "t1",
                 home_config=(ws.cargo_home / "config.toml").read_bytes())


@pytest.fixture(scope="module")
def scene(registry, gitdep_url, tmp_path_factory) -> Scene:
    return _scene(registry, gitdep_url, tmp_path_factory, "legacy")


@pytest.fixture(scope="module")
def scene_new_layout(registry, gitdep_url, tmp_path_factory) -> Scene:
    """The same on cargo 1.100's layout with build.build-dir outside the workspace."""
    return _scene(registry, gitdep_url, tmp_path_factory, "new-outside")


def _cold_home(ws) -> None:
    for sub in ("registry", "git"):
        shutil.rmtree(ws.cargo_home / sub, ignore_errors=True)


def _prepare(scene: Scene, rev: str, old_mtimes: bool, persistent: bool, cold_home: bool) -> None:
    """Sources at `rev` with fresh or old (commit-time) mtimes; no target or c1's old target."""
    ws = scene.ws
    (ws.cargo_home / "config.toml").write_bytes(scene.home_config)  # in case a failed test lost it
    checkout(ws, scene.revs[rev])
    set_source_mtimes(ws, OLD_MTIME_NS if old_mtimes else None)
    shutil.rmtree(ws.target, ignore_errors=True)
    shutil.rmtree(ws.build_dir, ignore_errors=True)
    if persistent:
        copy_tree(scene.t1, ws.target)
        if ws.build_dir != ws.target:
            copy_tree(scene.t1.with_name("t1.build"), ws.build_dir)
    if cold_home:
        _cold_home(ws)


def _assert_correct(ws, what: str) -> None:
    expected = ws.start_clean_output()     # the oracle builds while cargo builds the target dir
    build = ws.build("build", check=False)
    assert build.success, f"{what}: cargo build failed:\n{build.stderr[-3000:]}"
    assert ws.run_app() == expected.result(), f"STALE build ({what}): {build.summary()}"


def _restores_fresh_and_right(ws, store: Path, expected: str) -> dict:
    """Restore into an empty target dir: nothing compiles, and the program prints `expected`."""
    shutil.rmtree(ws.target)
    res = run_rsnap(ws, store, "restore", "--json").check().data
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert ws.run_app() == expected
    return res


def _assert_checkouts_whole(scene: Scene, what: str) -> None:
    """Cargo trusts a git checkout that has `.cargo-ok`: then every file of it must be there."""
    m = repo.read_manifest(LocalStore(scene.store, create=False), _newest(scene.store))
    dirs: dict[str, list[str]] = collections.defaultdict(list)
    for e in m.root("cargo_home").entries:
        parts = e.path.split("/")
        if parts[:2] == ["git", "checkouts"] and len(parts) > 4:
            dirs["/".join(parts[:4])].append(e.path)
    home = scene.ws.cargo_home
    for d, paths in dirs.items():
        if (home / d / ".cargo-ok").exists():
            missing = [p for p in paths if not os.path.lexists(home / p)]
            assert not missing, f"{what}: {d} has .cargo-ok but lacks {missing[:3]}"


def _choose(counts: collections.Counter, which: int, frac: float) -> tuple[str, int]:
    names = sorted(counts)
    name = names[which % len(names)]
    return name, 1 + int(frac * counts[name])


# ---------------------------------------------------------------- 1. crash consistency

SHAPE = st.fixed_dictionaries({"rev": st.sampled_from(["c1", "c2"]), "old_mtimes": st.booleans(),
                               "persistent": st.booleans(), "cold_home": st.booleans()})


@settings(max_examples=CRASH_EXAMPLES, **HYPOTHESIS)
@given(shape=SHAPE, which=st.integers(0, 10**6), frac=st.floats(0, 1, exclude_max=True), build_first=st.booleans())
def test_restore_killed_at_any_point_is_never_stale(scene, shape, which, frac, build_first):
    restore_killed(scene, shape, which, frac, build_first)


@settings(max_examples=max(CRASH_EXAMPLES // 3, 2), **HYPOTHESIS)
@given(shape=SHAPE, which=st.integers(0, 10**6), frac=st.floats(0, 1, exclude_max=True), build_first=st.booleans())
def test_restore_killed_new_layout_build_dir_outside(scene_new_layout, shape, which, frac, build_first):
    """A slice of the above on cargo 1.100's layout with the build dir outside the workspace."""
    restore_killed(scene_new_layout, shape, which, frac, build_first)


def restore_killed(scene, shape, which, frac, build_first) -> None:
    """kill -9 of `rsnap restore` at a fault point; then either cargo builds right away, or the next
    rsnap command detects the interrupted restore and repairs it. Both must give a correct program.

    One start state is stale before rsnap runs: c1's old target under c2's sources with commit-time
    mtimes (older than that target), which plain cargo calls fresh. Only a completed restore fixes
    that (by re-timing the sources); an interrupted one must leave it detected, and is repaired."""
    ws, stats = scene.ws, STATS["restore-crash"]
    stale_before = shape["persistent"] and shape["old_mtimes"] and shape["rev"] != "c1"
    key = tuple(sorted(shape.items()))  # a restore from one start state passes the same points
    if key not in scene.restore_points:   # first time: count the points such a restore passes
        _prepare(scene, **shape)
        res, scene.restore_points[key], _ = trace_points(ws, scene.store, scene.base, "restore", "--json")
        res.check()
    _prepare(scene, **shape)
    name, k = _choose(scene.restore_points[key], which, frac)
    spec = f"{name}:{k}"
    run_killed(ws, scene.store, spec, "restore", "--json")
    stats[f"killed@{name}"] += 1
    stats["cases"] += 1
    what = f"restore killed at {spec}, {shape}, build first: {build_first}"
    _assert_checkouts_whole(scene, what)
    assert (ws.target / ".rsnap" / "restoring").exists(), what
    if build_first:
        if not stale_before:
            _assert_correct(ws, what)
        scratch = scene.base / "scratch-store"   # save refuses a half-restored target dir
        save = run_rsnap(ws, scratch, "save")
        shutil.rmtree(scratch, ignore_errors=True)
        assert save.returncode == 2 and "interrupted" in one_line_error(save), save.stderr
    again = run_rsnap(ws, scene.store, "restore", "--json").check().data
    assert again["repaired_interrupted_restore"] is True, what
    _assert_correct(ws, what + ", then restored again")


@pytest.mark.parametrize("point", ["restore.retime:1", "restore.write:1"])
def test_restore_killed_while_normalizing_sources_is_not_stale(scene, point):
    """Found by the crash test: sources with commit-time mtimes (older than the snapshot's
    artifacts) that differ from the snapshot. The pre-fix order wrote fingerprints before
    re-timing sources, so a restore killed in between left cargo calling the old artifacts
    fresh. Now fingerprints come after normalization."""
    ws = scene.ws
    _prepare(scene, "c1", True, False, False)
    run_killed(ws, scene.store, point, "restore")
    _assert_correct(ws, f"restore killed at {point}")
    STATS["restore-crash"]["regression-" + point] += 1


def test_restore_killed_in_cargo_home_never_leaves_a_trusted_partial_checkout(scene):
    """Cargo trusts a git checkout by its `.cargo-ok` file: restore writes it last (the pre-fix
    order left `.cargo-ok` next to missing checkout files at 10 of 30 kill points)."""
    ws, stats = scene.ws, STATS["cargo-home-crash"]
    _prepare(scene, "c2", False, False, True)
    run_rsnap(ws, scene.store, "restore").check()
    _cold_home(ws)                                # now only $CARGO_HOME files are written
    res, counts, _ = trace_points(ws, scene.store, scene.base, "restore")
    res.check()
    writes = counts["restore.write"]
    for k in range(1, writes + 1, max(1, writes // 8)):
        _cold_home(ws)
        run_killed(ws, scene.store, f"restore.write:{k}", "restore")
        _assert_checkouts_whole(scene, f"restore killed at restore.write:{k} of {writes}")
        stats["killed"] += 1
    _assert_correct(ws, "restore killed while writing $CARGO_HOME")


@pytest.fixture(scope="module")
def crash_store(scene) -> Path:
    path = scene.base / "crash-store"
    shutil.copytree(scene.store, path)
    return path


@settings(max_examples=SAVE_CRASH_EXAMPLES, **HYPOTHESIS)
@given(which=st.integers(0, 10**6), frac=st.floats(0, 1, exclude_max=True))
def test_save_killed_at_any_point_leaves_store_complete(scene, crash_store, which, frac):
    """kill -9 of `rsnap save` at a fault point (hashing, pack upload, manifest upload): every snapshot
    in the store stays complete, the debris is invisible, and the next save and restore work."""
    ws, stats = scene.ws, STATS["save-crash"]

    def new_build():   # new content to save; a build between saves also keeps gc's usage signal true
        scene.n += 1
        if (ws.target / ".rsnap" / "restoring").exists():   # left by an earlier test's killed restore
            shutil.rmtree(ws.target)
        checkout(ws, scene.revs["c2"])
        ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;",
                   f"const APP_REVISION: u32 = {100 + scene.n};")
        ws.build("build")
        return ws.run_app()

    expected = new_build()
    if scene.save_points is None:   # the first save passes every point once: count them
        res, counts, _ = trace_points(ws, crash_store, scene.base, "save", "--json")
        res.check()
        assert counts["store.snapshots"] == 1, counts
        scene.save_points = counts
        expected = new_build()
    before = len(repo.list_snapshots(LocalStore(crash_store)))
    name, k = _choose(scene.save_points, which, frac)
    run_killed(ws, crash_store, f"{name}:{k}", "save", "--json")
    stats[f"killed@{name}"] += 1
    stats["cases"] += 1
    after = check_store(crash_store)
    visible = 1 if name == "store.snapshots" else 0   # killed after the manifest's rename
    assert after["snapshots"] == before + visible, (name, before, after)
    run_rsnap(ws, crash_store, "save", "--json").check()
    assert _restores_fresh_and_right(ws, crash_store, expected)["result"] == "exact"


def test_gc_killed_at_any_point_is_never_stale(scene):
    """kill -9 of `rsnap gc` (and of `rsnap save` during its gc step) after its k-th deletion."""
    ws, stats = scene.ws, STATS["gc-crash"]
    total = None
    versions = ["1.0.1", "1.1.0", "1.0.1", "1.1.0", "1.0.1", "1.1.0"]
    for i in range(GC_CRASH_EXAMPLES + 1):
        _prepare(scene, "c2", False, True, False)
        run_rsnap(ws, scene.store, "restore", "--json").check()
        # the restored regdep 1.0.0 units become garbage: this build uses another version
        ws.cargo("update", "-p", "regdep", "--precise", versions[i % len(versions)])
        ws.build("build")
        if total is None:
            res, counts, _ = trace_points(ws, scene.store, scene.base, "gc", "--json")
            res.check()
            total = counts["gc"]
            assert total > 0, "gc deleted nothing: no garbage to crash in"
            continue
        k = 1 + (i - 1) * total // GC_CRASH_EXAMPLES
        cmd = ("gc",) if i % 2 else ("save", "--json")
        before = check_store(scene.store)["snapshots"]
        run_killed(ws, scene.store, f"gc:{k}", *cmd)
        stats[f"killed-{cmd[0]}"] += 1
        assert check_store(scene.store)["snapshots"] == before
        _assert_correct(ws, f"{cmd[0]} killed at gc:{k} of {total}")
        run_rsnap(ws, scene.store, "gc").check()
        _assert_correct(ws, f"gc after {cmd[0]} killed at gc:{k}")
    stats["deletions-per-gc"] = total or 0


# ---------------------------------------------------------------- 2. disk full and permissions

def test_injected_disk_errors_are_one_line_and_lose_nothing(scene, tmp_path):
    """ENOSPC/EIO at restore writes, pack and manifest uploads: documented exit code, one line,
    the store unchanged and still complete, an interrupted restore repaired by the next one."""
    ws, stats = scene.ws, STATS["injected-errors"]
    store = tmp_path / "store"
    shutil.copytree(scene.store, store)
    before = store_files(store)
    cases = [("restore", "restore.write:3:enospc", 7), ("restore", "restore.write:9:eio", 4),
             ("restore", "restore.invalidate:1:enospc", 7),
             ("save", "store.packs.tmp:1:enospc", 7), ("save", "store.snapshots.tmp:1:enospc", 7),
             ("save", "store.packs.tmp:1:eio", 3), ("save", "store.snapshots.tmp:1:eacces", 3)]
    for i, (cmd, spec, code) in enumerate(cases):
        _prepare(scene, "c1", False, True, False)   # a target whose content differs from the snapshot
        ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", f"const APP_REVISION: u32 = {50 + i};")
        ws.build("build")
        res = run_rsnap(ws, store, cmd, env_extra={"RSNAP_FAULT": spec})
        assert res.returncode == code, (spec, res.returncode, res.stderr)
        one_line_error(res)
        assert store_files(store) == before, spec  # no new object, no temp file left
        check_store(store)
        stats["cases"] += 1
        if cmd == "restore":
            _assert_correct(ws, spec)
            assert run_rsnap(ws, store, "restore", "--json").check().data["repaired_interrupted_restore"]
            _assert_correct(ws, spec + ", then restored again")


def test_file_size_limit_efbig_on_save_and_restore(scene, tmp_path):
    """RLIMIT_FSIZE: every write past the limit fails with EFBIG, as on a full quota."""
    ws = scene.ws
    store = tmp_path / "store"
    shutil.copytree(scene.store, store)
    before = store_files(store)
    _prepare(scene, "c1", False, True, False)
    ws.build("build")
    res = run_rsnap(ws, store, "save", preexec_fn=file_size_limit(1 << 20))
    assert res.returncode == 7, res.stderr
    assert "file size limit" in one_line_error(res)
    assert store_files(store) == before
    shutil.rmtree(ws.target)
    res = run_rsnap(ws, store, "restore", preexec_fn=file_size_limit(1 << 20))
    assert res.returncode == 7, res.stderr
    one_line_error(res)
    _assert_correct(ws, "restore hit the file size limit")
    assert run_rsnap(ws, store, "restore", "--json").check().data["repaired_interrupted_restore"]
    _assert_correct(ws, "restored after the file size limit")
    STATS["efbig"]["cases"] += 2


@pytest.fixture
def small_tmpfs(tmp_path):
    mounts = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if not try_mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]):
            pytest.skip("cannot mount a tmpfs here")
        mounts.append(path)
        return path
    yield mount
    for path in reversed(mounts):
        umount(path)


def test_real_enospc_on_a_full_store(scene, small_tmpfs):
    ws = scene.ws
    store = small_tmpfs(scene.base / "full-store", "4m")
    for sub in ("snapshots",):
        shutil.copytree(scene.store / sub, store / sub)
    _prepare(scene, "c1", False, True, False)
    ws.build("build")
    before = store_files(store)
    res = run_rsnap(ws, store, "save")
    assert res.returncode == 7, res.stderr
    assert "No space left" in one_line_error(res)
    assert store_files(store) == before      # the half-written pack was removed, nothing visible
    STATS["enospc"]["cases"] += 1


def test_real_enospc_on_a_full_target_then_repair(scene, small_tmpfs):
    ws = scene.ws
    _prepare(scene, "c2", False, False, False)
    target = small_tmpfs(ws.target, "8m")
    res = run_rsnap(ws, scene.store, "restore")
    assert res.returncode == 7, res.stderr
    assert "No space left" in one_line_error(res)
    assert (target / ".rsnap" / "restoring").exists()
    subprocess.run(["mount", "-o", "remount,size=200m", str(target)], check=True)
    _assert_correct(ws, "restore ran out of space")  # cargo rebuilds what has no fingerprint
    assert run_rsnap(ws, scene.store, "restore", "--json").check().data["repaired_interrupted_restore"]
    build = ws.build("build")
    assert ws.run_app() == ws.clean_output(), build.summary()
    STATS["enospc"]["cases"] += 1


def test_read_only_store(scene, tmp_path):
    """A read-only store (bind mount, else mode bits without DAC capabilities): restore works,
    save fails with exit 3 and one line."""
    store = tmp_path / "ro-store"
    shutil.copytree(scene.store, store)
    if try_mount(["--bind", str(store), str(store)]):
        try:
            assert try_mount(["-o", "remount,bind,ro", str(store)])
            preexec = None
            _read_only_store_checks(scene, store, preexec)
        finally:
            umount(store)
    elif permissions_enforced(tmp_path):
        for d in [store, *[p for p in store.rglob("*") if p.is_dir()]]:
            d.chmod(0o555)
        _read_only_store_checks(scene, store, drop_dac_caps)
    else:
        pytest.skip("neither bind mounts nor permission bits can make a read-only store here")


def _read_only_store_checks(scene, store, preexec):
    ws = scene.ws
    _prepare(scene, "c2", False, False, False)
    assert run_rsnap(ws, store, "restore", "--json", preexec_fn=preexec).check().data["result"] == "exact"
    assert ws.build("build").all_fresh()
    ws.append("crates/app/src/main.rs", "\n// edit\n")
    ws.build("build")
    res = run_rsnap(ws, store, "save", preexec_fn=preexec)
    assert res.returncode == 3, res.stderr
    one_line_error(res)
    STATS["read-only-store"]["cases"] += 2


def test_permission_errors_are_one_line(scene, tmp_path):
    """Root without DAC capabilities: unreadable target file or dir (save), unwritable target dir
    (restore), unreadable pack (restore): one line, documented exit code, store unchanged."""
    ws = scene.ws
    if not permissions_enforced(tmp_path):
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here")
    store = tmp_path / "store"
    shutil.copytree(scene.store, store)
    before = store_files(store)
    _prepare(scene, "c1", False, True, False)
    ws.build("build")
    def refused_with(path: Path, mode: int, command: str):
        """Run `command` with `path` chmod'ed to `mode`: it fails in one line with exit 4."""
        old_mode = path.stat().st_mode & 0o7777
        path.chmod(mode)
        try:
            res = run_rsnap(ws, store, command, preexec_fn=drop_dac_caps)
        finally:
            path.chmod(old_mode)
        assert res.returncode == 4, res.stderr
        assert "permission denied" in one_line_error(res).lower()

    refused_with(next((ws.target / "debug" / "deps").glob("libws_core-*.rlib")), 0, "save")
    assert store_files(store) == before
    refused_with(ws.target / "debug" / ".fingerprint", 0, "save")
    assert store_files(store) == before
    refused_with(ws.target / "debug" / "deps", 0o555, "restore")
    _assert_correct(ws, "restore into an unwritable dir")

    shutil.rmtree(ws.target)
    for pack in (store / "packs").rglob("*"):
        if pack.is_file():
            pack.chmod(0)
    res = run_rsnap(ws, store, "restore", preexec_fn=drop_dac_caps)
    assert res.returncode == 0, res.stderr   # unreadable packs are damage (rsnap.snapshot.damage)
    warnings = [line for line in res.stderr.splitlines() if line.startswith("rsnap: warning:")]
    assert len(warnings) == 1 and "permission denied" in warnings[0].lower(), res.stderr
    _assert_correct(ws, "restore from unreadable packs")
    STATS["permissions"]["cases"] += 4


# ---------------------------------------------------------------- 3. concurrency

def test_two_restores_into_one_target_at_once(scene):
    ws, stats = scene.ws, STATS["concurrent-restores"]
    for persistent in (False, True, False):
        _prepare(scene, "c2", False, persistent, not persistent)
        procs = [start_rsnap(ws, scene.store, "restore", "--json") for _ in range(2)]
        outs = [p.communicate() for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
        build = ws.build("build", "--offline")
        assert build.all_fresh(), build.summary()
        assert ws.run_app() == ws.clean_output()
        stats["cases"] += 1


def _hold_flock(path: Path, seconds: float, exclusive: bool = True) -> threading.Thread:
    """Hold a flock like cargo does during a build, from another thread, for `seconds`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    def release():
        time.sleep(seconds)
        os.close(fd)
    t = threading.Thread(target=release)
    t.start()
    return t


def test_save_and_restore_wait_for_cargos_build_lock(scene, tmp_path):
    """While something holds `<target>/debug/.cargo-lock` (cargo does for a whole build), save and
    restore wait for it."""
    ws = scene.ws
    _prepare(scene, "c2", False, False, False)
    run_rsnap(ws, scene.store, "restore").check()
    store = tmp_path / "store"
    for cmd, where in ((("save", "--no-gc"), store), (("restore",), scene.store)):
        holder = _hold_flock(ws.target / "debug" / ".cargo-lock", 2.0)
        started = time.monotonic()
        res = run_rsnap(ws, where, *cmd).check()
        holder.join()
        assert time.monotonic() - started >= 1.9, cmd
        assert "waiting for the lock" in res.stderr
        STATS["cargo-lock"]["cases"] += 1
    _assert_correct(ws, "after waiting for cargo's lock")


_SLOW_BUILD_RS = """
fn main() {
    if std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../slow-build").exists() {
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
"""


def test_save_during_a_real_cargo_build_waits_for_it(scene, tmp_path):
    """A real `cargo build` with a slow build script: a save started during it waits for cargo's
    lock, so the snapshot holds the finished build and restores fresh and correct."""
    ws = scene.ws
    _prepare(scene, "c2", False, False, False)
    run_rsnap(ws, scene.store, "restore").check()
    ws.replace("crates/gen/build.rs", "\nfn main() {\n", _SLOW_BUILD_RS)
    ws.write("slow-build", "")
    cargo = subprocess.Popen(["cargo", "build"], cwd=ws.root, env=ws.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock = ws.target / "debug" / ".cargo-lock"
    deadline = time.monotonic() + 60
    while not _is_locked(lock):
        assert cargo.poll() is None and time.monotonic() < deadline, "cargo never took its build lock"
        time.sleep(0.05)
    store = tmp_path / "store"
    res = run_rsnap(ws, store, "save", "--json")
    save_done = time.monotonic()
    assert cargo.wait() == 0, cargo.stderr.read()
    cargo_done = time.monotonic()
    res.check()
    assert save_done >= cargo_done - 0.5  # save (its gc step, then the scan) waited for cargo's lock
    (ws.root / "slow-build").unlink()
    expected = ws.clean_output()
    _restores_fresh_and_right(ws, store, expected)
    STATS["cargo-lock"]["real-build"] += 1


def _is_locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_concurrent_saves_to_one_store(scene, registry, gitdep_url, tmp_path):
    """Two workspaces save into one store at once, with the same and with different content;
    and two saves of one target at once. Every snapshot stays complete and restores right."""
    ws = scene.ws
    ws2 = create_workspace(tmp_path / "ws2", registry.index_url, gitdep_url)
    store = tmp_path / "store"
    _prepare(scene, "c2", False, False, False)
    ws.build("build")
    for i in range(2):
        ws2.replace("crates/app/src/main.rs", f"const APP_REVISION: u32 = {i + 1};",
                    f"const APP_REVISION: u32 = {i + 2};")
        ws2.build("build")
        # --no-gc: a second save with no build in between would let gc drop every unit
        procs = [start_rsnap(w, store, "save", "--json", "--no-gc") for w in (ws, ws2, ws)]
        for p in procs:
            out, err = p.communicate()
            assert p.returncode == 0, err
        info = check_store(store)
        STATS["concurrent-saves"]["cases"] += 1
    assert info["snapshots"] == 6
    for w in (ws, ws2):
        _restores_fresh_and_right(w, store, w.run_app())


def test_prune_during_a_save_never_breaks_the_new_snapshot(scene, tmp_path):
    """A save dedupes against an older snapshot of its key; prune (keep 1) deletes that snapshot and
    its packs (older than the grace period) while the save is paused just before writing its
    manifest. The new snapshot must still be complete."""
    ws = scene.ws
    store = tmp_path / "store"
    _prepare(scene, "c2", False, False, False)
    run_rsnap(ws, scene.store, "restore").check()
    run_rsnap(ws, store, "save").check()          # newest: c2's build, in packs of its own
    src = LocalStore(scene.store, create=False)
    oldest = repo.list_snapshots(src)[-1][0]      # c1's build: the only snapshot using its packs
    shutil.copy(scene.store / oldest, store / oldest)
    for pack in {loc[0] for loc in repo.read_manifest(src, oldest).blobs.values()}:
        (store / repo.pack_name(pack)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(scene.store / repo.pack_name(pack), store / repo.pack_name(pack))
    old = time.time() - 3 * 3600
    for pack in (store / "packs").rglob("*"):
        os.utime(pack, (old, old))               # all packs older than prune's grace period
    _prepare(scene, "c1", False, True, False)     # c1's build: save dedupes against the older snapshot
    ws.build("build")
    expected = ws.run_app()
    save = start_rsnap(ws, store, "save", "--json", env_extra={"RSNAP_FAULT": "save.manifest:1:stop"})
    deadline = time.monotonic() + 60
    while _proc_state(save.pid) != "T":
        assert save.poll() is None and time.monotonic() < deadline, save.communicate()
        time.sleep(0.02)
    snapshots_before = {s[0] for s in repo.list_snapshots(LocalStore(store))}
    prune = start_rsnap(ws, store, "store", "prune", "--keep", "1", "--json")
    wait_for_stderr(prune, "waiting for the lock")   # the stopped save holds it: prune waits
    os.kill(save.pid, signal.SIGCONT)
    out, err = save.communicate(timeout=120)
    assert save.returncode == 0, err
    pout, perr = prune.communicate(timeout=120)
    assert prune.returncode == 0, perr
    new = json.loads(out)["snapshot"]
    assert new not in snapshots_before
    # prune ran after the save: it saw the new snapshot and kept only it (keep 1)
    assert [s[0] for s in repo.list_snapshots(LocalStore(store))] == [new], pout
    assert sorted(r["snapshot"] for r in json.loads(pout)["removed"]) == sorted(snapshots_before), pout
    check_store(store)
    _restores_fresh_and_right(ws, store, expected)
    STATS["prune-vs-save"]["cases"] += 1


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


# ---------------------------------------------------------------- 4. hostile input

def _newest(store: Path) -> str:
    return repo.list_snapshots(LocalStore(store, create=False))[0][0]


def _load_doc(store: Path, name: str) -> dict:
    return json.loads(zstandard.ZstdDecompressor().decompress((store / name).read_bytes()))


def _hostile_store(scene, tmp: Path, mutate) -> Path:
    store = tmp / f"hostile-{time.monotonic_ns()}"
    (store / "packs").parent.mkdir(parents=True)
    (store / "packs").symlink_to(scene.store / "packs")   # read-only use: restore never writes packs
    name = _newest(scene.store)
    doc = _load_doc(scene.store, name)
    mutate(doc)
    text = json.dumps(doc).replace("@OUTSIDE@", str(scene.base / "outside"))
    (store / name).parent.mkdir(parents=True)
    (store / name).write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    return store


def _any_path(doc, root: str) -> str:
    return next(e[0] for e in _root(doc, root)["entries"] if e[1] == "f")


def _root(doc, name):
    return next(r for r in doc["roots"] if r["name"] == name)


def _a_file(doc, root="target"):
    return next(e for e in _root(doc, root)["entries"] if e[1] == "f" and e[3] > 0)


def _add(doc, root, *entries):
    _root(doc, root)["entries"].extend(list(e) for e in entries)


def _file_like(doc, path, root="target"):
    e = list(_a_file(doc, root))
    e[0] = path
    return e


HOSTILE = {
    "dotdot": lambda d: _add(d, "target", _file_like(d, "debug/../../escape")),
    "dotdot-cargo-home": lambda d: _add(d, "cargo_home", _file_like(d, "registry/index/../../../escape", "cargo_home")),
    "absolute": lambda d: _add(d, "target", _file_like(d, "@OUTSIDE@/escape")),
    "symlink-out": lambda d: _add(d, "target", ["debug/out", "l", 0o777, 0, 1, "../../../outside"]),
    "symlink-absolute": lambda d: _add(d, "target", ["debug/out", "l", 0o777, 0, 1, "@OUTSIDE@"]),
    "symlink-hop": lambda d: _add(d, "target", ["hop", "d", 0o755, 0, 1, ""], ["hop/up", "l", 0o777, 0, 1, ".."],
                                  ["hop/up/q", "l", 0o777, 0, 1, "../.."]),
    "below-symlink": lambda d: _add(d, "target", ["lnk", "l", 0o777, 0, 1, "debug"], _file_like(d, "lnk/x")),
    "below-file": lambda d: _add(d, "target", _file_like(d, "debug/app/x")),
    "device": lambda d: _add(d, "target", ["debug/dev", "c", 0o666, 0, 1, ""]),
    "fifo": lambda d: _add(d, "target", ["debug/fifo", "p", 0o666, 0, 1, ""]),
    "huge-size": lambda d: _add(d, "target", ["debug/huge", "f", 0o644, 1 << 50, 1, _a_file(d)[5]]),
    "size-mismatch": lambda d: _add(d, "target", ["debug/sz", "f", 0o644, _a_file(d)[3] + 1, 1, _a_file(d)[5]]),
    "missing-blob": lambda d: _add(d, "target", ["debug/nb", "f", 0o644, 3, 1, "0" * 32]),
    "duplicate": lambda d: _add(d, "target", _a_file(d)),
    "hardlink-out": lambda d: _add(d, "target", ["debug/hl", "h", 0o644, 0, 1, "../../outside/keep"]),
    "hardlink-absolute": lambda d: _add(d, "target", ["debug/hl", "h", 0o644, 0, 1, "@OUTSIDE@/keep"]),
    "hardlink-to-dir": lambda d: _add(d, "target", ["debug/hl", "h", 0o644, 0, 1, "debug"]),
    "hardlink-to-missing": lambda d: _add(d, "target", ["debug/hl", "h", 0o644, 0, 1, "debug/nothing"]),
    # format 3: a hard link into another root joins only the target and build dirs, to a file of that root
    "hardlink-across-to-cargo-home": lambda d: _add(d, "target", ["debug/hl", "h", 0o644, 0, 1,
                                                                  _any_path(d, "cargo_home"), "cargo_home"]),
    "hardlink-across-no-such-root": lambda d: _add(d, "target", ["debug/hl", "h", 0o644, 0, 1, _a_file(d)[0], "build"]),
    "hardlink-across-own-root": lambda d: _add(d, "target", ["debug/hl", "h", 0o644, 0, 1, _a_file(d)[0], "target"]),
    "hardlink-across-dotdot": lambda d: _add(d, "target", ["debug/hl", "h", 0o644, 0, 1, "../outside/keep", "build"]),
    "hardlink-across-unknown-root": lambda d: _add(d, "target", ["debug/hl", "h", 0o644, 0, 1, _a_file(d)[0], "/"]),
    "hardlink-as-fingerprint": lambda d: _add(d, "target", ["debug/.fingerprint/x-0123456789abcdef/lib-x", "h",
                                                            0o644, 0, 1, _a_file(d)[0]]),
    "setuid": lambda d: _add(d, "target", ["debug/suid", "f", 0o104755, 3, 1, _a_file(d)[5]]),
    "cargo-home-config": lambda d: _add(d, "cargo_home", _file_like(d, "config.toml", "cargo_home")),
    "cargo-home-bin": lambda d: _add(d, "cargo_home", _file_like(d, "bin/cargo", "cargo_home")),
    "cargo-home-credentials": lambda d: _add(d, "cargo_home", _file_like(d, "registry/index/credentials.toml",
                                                                      "cargo_home")),
    "rsnap-state": lambda d: _add(d, "target", _file_like(d, ".rsnap/state")),
    "cargo-lock-file": lambda d: _add(d, "target", _file_like(d, "debug/.cargo-lock")),
    "not-merge": lambda d: _root(d, "cargo_home").update(merge=False),
    "two-targets": lambda d: d["roots"].append(dict(_root(d, "target"))),
    # Never "/" or a real system path here: a regression would re-time the whole machine (the
    # pre-fix rsnap walked any recorded source dir and bumped every mtime below it).
    "source-dotdot": lambda d: d["sources"].append(["../outside/keep", "f", 1, 1, "0" * 32]),
    "source-dir-dotdot": lambda d: d["source_dirs"].append("../outside"),
    "source-dir-not-a-package": lambda d: d["source_dirs"].append("@OUTSIDE@"),
    # issue 19: a source record naming a file outside the workspace's packages, with a 2020 mtime
    "source-outside-packages": lambda d: d["sources"].append(["@OUTSIDE@/keep", "f", 7, 1_577_836_800 * 10**9,
                                                             "0" * 32]),
    "source-bad-mtime": lambda d: d["sources"].append(["Cargo.toml", "f", 1, "soon", "0" * 32]),
    "blob-huge-clen": lambda d: d["blobs"].update({_a_file(d)[5]: [d["blobs"][_a_file(d)[5]][0], 0, 1 << 40,
                                                                   _a_file(d)[3]]}),
    "newer-format": lambda d: d.update(format=mf.FORMAT_VERSION + 1),
    "format-zero": lambda d: d.update(format=0),
    "format-bool": lambda d: d.update(format=True),
    "created-inf": lambda d: d.update(created_ns=float("inf")),
    "roots-not-list": lambda d: d.update(roots="target"),
}
# A manifest that fails validation is a damaged snapshot: skipped, and with no other one a miss
# (exit 0, nothing written); one from a newer rsnap is refused (5); a bad blob location is found
# while writing and costs what it touches (rsnap.snapshot.damage).
HOSTILE_CODES = {"newer-format": 5}
HOSTILE_LATE = {"blob-huge-clen", "source-dir-not-a-package", "source-outside-packages"}


def _outside_state(scene, source_mtimes: bool = True) -> dict:
    """Everything a hostile snapshot might touch outside the target dir. Without source_mtimes
    (a restore that failed late, after it could legitimately write $CARGO_HOME and normalize
    sources), $CARGO_HOME is left out and the workspace's own files count by size only."""
    ws = scene.ws
    out = {}
    tops = (ws.cargo_home,) if source_mtimes else ()
    for top in (*tops, scene.base / "outside", ws.root.parent, ws.root):
        for dirpath, dirs, files in os.walk(top):
            if top in (ws.root.parent, ws.root):
                dirs[:] = []   # only the workspace's siblings and its top-level files
            for fn in files:
                p = Path(dirpath, fn)
                try:
                    st_ = p.lstat()
                except FileNotFoundError:
                    continue
                ours = top == ws.root and not source_mtimes
                out[str(p)] = (st_.st_size, None if ours else st_.st_mtime_ns)
    return out


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_is_refused_before_anything_is_written(scene, tmp_path, case):
    ws = scene.ws
    store = _hostile_store(scene, tmp_path, HOSTILE[case])
    (scene.base / "outside").mkdir(exist_ok=True)
    (scene.base / "outside" / "keep").write_text("keep")
    _prepare(scene, "c2", False, False, False)
    late = case in HOSTILE_LATE   # found while writing (blob checks), not by manifest validation
    before = _outside_state(scene, source_mtimes=not late)
    res = run_rsnap(ws, store, "restore")
    assert res.returncode == HOSTILE_CODES.get(case, 0), (case, res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    line = one_line_error(res) if res.returncode else ""
    if not late and not res.returncode:
        assert "is damaged" in res.stderr and "rsnap: miss:" in res.stderr, (case, res.stderr)
    if not late:
        # a miss leaves only rsnap's own records (the key it looked up) in the target dir
        assert not ws.target.exists() or {p.name for p in ws.target.iterdir()} <= {".rsnap"}, \
            f"{case}: restore wrote into the target before refusing"
    assert _outside_state(scene, source_mtimes=not late) == before, f"{case}: restore wrote outside the target"
    STATS["hostile-manifests"]["cases"] += 1
    STATS["hostile-manifests"][f"exit{res.returncode}"] += 1
    if case == "newer-format":
        assert "newer rsnap" in line


@pytest.mark.parametrize("damage", ["not-zstd", "truncated", "bitflip", "not-json", "json-array", "deep-json",
                                    "empty"])
def test_malformed_manifest_bytes_are_refused(scene, tmp_path, damage):
    ws = scene.ws
    store = tmp_path / "store"
    shutil.copytree(scene.store, store)
    name = _newest(store)
    raw = (store / name).read_bytes()
    c = zstandard.ZstdCompressor()
    data = {"not-zstd": b"{}", "truncated": raw[: len(raw) // 2], "empty": b"",
            "bitflip": raw[:20] + bytes([raw[20] ^ 0x10]) + raw[21:],
            "not-json": c.compress(b"\xff\xfe garbage"), "json-array": c.compress(b"[1,2,3]"),
            "deep-json": c.compress(b"[" * 100_000 + b"]" * 100_000)}[damage]
    (store / name).write_bytes(data)
    _prepare(scene, "c2", False, False, False)
    res = run_rsnap(ws, store, "restore", "--json")
    assert res.returncode == 0, res.stderr   # the newest snapshot is damaged: the one before it is restored
    assert f"snapshot {name} is damaged" in res.stderr, res.stderr
    data = res.check().data
    assert data["result"] in ("exact", "partial") and data["damaged"] == {"manifests": [name]}, data
    _assert_correct(ws, f"restore past a {damage} manifest")
    STATS["malformed-manifests"]["cases"] += 1


@pytest.mark.parametrize("damage", ["truncate-pack", "bitflip-every-pack", "swap-packs"])
def test_damaged_packs_fail_cleanly_and_stay_inside(scene, tmp_path, damage):
    """Blob damage is found while writing: it costs the units it touches (exit 0, one warning
    line), nothing outside the target is touched, the build is right and a save is allowed."""
    ws = scene.ws
    store = tmp_path / "store"
    shutil.copytree(scene.store, store)
    packs = sorted(p for p in (store / "packs").rglob("*") if p.is_file())
    for i, pack in enumerate(packs):
        data = pack.read_bytes()
        if damage == "truncate-pack":
            data = data[: len(data) // 3]
        elif damage == "bitflip-every-pack":
            data = data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]
        elif damage == "zero-pack":
            data = bytes(len(data))
        elif damage == "swap-packs":
            data = packs[(i + 1) % len(packs)].read_bytes() if len(packs) > 1 else data[::-1]
        pack.write_bytes(data)
    _prepare(scene, "c2", False, False, False)
    # blobs of data files are read after the sources are normalized (their mtimes may change)
    before = _outside_state(scene, source_mtimes=False)
    res = run_rsnap(ws, store, "restore")
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("rsnap: warning:")]
    assert len(warnings) == 1 and "damaged pack" in warnings[0], res.stderr
    after = _outside_state(scene, source_mtimes=False)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert all(k.startswith(str(ws.cargo_home)) for k in changed), changed
    _assert_correct(ws, f"restore from {damage} store")
    run_rsnap(ws, tmp_path / "other", "save").check()   # the restore finished: nothing to repair
    assert not run_rsnap(ws, scene.store, "restore", "--json").check().data["repaired_interrupted_restore"]
    _assert_correct(ws, f"good restore after {damage}")
    STATS["damaged-packs"]["cases"] += 1


def test_existing_symlink_in_cargo_home_is_not_written_through(scene, tmp_path):
    """A symlink already in $CARGO_HOME (left by an earlier run or planted) must not let a restore
    write outside: files below it are refused, the link target dir is untouched."""
    ws = scene.ws
    outside = tmp_path / "outside"
    outside.mkdir()
    name = "registry/index/planted"

    def mutate(doc):
        _add(doc, "cargo_home", _file_like(doc, f"{name}/pwned", "cargo_home"))
    store = _hostile_store(scene, tmp_path, mutate)
    _prepare(scene, "c2", False, False, False)
    (ws.cargo_home / name).parent.mkdir(parents=True, exist_ok=True)
    (ws.cargo_home / name).symlink_to(outside)
    try:
        res = run_rsnap(ws, store, "restore")
        assert res.returncode == 4, res.stderr
        assert "symlink" in one_line_error(res)
        assert list(outside.iterdir()) == []
    finally:
        (ws.cargo_home / name).unlink()
    assert run_rsnap(ws, scene.store, "restore", "--json").check().data["repaired_interrupted_restore"]
    _assert_correct(ws, "after refusing a planted symlink")
    STATS["hostile-manifests"]["planted-symlink"] += 1


# 5. the long run of random CI runs is now the never-stale state machine
# (tests/never_stale_machine.py; bench/bench_never_stale.py for a long run).
