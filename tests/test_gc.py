"""Garbage collection (issue 3) against real cargo on the fixture workspace.

RSNAP_GC_CHURN_ITERS sets the churn test's iteration count (default 20, 10 when CI is set).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cargo_util import REPO_ROOT, normalize_output, run_cargo_json
from fixtures.tools import mkgitdep
from fixtures.tools.common import git
from reliability_util import LANDED_KILLS
from rsnap.cargo import gc, gc_cargo_home, hashes, usage
from rsnap.cargo import layout as cargo_layout

CHURN_ITERS = int(os.environ.get("RSNAP_GC_CHURN_ITERS") or (10 if os.environ.get("CI") else 20))


# ---------------------------------------------------------------- helpers

def lay(ws, target: Path | None = None) -> cargo_layout.Workspace:
    """The rsnap view of a harness workspace."""
    t = Path(target or ws.target)
    b = ws.build_dir if target is None else t
    return cargo_layout.Workspace(root=ws.root, target_dir=t, build_dir=b, cargo_home=ws.cargo_home,
                                  manifest_path=ws.root / "Cargo.toml")


def tree_bytes(*paths: Path, distinct: bool = False) -> int:
    """Bytes of the files below the paths; `distinct`: hard links counted once, as snapshots store them."""
    total, seen = 0, set()
    for dirpath, dirs, files in (w for p in dict.fromkeys(paths) for w in os.walk(p)):
        if cargo_layout.RSNAP_DIR in dirs:
            dirs.remove(cargo_layout.RSNAP_DIR)
        for fn in files:
            if fn not in cargo_layout.EXCLUDED_TARGET_NAMES:
                st = os.lstat(os.path.join(dirpath, fn))
                if not distinct or st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_size
    return total


def fingerprint_dirs(target: Path) -> set[str]:
    return {p.name for p in target.glob("*/.fingerprint/*")}


def assert_fresh(ws, *args, env=None):
    res = run_cargo_json(ws.root, env or ws.env, *(args or ("build",))).check()
    assert res.all_fresh(), f"cargo {' '.join(args)} after GC: {res.summary()}"
    return res


def rsnap_cli(ws, *args, store: Path, check=True) -> dict:
    env = {**ws.env, "RSNAP_STORE": str(store)}
    proc = subprocess.run(["rsnap", *args, "--store", str(store), "--json"],
                          cwd=ws.root, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"rsnap {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}


def save_supports(flag: str) -> bool:
    proc = subprocess.run(["rsnap", "save", "--help"], capture_output=True, text=True)
    return flag in proc.stdout


def snapshot_root_bytes(store: Path, name: str) -> dict[str, int]:
    from rsnap.store import open_store
    from rsnap.repository import repo
    m = repo.read_manifest(open_store(str(store), create=False), name)
    return {r.name: sum(e.size for e in r.entries if e.type == "f") for r in m.roots}


# ---------------------------------------------------------------- pure functions

def test_cargo_rustc_hash_matches_fingerprints(built_workspace):
    """cargo's `rustc` field is hash_u64(rustc -vV); GC recomputes it exactly."""
    out = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    values = {json.loads(p.read_text())["rustc"] for p in built_workspace.target.glob("debug/.fingerprint/*/*.json")}
    assert values == {hashes.cargo_hash_str(out)}


def test_git_ident_and_sizes():
    # cargo's git db dir for a file:// url: <last segment>-<short_hash(canonical url)>
    assert gc_cargo_home.canonical_git_url("https://GitHub.com/Foo/Bar.git/") == "https://github.com/foo/bar"
    assert gc_cargo_home.canonical_git_url("file:///tmp/x/gitdep") == "file:///tmp/x/gitdep"
    assert gc.parse_size("500M") == 500 << 20 and gc.parse_size("1.5GiB") == int(1.5 * (1 << 30))
    assert gc.parse_size("123") == 123
    with pytest.raises(ValueError):
        gc.parse_size("lots")


def test_atime_probe_here(tmp_path):
    """Documents the filesystem fact the atime signal relies on (relatime here)."""
    probe = usage.probe_atime(tmp_path)
    assert probe["updates"], probe
    os.environ["RSNAP_ATIME"] = "off"
    try:
        assert not usage.probe_atime(tmp_path)["updates"]
    finally:
        del os.environ["RSNAP_ATIME"]


