"""Issue 19 acceptance: every layout cargo users run today, with the build dir inside the target dir
and outside the workspace (cargo_util.ALL_LAYOUTS: legacy, legacy-outside, new, new-outside; "new" is
cargo 1.100's layout, built by cargo 1.95 behind -Zbuild-dir-new-layout).

One `cargo build` + `rsnap save` per layout, shared by the module. What cargo did is read from its
own output (--message-format=json `fresh`, -v `Running` lines), what is on disk from the files.
"""
from __future__ import annotations

import os

import pytest

from cargo_util import ALL_LAYOUTS, create_workspace
from rsnap_util import cargo_sets, cold_runner, rebuild_sets, rsnap

CORE = ("crates/core/src/lib.rs", "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 2;")


@pytest.fixture(scope="module")
def saved(registry, gitdep_url, tmp_path_factory):
    """layout -> (workspace, store, its fresh-runner restore --json), each built and saved once."""
    made: dict[str, tuple] = {}

    def get(layout: str):
        if layout not in made:
            # dirs named alike: the paths cargo writes into files are as long on every layout
            base = tmp_path_factory.mktemp(f"L{ALL_LAYOUTS.index(layout)}")
            ws = create_workspace(base / "ws", registry.index_url, gitdep_url, layout=layout)
            ws.build("build")
            store = ws.root.parent / "store"
            rsnap(ws, store, "save", "--json").check()
            cold_runner(ws)
            made[layout] = ws, store, rsnap(ws, store, "restore", "--json").check().data
        return made[layout]
    return get


def _units_on_disk(ws) -> tuple[set, set]:
    """(unit dirs of the new layout, of the legacy layout) in the build dir."""
    new = {p.parent.name for p in ws.build_dir.glob("debug/build/*/*/fingerprint")}
    return new, {p.name for p in ws.build_dir.glob("debug/.fingerprint/*")}


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_fresh_runner_restore_compiles_nothing(saved, layout):
    ws, _store, restored = saved(layout)
    new, legacy = _units_on_disk(ws)
    assert (bool(new), bool(legacy)) == (layout.startswith("new"), layout.startswith("legacy")), (new, legacy)
    assert (ws.build_dir != ws.target) == layout.endswith("-outside")
    assert not ws.build_dir.is_relative_to(ws.root) or not layout.endswith("-outside")
    assert restored["result"] == "exact" and restored["rebuild"] == []
    build = ws.build("build", "--offline")
    assert build.units and all(u.fresh for u in build.units) and not build.scripts_run, build.summary()


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_one_line_lib_change_is_predicted_and_build_script_input_reruns(saved, layout):
    ws, store, _restored = saved(layout)
    cold_runner(ws)
    ws.replace(*CORE)
    restored = rsnap(ws, store, "restore", "--json").check().data
    build = ws.build("build", "--offline")
    assert build.compiled() == {"ws-core", "ws-util", "ws-gen", "app"}, build.summary()
    assert rebuild_sets(restored["rebuild"]) == cargo_sets(build), (restored["rebuild"], build.summary())
    core = next(e for e in restored["rebuild"] if e["package"] == "ws-core")
    assert "crates/core/src/lib.rs changed" in core["reason"]
    assert restored["skipped"]["units"] >= 4  # the partial restore left out what cargo rebuilt
    assert "rev=2" in ws.run_app()
    cold_runner(ws)
    ws.write("crates/gen/data/words.txt", "eta theta\n")
    restored = rsnap(ws, store, "restore", "--json").check().data
    build = ws.build("build", "--offline")
    assert build.scripts_run == {"ws-gen"}, build.summary()
    assert rebuild_sets(restored["rebuild"]) == cargo_sets(build), (restored["rebuild"], build.summary())
    assert "theta" in ws.run_app()
    explained = rsnap(ws, store, "explain", "--json").check().data
    assert explained["mispredicted"] == [], explained["mispredicted"]


