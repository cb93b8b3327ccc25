"""rsnap-rustc compile cache: real cargo builds of a small workspace with a local registry.

Hits and misses come from the wrapper's own log and stats, freshness from cargo's
JSON messages, behaviour from running the built programs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rsnap.compile_cache import cache, cache_key, rustc_call
from rsnap.compile_cache import stats as wrapper_stats
from wrapper_fixture import (
    cargo_build, cargo_env, make_cargo_home, make_registry, read_log, wrapper_path,
)
from wrapper_fixture import make_workspace as make_test_workspace

pytestmark = pytest.mark.skipif(shutil.which("cargo") is None, reason="needs cargo")

PATH_DEPENDENT = {"paths", "where"}  # embed env!("CARGO_MANIFEST_DIR")


def compiled_units(messages) -> list[tuple[str, bool]]:
    return [(m["target"]["name"], m["fresh"]) for m in messages if m.get("reason") == "compiler-artifact"]


def results(log: Path) -> dict[str, list[str]]:
    """crate name -> results ("hit"/"miss"/"pass") of the compilations in `log`."""
    out: dict[str, list[str]] = {}
    for result, crate, _kinds, _detail in read_log(log):
        if crate not in ("-", "___"):
            out.setdefault(crate, []).append(result)
    return out


def run(binary: Path) -> str:
    return subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout


class World:
    """One store shared by every checkout; each checkout has its own CARGO_HOME."""

    def __init__(self, root: Path):
        self.root = root
        self.registry = make_registry(root / "registry")
        self.store = root / "store"
        self.state = root / "state"
        self.n = 0

    def checkout(self, name: str) -> tuple[Path, Path]:
        ws = make_test_workspace(self.root / name / "src" / "ws")
        home = make_cargo_home(self.root / name / "cargo-home", self.registry)
        return ws, home

    def build(self, ws: Path, home: Path, *args: str, target: Path | None = None, cargo: str = "build", **env):
        self.n += 1
        log = self.root / f"log{self.n}"
        messages = cargo_build(ws, cargo_env(home, self.store, self.state, log, **env),
                               target or self.root / f"target{self.n}", *args, command=cargo)
        return messages, results(log)

    def stats(self) -> dict:
        os.environ["RSNAP_STATE_DIR"] = str(self.state)
        try:
            return wrapper_stats.read(str(self.store))
        finally:
            del os.environ["RSNAP_STATE_DIR"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("wrapper"))
    w.ws_a, w.home_a = w.checkout("first")
    w.msgs_a, w.res_a = w.build(w.ws_a, w.home_a, target=w.ws_a / "target")
    w.ws_b, w.home_b = w.checkout("second-checkout/deeper")
    shutil.copy(w.ws_a / "Cargo.lock", w.ws_b / "Cargo.lock")
    w.stats_after_a = w.stats()
    w.msgs_b, w.res_b = w.build(w.ws_b, w.home_b, target=w.ws_b / "target")
    return w


def test_first_build_misses_and_stores(world):
    assert all(set(r) == {"miss"} for r in world.res_a.values()), world.res_a
    assert world.res_a["build_script_build"] == ["miss", "miss"]
    units = {name for name, fresh in compiled_units(world.msgs_a) if not fresh}
    assert {"leaf", "mid", "pm", "bsdep", "util", "gen", "paths", "where", "app"} <= units
    assert world.stats_after_a["misses"] == sum(len(r) for r in world.res_a.values())
    assert world.stats_after_a["hits"] == 0
    assert world.stats_after_a["misses_path_dependent"] == 2


def test_second_checkout_hits_every_cacheable_crate(world):
    compiled = [name for name, fresh in compiled_units(world.msgs_b) if not fresh]
    assert len(compiled) == len(compiled_units(world.msgs_b)) >= 11  # clean target dir: cargo ran every unit
    for crate, res in world.res_b.items():
        expected = "miss" if crate in PATH_DEPENDENT else "hit"
        assert set(res) == {expected}, (crate, res)
    # both build scripts, the proc-macro and the bin are among the hits
    assert world.res_b["build_script_build"] == ["hit", "hit"]
    assert world.res_b["pm"] == ["hit"] and world.res_b["app"] == ["hit"]
    stats = world.stats()
    assert stats["hits"] - world.stats_after_a["hits"] == 9
    # found through the manifests the first checkout wrote, without a dep-info pass
    assert stats["hits_direct"] - world.stats_after_a["hits_direct"] == 9
    assert stats["bytes_read"] > 0
    # each hit saves its recorded compile time less its own: more than nothing for 9 rustc runs,
    # never more than what compiling every miss of the first checkout took
    saved = stats["time_saved_s"] - world.stats_after_a["time_saved_s"]
    assert 0 < saved <= world.stats_after_a["compile_time_s"], (saved, world.stats_after_a)


def test_second_checkout_programs_behave_the_same(world):
    out_a = run(world.ws_a / "target/debug/app")
    out_b = run(world.ws_b / "target/debug/app")
    assert out_a == out_b
    assert "util=plain leaf=2" in out_a and "pm=42" in out_a and "bsdep=7 built=true" in out_a
    # the path-dependent crate was not shared: each checkout prints its own path
    assert run(world.ws_a / "target/debug/where").strip() == str(world.ws_a / "paths")
    assert run(world.ws_b / "target/debug/where").strip() == str(world.ws_b / "paths")
    # remapped: no checkout or CARGO_HOME path in the shared binary
    app = (world.ws_b / "target/debug/app").read_bytes()
    assert str(world.root).encode() not in app
    assert b"leaf-0.1.0/src/lib.rs" in app


def test_restored_build_is_fresh_for_cargo(world):
    depinfo = next((world.ws_b / "target/debug/deps").glob("leaf-*.d")).read_text()
    assert str(world.home_b) in depinfo and str(world.home_a) not in depinfo
    messages, res = world.build(world.ws_b, world.home_b, target=world.ws_b / "target")
    assert all(fresh for _name, fresh in compiled_units(messages))
    assert res == {}


def test_check_and_test_builds_hit_at_another_checkout(world):
    """`cargo check` (.rmeta only) and `cargo test` harness binaries are cached too."""
    runs = []
    for ws, home in ((world.ws_a, world.home_a), _variant(world, "check-and-test")):
        target = ws / "target-ct"
        _msgs, check = world.build(ws, home, "--all-targets", target=target, cargo="check")
        _msgs, test = world.build(ws, home, "-p", "util", "--tests", target=target)
        runs.append((check, test))
    (check_a, test_a), (check_b, test_b) = runs
    assert set(check_a["leaf"]) == {"miss"} and set(check_b["leaf"]) == {"hit"}
    assert check_b["mid"] == ["hit"] and "hit" in check_b["app"]
    assert test_a["util"][-1] == "miss" and test_b["util"] == ["hit"]  # the test harness of util


def _variant(world, name: str) -> tuple[Path, Path]:
    ws, home = world.checkout(name)
    shutil.copy(world.ws_a / "Cargo.lock", ws / "Cargo.lock")
    return ws, home


def _assert_invalidated(res: dict, affected: set[str]):
    missed = {crate for crate, r in res.items() if "miss" in r}
    assert missed == affected | PATH_DEPENDENT, res
    # everything else hit (the two build scripts share a crate name: checked by the caller)
    assert all(set(r) == {"hit"} for crate, r in res.items() if crate not in missed), res


@pytest.mark.parametrize("change", ["source", "env", "feature", "rustflags", "build-script-output", "native-lib"])
def test_change_invalidates_exactly_the_affected_crates(world, change):
    ws, home = _variant(world, f"change-{change}")
    args, env = [], {}
    if change == "source":
        (ws / "util/src/lib.rs").write_text((ws / "util/src/lib.rs").read_text().replace("leaf={}", "leaf=<{}>"))
        affected, expect = {"util", "app"}, "leaf=<2>"
    elif change == "env":
        env["RSNAP_TEST_FLAVOR"] = "spicy"
        affected, expect = {"util", "app"}, "util=spicy leaf=2"
    elif change == "feature":
        args = ["--features", "util/extra"]
        affected, expect = {"util", "app"}, "util=plain+extra"
    elif change == "rustflags":
        env["RUSTFLAGS"] = "--cfg rsnap_test_flag"
        affected, expect = {"leaf", "mid", "pm", "bsdep", "util", "gen", "app", "build_script_build"}, "pm=42"
    elif change == "build-script-output":
        env["RSNAP_GEN_VALUE"] = "changed"
        affected, expect = {"gen", "app"}, "gen=changed native=3"
    else:  # only the static C library the build script makes changes: its content is in the key
        env["RSNAP_NATIVE_VALUE"] = "5"
        affected, expect = {"gen", "app"}, "gen=default native=5"
    messages, res = world.build(ws, home, *args, target=ws / "target", **env)
    assert all(not fresh for _n, fresh in compiled_units(messages))
    _assert_invalidated(res, affected)
    if change in ("build-script-output", "native-lib"):
        assert res["build_script_build"] == ["hit", "hit"]  # the script itself is unchanged
    if change == "rustflags":
        assert res["build_script_build"] == ["miss", "miss"]
    assert expect in run(ws / "target/debug/app")


def _entries_of(store: Path, crate: str) -> list[Path]:
    """Valid entries of `crate` (one per configuration the tests built it in)."""
    found = []
    for path in sorted(store.glob("cache/*/*")):
        try:
            header, _ = cache.unpack_entry(path.read_bytes())
        except cache.CorruptEntry:
            continue
        if header.get("crate") == crate and header.get("kind") == "output":
            found.append(path)
    return found


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_entry_is_detected_deleted_and_recompiled(world, damage):
    entries = _entries_of(world.store, "mid")
    assert entries
    for entry in entries:
        data = entry.read_bytes()
        entry.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-20] + bytes(b ^ 0xFF for b in data[-20:]))
    before = world.stats()["errors_corrupt"]
    ws, home = _variant(world, f"corrupt-{damage}")
    messages, res = world.build(ws, home, target=ws / "target")
    assert res["mid"] == ["miss"] and res["leaf"] == ["hit"] and res["app"] == ["hit"]
    assert world.stats()["errors_corrupt"] == before + 1
    assert len(_entries_of(world.store, "mid")) == 1  # the one this build used: rewritten
    assert "mid=42" in run(ws / "target/debug/app")


def test_unusable_store_degrades_to_plain_compilation(world, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    env = cargo_env(world.home_a, blocker / "store", tmp_path / "state", tmp_path / "log")
    proc = subprocess.run(["cargo", "build", "-p", "util", "--target-dir", str(tmp_path / "t")],
                          cwd=world.ws_a, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "rsnap-rustc: warning: store" in proc.stderr
    assert {r for r, *_ in read_log(tmp_path / "log")} >= {"store-error"}


def test_incremental_compilations_pass_through(world, tmp_path):
    log = tmp_path / "log"
    env = cargo_env(world.home_a, world.store, world.state, log)
    del env["CARGO_INCREMENTAL"]  # the dev profile's default: workspace crates are incremental
    subprocess.run(["cargo", "build", "-p", "util", "--target-dir", str(tmp_path / "t")],
                   cwd=world.ws_a, env=env, check=True, capture_output=True)
    res = {crate: (result, detail) for result, crate, _k, detail in read_log(log)}
    assert res["util"] == ("pass", "incremental")
    assert res["leaf"][0] == "hit"  # registry crates are never incremental
    assert world.stats()["non_cacheable_reasons"].get("incremental", 0) >= 1


# ---------------------------------------------------------------- no cargo needed

RUSTC = "/opt/toolchain/bin/rustc"


def classify(*args: str) -> str | None:
    inv = rustc_call.Invocation(RUSTC, list(args))
    return rustc_call.non_compilation_reason(inv) or rustc_call.non_cacheable_reason(inv)


LIB = ["--crate-name", "foo", "--edition=2021", "src/lib.rs", "--crate-type", "lib",
       "--emit=dep-info,metadata,link", "-C", "extra-filename=-abc", "--out-dir", "/t/debug/deps"]


@pytest.mark.parametrize("args, reason", [
    (["-vV"], "version"),
    (["-", "--crate-name", "___", "--print=file-names"], "print"),
    (LIB, None),
    (LIB + ["-C", "incremental=/t/debug/incremental"], "incremental"),
    ([a if a != "lib" else "cdylib" for a in LIB], "crate-type:cdylib"),
    ([a if a != "lib" else "proc-macro" for a in LIB], None),
    ([a if a != "lib" else "bin" for a in LIB] + ["-C", "link-arg=-fuse-ld=mold"], "link-args"),
    ([a if a != "lib" else "bin" for a in LIB] + ["-l", "dylib=ssl"], "link-dylib"),
    (LIB + ["-l", "static=foo"], None),
    (LIB + ["-o", "x"], "output-file"),
    (LIB + ["--emit=asm"], "emit:asm"),
    (LIB + ["-Csplit-debuginfo=packed"], "split-debuginfo"),
    (LIB + ["@args.txt"], "argfile"),
    ([a for a in LIB if a not in ("--crate-type", "lib")] + ["--test"], None),
    ([a for a in LIB if a not in ("--crate-type", "lib")], "crate-type:none"),
    ([a for a in LIB if a != "src/lib.rs"] + ["-"], "stdin"),
])
def test_classification(args, reason):
    assert classify(*args) == reason


def test_native_search_dirs():
    inv = rustc_call.Invocation(RUSTC, LIB + ["-L", "dependency=/t/deps", "-L", "native=/o/out", "-Lall=/x",
                                           "-L", "/plain", "-L", "crate=/c"])
    assert cache_key.native_search_dirs(inv) == ["/o/out", "/x", "/plain"]


def test_parse_depinfo_with_escapes_and_env_deps():
    text = ("/t/deps/foo-1.d: src/lib.rs src/with\\ space.rs /t/build/out/gen.rs\n\n"
            "src/lib.rs:\n\n# env-dep:OUT_DIR=/t/build/out\n# env-dep:UNSET_VAR\n")
    files, env_deps = cache_key.parse_depinfo(text)
    assert files == ["src/lib.rs", "src/with space.rs", "/t/build/out/gen.rs"]
    assert env_deps == ["OUT_DIR=/t/build/out", "UNSET_VAR"]


@pytest.mark.parametrize("out_dir, target, root", [
    ("/w/target/debug/deps", None, "/w/target"),
    ("/w/target/x86_64-unknown-linux-gnu/release/deps", "x86_64-unknown-linux-gnu", "/w/target"),
    ("/w/target/debug/build/foo-0123456789abcdef", None, "/w/target"),
    ("/elsewhere", None, None),
])
def test_target_root(out_dir, target, root):
    assert cache_key.target_root(out_dir, target) == root


def test_entry_roundtrip_and_corruption():
    entry = cache.pack_entry({"kind": "output", "files": [{"name": "a", "size": 3, "mode": 0o644}],
                                    "stdout": 1, "stderr": 2}, [b"abc", b"o", b"ee"])
    header, blob = cache.unpack_entry(entry)
    assert blob == b"abcoee" and header["files"][0]["name"] == "a"
    for bad in (entry[:-1], entry[:20], b"x" + entry[1:], entry[:-3] + b"\0\0\0"):
        with pytest.raises(cache.CorruptEntry):
            cache.unpack_entry(bad)


def test_stats_show_zero_and_format(tmp_path, monkeypatch):
    monkeypatch.setenv("RSNAP_STATE_DIR", str(tmp_path / "state"))
    store = str(tmp_path / "store")
    wrapper_stats.update(store, {"requests": 3, "hits": 2, "misses": 1, "bytes_read": 2048, "time_saved_s": 1.5})
    wrapper_stats.update(store, {"requests": 1, "non_cacheable": 1}, ("non_cacheable_reasons", "incremental"))
    stats = wrapper_stats.show_stats(store, as_json=True, zero=True)
    assert stats["requests"] == 4 and stats["hits"] == 2
    assert stats["non_cacheable_reasons"] == {"incremental": 1}
    text = wrapper_stats.format_stats(stats)
    assert "Cache hits" in text and "66.7 %" in text and "incremental" in text
    assert wrapper_stats.show_stats(store, zero=False)["requests"] == 0  # zeroed


def test_lru_eviction_drops_oldest_entries(tmp_path, monkeypatch):
    from rsnap.store import open_store

    monkeypatch.setenv("RSNAP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("RSNAP_CACHE_SIZE", "3K")
    store = open_store(str(tmp_path / "store"))
    for i in range(5):
        name = f"cache/0{i}/key{i}"
        store.put(name, os.urandom(1000))
        os.utime(store.root / name, (1000 + i, 1000 + i))
    store.touch("cache/00/key0")  # a hit makes the oldest the newest
    wrapper_stats.update(str(store.root), {"requests": 0})
    cache.evict(store, str(store.root))
    assert sorted(store.list("cache/")) == ["cache/00/key0", "cache/04/key4"]
    assert wrapper_stats.read(str(store.root))["evicted_entries"] == 3


# ---------------------------------------------------------------- the shared fixture workspace

def test_shared_fixture_second_checkout_hits(make_workspace, tmp_path):
    """fixtures/ws (sparse registry on loopback, git dep, proc-macro, build scripts) at two
    paths with two CARGO_HOMEs: everything that does not embed its path hits."""
    from cargo_util import normalize_output, run_cargo_json

    store, state = tmp_path / "store", tmp_path / "state"
    outputs, logs = [], []
    for name in ("one", "two/nested"):
        ws = make_workspace(tmp_path / name / "ws")
        log = tmp_path / f"{name.replace('/', '-')}.log"
        env = dict(ws.env, RUSTC_WRAPPER=wrapper_path(), RSNAP_STORE=str(store), RSNAP_STATE_DIR=str(state),
                   RSNAP_WRAPPER_LOG=str(log), CARGO_INCREMENTAL="0")
        res = run_cargo_json(ws.root, env, "build").check()
        assert res.compiled() and not res.fresh()
        outputs.append(normalize_output(ws.run_app(), ws.root))
        logs.append(read_log(log))
    assert outputs[0] == outputs[1]
    first = [(r, c) for r, c, _k, _d in logs[0] if r != "pass"]
    second = [(r, c, d) for r, c, _k, d in logs[1] if r != "pass"]
    assert first and all(r == "miss" for r, _c in first)
    hits = [c for r, c, _d in second if r == "hit"]
    unexpected = [(c, d) for r, c, d in second if r == "miss" and not d.startswith("path-dependent")]
    assert not unexpected, unexpected
    # registry crates, the git dep, the proc-macro and build scripts are all among the hits
    assert {"regbase", "regdep", "regsys", "gitdep", "build_script_build"} <= set(hits), hits