# ---------------------------------------------------------------- liveness (legacy layout)

def test_gc_removes_stale_units_and_noop_stays_fresh(make_workspace, template_output):
    ws = make_workspace()
    ws.build("build", "--features", "app/shout")   # stale after GC: other features
    ws.build("build", "--release")                 # stale: other profile
    ws.cargo("update", "-p", "regdep", "--precise", "1.1.0")
    ws.build()                                     # stale: regdep 1.1.0
    ws.cargo("update", "-p", "regdep", "--precise", "1.0.0")
    for i in range(3):                             # leaves 2 incremental sessions per crate
        ws.append("crates/core/src/lib.rs", f"\n// edit {i}\n")
        ws.build()
    ws.build("test", "--no-run")
    before = fingerprint_dirs(ws.target)

    usage.arm(lay(ws))                             # what `rsnap restore` does at its end
    built = ws.build()
    tested = ws.build("test", "--no-run")
    live = {Path(f).name for u in built.units + tested.units for f in u.filenames}

    dry = gc.collect(lay(ws), dry_run=True)
    assert fingerprint_dirs(ws.target) == before and dry["deletions"] == 0
    report = gc.collect(lay(ws))
    assert report["signal"]["kind"] == "atime"
    assert report["removed"]["by_reason"]["stale-unused"]["units"] >= 10
    assert report["removed"]["by_reason"]["incremental-old-session"]["units"] >= 1
    assert report["removed"] == dry["removed"]
    assert not (ws.target / "release" / ".fingerprint").exists() or not any((ws.target / "release/.fingerprint").iterdir())
    for name in live:                              # every artifact the build reported is still there
        assert list(ws.target.glob(f"debug/**/{name}")), name
    for crate_dir in (ws.target / "debug" / "incremental").iterdir():
        sessions = [p for p in crate_dir.iterdir() if not p.name.endswith(".lock")]
        assert len(sessions) == 1, crate_dir

    assert_fresh(ws, "build")
    assert_fresh(ws, "test", "--no-run")
    assert normalize_output(ws.run_app(), ws.root) == template_output
    again = gc.collect(lay(ws))
    assert again["removed"]["units"] == 0, again["removed"]


def test_incremental_garbage_and_reuse(make_workspace):
    ws = make_workspace()
    ws.build()
    usage.arm(lay(ws))
    [core] = (ws.target / "debug" / "incremental").glob("ws_core-*")
    # rustc leftovers: a -working session, an orphan lock, a session without lock
    (core / "s-aaaaaaaaaa-0000000-working").mkdir()
    (core / "s-aaaaaaaaab-0000000.lock").write_text("")
    (core / "s-aaaaaaaaac-0000000-zzzzzzzzzzzz").mkdir()
    (ws.target / "debug" / "deps" / "rmetaAbC123").mkdir()
    ws.build()
    report = gc.collect(lay(ws))
    assert report["removed"]["by_reason"]["working-dir"]["units"] >= 4
    names = sorted(p.name for p in core.iterdir())
    assert len(names) == 2 and names[1] == names[0].rsplit("-", 1)[0] + ".lock", names
    assert not (ws.target / "debug" / "deps" / "rmetaAbC123").exists()
    assert_fresh(ws)
    ws.append("crates/core/src/lib.rs", "\n// after gc\n")
    res = ws.build()
    assert "ws-core" in res.compiled()
    assert "incremental compilation" not in res.stderr, res.stderr   # rustc warns on a broken session dir
    assert len([p for p in core.iterdir() if p.name.endswith(".lock")]) >= 1


# ---------------------------------------------------------------- v2 layout