@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_uplifts_come_back_as_hard_links_and_cost_no_bytes(saved, layout):
    """cargo hard-links `target/debug/app` to its unit's output in the build dir: with the build dir
    outside the target dir the restore links it there again, and writes no more bytes than with
    the build dir inside."""
    inside_ws, _s, inside = saved(layout)
    ws, _store, outside = saved(f"{layout}-outside")
    for w in (inside_ws, ws):
        cold_runner(w)
        rsnap(w, w.root.parent / "store", "restore", "--json").check()
    app = os.stat(ws.target / "debug" / "app")
    twins = [p for p in ws.build_dir.rglob("app*") if p.is_file() and os.stat(p).st_ino == app.st_ino]
    assert app.st_nlink >= 2 and twins, "target/debug/app is not a hard link into the build dir"
    # the same files, plus cargo's CACHEDIR.TAG of the second dir; cargo's fingerprint JSON spells
    # dependency hashes in decimal, which differ with the build dir's path: a few bytes either way
    # (measured: +4). Uplifts written as copies would add the app binary (megabytes).
    slack = (ws.build_dir / "CACHEDIR.TAG").stat().st_size + 1024
    assert outside["bytes_written"] <= inside["bytes_written"] + slack, (outside["bytes_written"], inside["bytes_written"])
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert os.stat(ws.target / "debug" / "app").st_ino == app.st_ino  # cargo did not re-link it
    # in the manifest: links from the target root into the build root (format 3); inside: format 2
    formats = {}
    for w in (inside_ws, ws):
        m = _newest_manifest(w.root.parent / "store")
        formats[w.layout] = m.format, {e.link_root for r in m.roots for e in r.entries if e.type == "h"}
    assert formats[layout] == (2, {""}) and formats[f"{layout}-outside"][0] == 3, formats
    assert "build" in formats[f"{layout}-outside"][1], formats


def _newest_manifest(store):
    from rsnap.repository import repo
    from rsnap.store import open_store
    st = open_store(str(store), create=False)
    return repo.read_manifest(st, max(repo.list_snapshots(st), key=lambda s: s[2])[0])


def test_hostile_source_outside_the_packages_is_left_alone(saved, tmp_path):
    """A store writer appends a source record naming a file outside the workspace's packages (a
    2020 mtime, any digest): restore moves no such file, says so once, and the build is right."""
    from rsnap.repository import manifest as mf, repo
    from rsnap.store import open_store
    ws, store, _restored = saved("new-outside")
    victim = tmp_path / "victim.rs"
    victim.write_text("fn main() {}\n")
    (tmp_path / "Cargo.toml").write_text("[package]\nname = \"victim\"\n")  # a package, not this workspace's
    before = {p: p.stat().st_mtime_ns for p in (victim, tmp_path / "Cargo.toml")}
    st = open_store(str(store), create=False)
    m = repo.read_manifest(st, repo.find_snapshot(st, rsnap(ws, store, "key", "--json").check().data["key"], [])[0])
    m.sources.append([str(victim), "f", 7, 1_577_836_800 * 10**9, "0" * 32])
    m.source_dirs.append(str(tmp_path))
    m.created_ns += 1  # the newest snapshot of the key
    repo.write_manifest(st, m, mf.dumps(m))
    cold_runner(ws)
    res = rsnap(ws, store, "restore", "--json")
    res.check()
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert res.stderr.count("outside the workspace's packages") == 1, res.stderr
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()


def test_both_layouts_in_one_build_dir(make_workspace, tmp_path):
    """A cargo upgrade: units of the legacy layout and of the new one side by side in one target
    dir. rsnap tells them apart on disk; the snapshot restores fresh for the new cargo, and GC
    drops the legacy units once the new cargo builds without them."""
    from cargo_util import NEW_LAYOUT_ENV
    from rsnap.cargo import target_layout
    ws = make_workspace()
    ws.build("build")
    ws.env.update(NEW_LAYOUT_ENV)
    ws.build("build")
    assert target_layout.layouts_on_disk(ws.target) == {target_layout.LEGACY, target_layout.NEW}
    store = tmp_path / "store"
    rsnap(ws, store, "save", "--json", "--no-gc").check()
    cold_runner(ws)
    restored = rsnap(ws, store, "restore", "--json").check().data
    assert restored["result"] == "exact"
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    saved = rsnap(ws, store, "save", "--json").check().data  # gc: the legacy units were not used
    assert saved["gc"]["removed"]["units"] >= 9, saved["gc"]["removed"]
    assert target_layout.layouts_on_disk(ws.target) == {target_layout.NEW}
    assert ws.build("build", "--offline").all_fresh()