def test_gc_new_build_dir_layout(make_workspace):
    ws = make_workspace()
    env = {**ws.env, "RUSTC_BOOTSTRAP": "1"}

    def build(*args):
        return run_cargo_json(ws.root, env, *args, "-Zbuild-dir-new-layout").check()

    build("build", "--features", "app/shout")
    build("build", "--release")
    build("build")
    assert list(ws.target.glob("debug/build/ws-core/*/fingerprint")), "not the v2 layout"
    assert not (ws.target / "debug" / ".fingerprint").exists()
    usage.arm(lay(ws))
    build("build")
    report = gc.collect(lay(ws))
    assert report["removed"]["by_reason"]["stale-unused"]["units"] >= 5
    assert len(list(ws.target.glob("debug/build/app/*"))) == 1
    assert not list(ws.target.glob("release/build/*/*/fingerprint"))
    res = build("build")
    assert res.all_fresh(), res.summary()


def test_gc_separate_build_dir(make_workspace, tmp_path):
    """build.build-dir elsewhere: units live there, uplifts stay in the target dir."""
    ws = make_workspace()
    build_dir = tmp_path / "build-dir"
    env = {**ws.env, "CARGO_BUILD_BUILD_DIR": str(build_dir)}
    run_cargo_json(ws.root, env, "build", "--features", "app/shout").check()
    run_cargo_json(ws.root, env, "build").check()
    rl = cargo_layout.Workspace(root=ws.root, target_dir=ws.target, build_dir=build_dir,
                                cargo_home=ws.cargo_home, manifest_path=ws.root / "Cargo.toml")
    assert (build_dir / "debug" / ".fingerprint").is_dir() and (ws.target / "debug" / "app").is_file()
    usage.arm(rl)
    run_cargo_json(ws.root, env, "build").check()
    report = gc.collect(rl)
    assert report["removed"]["by_reason"]["stale-unused"]["units"] >= 2
    assert (ws.target / "debug" / "app").is_file()
    assert_fresh(ws, "build", env=env)


# ---------------------------------------------------------------- the cargo log signal

def test_rsnap_cargo_log_without_atime(make_workspace, monkeypatch):
    ws = make_workspace()
    ws.build("build", "--features", "app/shout")
    ws.build("test", "--no-run")
    ws.build()
    monkeypatch.setenv("RSNAP_ATIME", "off")
    usage.arm(lay(ws))

    def rsnap_cargo(*args, check=True):
        code = ("import sys; from pathlib import Path; from rsnap.cargo import usage_log, layout as c; "
                "t = Path(sys.argv[1]); ws = c.Workspace(root=t.parent, target_dir=t, build_dir=t, "
                "cargo_home=Path(sys.argv[2]), manifest_path=t.parent / 'Cargo.toml'); "
                "sys.exit(usage_log.run_cargo(sys.argv[3:], ws))")
        proc = subprocess.run([sys.executable, "-c", code, str(ws.target), str(ws.cargo_home), *args],
                              cwd=ws.root, env={**ws.env, "PYTHONPATH": str(REPO_ROOT)},
                              capture_output=True, text=True)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    out = rsnap_cargo("test")                 # test harness output is forwarded, JSON is not
    assert "test result: ok" in out.stdout and '"reason"' not in out.stdout
    assert "Finished" in out.stderr
    js = rsnap_cargo("build", "--message-format=json")
    assert '"reason":"compiler-artifact"' in js.stdout
    log = [json.loads(line) for line in (ws.target / ".rsnap" / "used.jsonl").read_text().splitlines()]
    assert all(rec["success"] and not rec["unresolved"] for rec in log), log

    report = gc.collect(lay(ws))
    assert report["signal"]["kind"] == "cargo-log"
    assert report["removed"]["by_reason"]["stale-unused"]["units"] >= 2    # the shout variants
    assert_fresh(ws, "build")
    assert_fresh(ws, "test", "--no-run")

    # plain cargo compiling something the log does not know: the log is distrusted
    ws.build("build", "--release")
    report = gc.collect(lay(ws), dry_run=True)
    assert report["signal"]["kind"] == "none" and "stale-unused" not in report["removed"]["by_reason"]

    # a failing build is recorded as such; exit code is passed through
    ws.append("crates/util/src/lib.rs", "\nfn broken( {\n")
    bad = rsnap_cargo("build", check=False)
    assert bad.returncode != 0 and "error" in bad.stderr
    assert json.loads((ws.target / ".rsnap" / "used.jsonl").read_text().splitlines()[-1])["success"] is False


# ---------------------------------------------------------------- toolchains, size cap

def test_old_toolchain_units_removed_without_usage_signal(make_workspace):
    if subprocess.run(["rustc", "+nightly", "-vV"], capture_output=True).returncode != 0:
        pytest.skip("no nightly toolchain")
    ws = make_workspace()
    nightly = subprocess.run(["rustc", "+nightly", "-vV"], capture_output=True, text=True).stdout
    run_cargo_json(ws.root, {**ws.env, "RUSTUP_TOOLCHAIN": "nightly"}, "build").check()
    nightly_units = fingerprint_dirs(ws.target)
    values = {json.loads(p.read_text())["rustc"] for p in ws.target.glob("debug/.fingerprint/*/*.json")}
    assert values == {hashes.cargo_hash_str(nightly)}, "cargo's rustc hash on a second toolchain"
    ws.build()
    # no arm(), no log: no usage signal, yet units of another rustc can never be fresh again
    report = gc.collect(lay(ws))
    assert report["signal"]["kind"] == "none"
    assert report["removed"]["by_reason"]["old-toolchain"]["units"] >= 8
    stable_units = fingerprint_dirs(ws.target)
    assert not nightly_units & stable_units
    for p in ws.target.glob("debug/.fingerprint/*/*.json"):
        assert json.loads(p.read_text())["rustc"] != hashes.cargo_hash_str(nightly)
    assert_fresh(ws)


def test_size_cap_evicts_lru_never_current(make_workspace, monkeypatch):
    """With a usage signal every unused unit is already stale; the cap matters when there is
    none. Then "the current build" is what was built since the epoch, plus its dependencies."""
    ws = make_workspace()
    ws.build("build", "--release")
    time.sleep(0.05)
    ws.build("build", "--features", "app/shout")
    time.sleep(0.05)
    ws.build()
    monkeypatch.setenv("RSNAP_ATIME", "off")
    usage.arm(lay(ws))
    ws.replace("crates/app/src/main.rs", "APP_REVISION: u32 = 1", "APP_REVISION: u32 = 7")
    ws.build()                                   # app is rebuilt: the current build
    size = tree_bytes(ws.target)
    release = tree_bytes(ws.target / "release")
    cap = size - release // 2                    # evicting part of the oldest build suffices
    report = gc.collect(lay(ws), max_size=cap)
    assert report["signal"]["kind"] == "none"
    assert report["removed"]["by_reason"]["size-cap"]["units"] > 0
    assert report["size_cap"]["reached"] and tree_bytes(ws.target) <= cap
    assert list(ws.target.glob("debug/.fingerprint/regdep-*")) and \
        len(list(ws.target.glob("debug/.fingerprint/regdep-*"))) == 2, "the shout build is newer: kept"
    assert_fresh(ws)                             # nothing of the current build was evicted
    report = gc.collect(lay(ws), max_size=1)
    assert report["size_cap"]["reached"] is False
    assert_fresh(ws)
    assert "rev=7" in ws.run_app()


# ---------------------------------------------------------------- $CARGO_HOME

def test_cargo_home_gc_keeps_referenced_and_bin(make_workspace, tmp_path):
    gitrepo = tmp_path / "gitdep"
    mkgitdep.make_gitdep(gitrepo)
    ws = make_workspace(gitdep=gitrepo.as_uri())
    bin_dir = ws.cargo_home / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / "cargo-mytool"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    ws.build()
    old_rev = ws.cargo_home.glob("git/checkouts/*/*")
    old_rev = {p.name for p in old_rev}
    # move regdep and gitdep forward: their old .crate / src / checkout become unreferenced
    ws.cargo("update", "-p", "regdep", "--precise", "1.1.0")
    (gitrepo / "src" / "lib.rs").write_text((gitrepo / "src" / "lib.rs").read_text() + "\n// v2\n")
    git("commit", "-qam", "v2", cwd=gitrepo)
    ws.cargo("update", "-p", "gitdep")
    ws.build()
    assert len(list(ws.cargo_home.glob("git/checkouts/*/*"))) == 2
    [reg] = ws.cargo_home.glob("registry/cache/*")
    assert (reg / "regdep-1.0.0.crate").exists() and (reg / "regdep-1.1.0.crate").exists()

    report = gc.collect(lay(ws))["cargo_home"]
    assert report["removed"]["by_reason"]["cargo-home-unreferenced"]["units"] == 3   # .crate, src, checkout
    assert not (reg / "regdep-1.0.0.crate").exists() and (reg / "regdep-1.1.0.crate").exists()
    assert not list(ws.cargo_home.glob("registry/src/*/regdep-1.0.0"))
    assert list(ws.cargo_home.glob("registry/src/*/regdep-1.1.0"))
    checkouts = {p.name for p in ws.cargo_home.glob("git/checkouts/*/*")}
    assert len(checkouts) == 1 and not checkouts & old_rev
    assert len(list(ws.cargo_home.glob("git/db/*"))) == 1 and list(ws.cargo_home.glob("registry/index/*"))
    assert tool.read_text().startswith("#!/bin/sh")
    con = sqlite3.connect(ws.cargo_home / ".global-cache")
    names = {n for (n,) in con.execute("SELECT name FROM registry_crate")}
    con.close()
    assert "regdep-1.0.0.crate" not in names and "regdep-1.1.0.crate" in names
    res = ws.build("build", "--offline")
    assert res.all_fresh(), res.summary()


def test_persistent_runner_bin_survives_restore_save_gc(make_workspace, tmp_path):
    ws = make_workspace()
    store = tmp_path / "store"
    tool = ws.cargo_home / "bin" / "cargo-preinstalled"
    tool.parent.mkdir(parents=True, exist_ok=True)
    tool.write_bytes(b"\x7fELF fake tool")
    ws.build()
    gc.collect(lay(ws))
    rsnap_cli(ws, "save", store=store)
    shutil.rmtree(ws.target)
    rsnap_cli(ws, "restore", store=store)
    usage.arm(lay(ws))
    ws.build()
    gc.collect(lay(ws))
    rsnap_cli(ws, "save", store=store)
    assert tool.read_bytes() == b"\x7fELF fake tool"


# ---------------------------------------------------------------- interruption

def _stale_rich_target(ws) -> Path:
    ws.build("build", "--features", "app/shout")
    ws.build("build", "--release")
    ws.build("test", "--no-run")
    for i in range(2):
        ws.append("crates/util/src/lib.rs", f"\n// churn {i}\n")
        ws.build()
    ws.git("checkout", "-q", "--", "crates/util/src/lib.rs")
    ws.build()
    tpl = ws.root.parent / "target-template"
    shutil.copytree(ws.target, tpl, symlinks=True)
    return tpl


_GC_SCRIPT = ("import sys, json; from pathlib import Path; from rsnap.cargo import gc, layout as c; "
              "t = Path(sys.argv[1]); ws = c.Workspace(root=t.parent, target_dir=t, build_dir=t, "
              "cargo_home=Path(sys.argv[2]), manifest_path=t.parent / 'Cargo.toml'); "
              "print(json.dumps(gc.collect(ws)))")


def _gc_subprocess(ws, env_extra=None):
    env = {**ws.env, "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", _GC_SCRIPT, str(ws.target), str(ws.cargo_home)],
                          env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_gc_killed_at_random_points_next_build_correct(make_workspace, template_output, tmp_path):
    """kill -9 of GC after its k-th deletion, before a move to the trash and while emptying it:
    the next build is correct, and a complete GC then reaches what an uninterrupted one does."""
    ws = make_workspace()
    tpl = _stale_rich_target(ws)
    store = tmp_path / "store"
    rsnap_cli(ws, "save", store=store)
    core_src = ws.read("crates/core/src/lib.rs")

    # how many deletions a full GC does from this state, and the units it leaves
    usage.arm(lay(ws))
    ws.build()
    rc, out, err = _gc_subprocess(ws)
    assert rc == 0, err
    total = json.loads(out)["deletions"]
    assert total > 20
    units_after_gc = fingerprint_dirs(ws.target)

    rng = random.Random(int(os.environ.get("RSNAP_TEST_SEED", "3")))
    trials = [("gc", n) for n in sorted(rng.sample(range(1, total), 5))] + [("gc.trash", 1), ("gc.empty_trash", 1)]
    edited_output = None
    for point, k in trials:
        shutil.rmtree(ws.target)
        shutil.copytree(tpl, ws.target, symlinks=True)
        usage.arm(lay(ws))
        ws.build()
        rc, _out, err = _gc_subprocess(ws, {"RSNAP_FAULT": f"{point}:{k}"})
        assert rc == -signal.SIGKILL, f"the kill at {point}:{k} did not land: {err}"
        LANDED_KILLS[point] += 1
        # the next build is correct (it may recompile) ...
        res = ws.build()
        assert normalize_output(ws.run_app(), ws.root) == template_output, (point, k, res.summary())
        assert_fresh(ws)
        # ... also after an edit that reuses incremental sessions GC was deleting
        ws.write("crates/core/src/lib.rs", core_src + "\n// edited after an interrupted gc\n")
        ws.build()
        edited_output = edited_output or ws.clean_output()
        assert ws.run_app() == edited_output, (point, k)
        ws.write("crates/core/src/lib.rs", core_src)
        # and a complete GC afterwards cleans up, trash included, to the uninterrupted GC's units
        ws.build()
        gc.collect(lay(ws))
        assert not (ws.target / ".rsnap" / "trash").exists()
        assert fingerprint_dirs(ws.target) == units_after_gc, (point, k)
        assert_fresh(ws)

    # the snapshot store is intact: restore into an empty target works and is fresh
    shutil.rmtree(ws.target)
    rsnap_cli(ws, "restore", store=store)
    res = ws.build()
    assert normalize_output(ws.run_app(), ws.root) == template_output, res.summary()


# ---------------------------------------------------------------- churn

_CHURN = [
    # (description, mutation, cargo commands)
    ("edit app", lambda ws: ws.replace("crates/app/src/main.rs", "APP_REVISION: u32 = 1", "APP_REVISION: u32 = 2"), [("build",)]),
    ("feature shout", None, [("build", "--features", "app/shout")]),
    ("regdep 1.0.1", lambda ws: ws.cargo("update", "-p", "regdep", "--precise", "1.0.1"), [("build",)]),
    ("release", None, [("build", "--release")]),
    ("edit core", lambda ws: ws.append("crates/core/src/lib.rs", "\n// churn core\n"), [("build",)]),
    ("tests", None, [("build",), ("test", "--no-run")]),
    ("regdep 1.1.0", lambda ws: ws.cargo("update", "-p", "regdep", "--precise", "1.1.0"), [("build",)]),
    ("release shout", None, [("build", "--release", "--features", "app/shout")]),
    ("edit util", lambda ws: ws.append("crates/util/src/lib.rs", "\n// churn util\n"), [("build",)]),
    ("edit words", lambda ws: ws.append("crates/gen/data/words.txt", "\nchurn\n"), [("build",)]),
    ("regdep 1.0.0", lambda ws: ws.cargo("update", "-p", "regdep", "--precise", "1.0.0"), [("build",)]),
    ("release", None, [("build", "--release")]),
    ("dev shout", None, [("build", "--features", "app/shout")]),
    ("edit macros", lambda ws: ws.append("crates/macros/src/lib.rs", "\n// churn macros\n"), [("build",)]),
    ("regdep 1.0.1", lambda ws: ws.cargo("update", "-p", "regdep", "--precise", "1.0.1"), [("build",)]),
    ("tests", None, [("test", "--no-run")]),
    ("edit app", lambda ws: ws.replace("crates/app/src/main.rs", "APP_REVISION: u32 = 2", "APP_REVISION: u32 = 3"), [("build",)]),
    ("regdep 1.1.0", lambda ws: ws.cargo("update", "-p", "regdep", "--precise", "1.1.0"), [("build",)]),
    ("edit core", lambda ws: ws.append("crates/core/src/lib.rs", "\n// churn core 2\n"), [("build",)]),
    ("final", None, [("build",)]),
]


def run_churn(ws, store: Path, iterations: int, with_gc: bool, on_step=None) -> list[dict]:
    """restore -> edit -> build -> [gc] -> save per step, starting from an empty target
    each time (a fresh CI runner). Returns per-step sizes."""
    steps = (_CHURN[:-1][: max(iterations - 1, 0)] + [_CHURN[-1]])[:iterations]
    no_gc = ["--no-gc"] if (not with_gc and save_supports("--no-gc")) else []
    rows = []
    for i, (desc, mutate, commands) in enumerate(steps, 1):
        shutil.rmtree(ws.target, ignore_errors=True)
        shutil.rmtree(ws.build_dir, ignore_errors=True)
        rsnap_cli(ws, "restore", store=store)
        usage.arm(lay(ws))
        if mutate:
            mutate(ws)
        for cmd in commands:
            ws.build(*cmd)
        report = None
        if with_gc:
            report = gc.collect(lay(ws))
            for cmd in commands:
                assert_fresh(ws, *cmd)
        target_bytes = tree_bytes(ws.target, ws.build_dir)
        saved = rsnap_cli(ws, "save", *no_gc, store=store)
        sizes = snapshot_root_bytes(store, saved["snapshot"])
        row = {"step": i, "desc": desc, "target_bytes": target_bytes, "snapshot_bytes": saved["bytes_total"],
               "snapshot_target_bytes": sizes.get("target", 0) + sizes.get("build", 0),
               "gc_removed_bytes": report["removed"]["bytes"] if report else 0,
               "gc_seconds": report["seconds"] if report else 0.0, "commands": commands}
        rows.append(row)
        if on_step:
            on_step(row)
    return rows


def clean_target_bytes(ws, commands, scratch: Path) -> int:
    """Size of the target (and build) dir of a from-scratch build of the current state, same layout."""
    build = scratch.with_name(scratch.name + "-build") if ws.build_dir != ws.target else scratch
    for d in (scratch, build):
        shutil.rmtree(d, ignore_errors=True)
    env = {**ws.env, "CARGO_TARGET_DIR": str(scratch), "CARGO_BUILD_BUILD_DIR": str(build)}
    for cmd in commands:
        run_cargo_json(ws.root, env, *cmd).check()
    size = tree_bytes(scratch, build, distinct=True)
    for d in (scratch, build):
        shutil.rmtree(d, ignore_errors=True)
    return size


def test_churn_snapshot_stays_bounded(make_workspace, tmp_path, layout):
    """On each layout (the new one with build.build-dir outside the workspace: a shorter churn,
    and the growth without GC shown on the legacy layout only)."""
    iters = max(CHURN_ITERS if layout == "legacy" else CHURN_ITERS // 2, 4)
    ws = make_workspace(layout=layout)
    rows = run_churn(ws, tmp_path / "store", iters, with_gc=True)
    final_cmds = rows[-1]["commands"]
    clean = clean_target_bytes(ws, final_cmds, tmp_path / "clean-target")
    last = rows[-1]
    table = "\n".join(f"{r['step']:>2} {r['desc']:<14} target={r['target_bytes']:>10} "
                      f"snapshot={r['snapshot_bytes']:>10}" for r in rows)
    assert last["snapshot_target_bytes"] <= 1.2 * clean, f"clean={clean}\n{table}"
    assert last["snapshot_bytes"] <= 1.2 * clean + (1 << 20), f"clean={clean}\n{table}"
    # the final state restored into an empty target: nothing to compile, correct output
    shutil.rmtree(ws.target)
    shutil.rmtree(ws.build_dir, ignore_errors=True)
    rsnap_cli(ws, "restore", store=tmp_path / "store")
    assert_fresh(ws, *final_cmds[0])
    assert ws.run_app() == ws.clean_output()
    if layout != "legacy":
        return

    # without GC the same churn grows the snapshot (fewer steps suffice to show it)
    ws2 = make_workspace()
    n2 = min(iters, 6)
    rows2 = run_churn(ws2, tmp_path / "store-nogc", n2, with_gc=False)
    sizes = [r["snapshot_bytes"] for r in rows2]
    assert sizes[-1] > 1.25 * clean and sizes[-1] > 1.25 * sizes[0], (clean, sizes)   # over the bound
    assert all(b >= a * 0.99 for a, b in zip(sizes, sizes[1:])), sizes               # and only grows
