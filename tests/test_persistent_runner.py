"""Issue 14 item 4: restoring onto a target dir that already holds the snapshot (a persistent
runner) skips the walk and the comparison of roots that are exactly as rsnap left them
(rsnap.snapshot.settled), and anything that differs is still compared by content and repaired.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cargo_util import create_workspace
from rsnap_util import rsnap


def _restore(ws, store):
    return rsnap(ws, store, "restore", "--json").check().data


@pytest.fixture
def runner(registry, gitdep_url, tmp_path):
    """A workspace built and saved once: the runner keeps its target dir between jobs."""
    ws = create_workspace(tmp_path / "ws", registry.index_url, gitdep_url)
    ws.build("build")
    store = tmp_path / "store"
    rsnap(ws, store, "save", "--json").check()
    return ws, store


def _a_file(ws, suffix: str) -> Path:
    return next(p for p in sorted((ws.target / "debug" / "deps").iterdir()) if p.name.endswith(suffix))


def test_restore_after_save_is_settled_and_writes_nothing(runner):
    ws, store = runner
    res = _restore(ws, store)
    assert res["settled_roots"] == ["cargo_home", "target"], res
    assert res["files_written"] == 0 and res["files_removed"] == 0
    assert set(res["timings"]) >= {"plan", "manifest", "sources", "total"}
    again = _restore(ws, store)
    assert again["settled_roots"] == ["cargo_home", "target"] and again["files_written"] == 0
    assert ws.build("build", "--offline").all_fresh()
    # a no-op build reads fingerprints (atime moves) and rewrites the uplifted dep-info files
    # (target/debug/*.d: same content, new mtime): the next restore compares and fixes them
    res = _restore(ws, store)
    assert res["files_written"] == 0 and res["metadata_fixed"] >= 1, res
    assert _restore(ws, store)["settled_roots"] == ["cargo_home", "target"]
    assert ws.build("build", "--offline").all_fresh()


def test_same_size_same_mtime_rewrite_is_found_and_repaired(runner):
    ws, store = runner
    _restore(ws, store)
    rlib = _a_file(ws, ".rlib")
    original = rlib.read_bytes()
    st = rlib.stat()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    rlib.write_bytes(bytes(damaged))
    os.utime(rlib, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before: only ctime moved
    res = _restore(ws, store)
    assert "target" not in res["settled_roots"]
    assert res["files_written"] >= 1
    assert rlib.read_bytes() == original
    assert _restore(ws, store)["settled_roots"] == ["cargo_home", "target"]


def test_extra_and_missing_files_are_repaired(runner):
    ws, store = runner
    _restore(ws, store)
    extra = ws.target / "debug" / "deps" / "stray.txt"
    extra.write_text("not in the snapshot")
    gone = _a_file(ws, ".rmeta")
    content = gone.read_bytes()
    gone.unlink()
    crate = next((ws.cargo_home / "registry" / "cache").rglob("*.crate"))
    crate_bytes = crate.read_bytes()
    crate.unlink()
    res = _restore(ws, store)
    assert res["settled_roots"] == []
    assert not extra.exists()
    assert gone.read_bytes() == content
    assert crate.read_bytes() == crate_bytes
    assert ws.build("build", "--offline").all_fresh()


def test_build_after_a_change_then_restore_goes_back_to_the_snapshot(runner):
    """A job built a change and did not save; the next job (at the saved commit) restores."""
    ws, store = runner
    _restore(ws, store)
    path = "crates/core/src/lib.rs"
    old = "pub const REVISION: u32 = 1;"
    ws.replace(path, old, old.replace("= 1;", "= 5;"))
    assert ws.build("build", "--offline").compiled()
    assert "rev=5" in ws.run_app()
    ws.git("checkout", "--", path)  # next job: the saved commit again
    res = _restore(ws, store)
    assert "target" not in res["settled_roots"]
    assert _restore(ws, store)["settled_roots"] == ["cargo_home", "target"]
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert "rev=1" in ws.run_app()


def test_a_new_snapshot_is_settled_after_its_save(runner):
    ws, store = runner
    ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", "const APP_REVISION: u32 = 3;")
    ws.build("build", "--offline")
    saved = rsnap(ws, store, "save", "--json").check().data
    res = _restore(ws, store)
    assert res["snapshot"] == saved["snapshot"]
    assert res["settled_roots"] == ["cargo_home", "target"] and res["files_written"] == 0
    assert ws.build("build", "--offline").all_fresh()


def test_a_damaged_record_falls_back_to_the_full_plan(runner):
    ws, store = runner
    _restore(ws, store)
    (ws.target / ".rsnap" / "settled").write_bytes(b"garbage")
    res = _restore(ws, store)
    assert res["settled_roots"] == [] and res["files_written"] == 0
    assert _restore(ws, store)["settled_roots"] == ["cargo_home", "target"]


def test_cargos_rustc_cache_travels_with_the_snapshot(runner, tmp_path):
    """Issue 15 item 3: without target/.rustc_info.json the first build after a restore re-runs
    cargo's rustc queries. The snapshot carries it; an existing one is never replaced."""
    ws, store = runner
    info = ws.target / ".rustc_info.json"
    text = info.read_text()
    ws.clone_fresh(allow_dirty=True)
    assert not ws.target.exists()
    res = _restore(ws, store)
    assert res["files_written"] > 50
    assert info.read_text() == text
    assert ws.build("build", "--offline").all_fresh()
    info.write_text('{"rustc_fingerprint":0,"outputs":{}}')
    _restore(ws, store)
    assert info.read_text() == '{"rustc_fingerprint":0,"outputs":{}}'  # this machine's own: kept
    assert ws.build("build", "--offline").all_fresh()  # cargo ignores a stale one and rewrites it
    assert info.read_text() != '{"rustc_fingerprint":0,"outputs":{}}'


@pytest.mark.parametrize("field", [{"target": {"../evil": "x"}}, {"home": {".rustc_info.json": "x"}},
                                   {"target": {".rustc_info.json": 7}}, ["x"]])
def test_hostile_rustc_info_is_refused(field):
    from rsnap.errors import FormatError
    from rsnap.repository import manifest as mf
    m = mf.Manifest(key="k", created_ns=1, workspace_root="/w", cargo_home="/h", rsnap_version="0",
                    key_inputs={}, roots=[], sources=[], source_dirs=[], blobs={}, rustc_info={"target": {}})
    m.rustc_info = field
    with pytest.raises(FormatError):
        mf.loads(mf.dumps(m))


def test_discovery_cache_skips_cargo_and_rustc_only_while_nothing_changed(runner):
    """Issue 15 item 2: `cargo metadata` and `rustc -vV` are not run again while every file and
    variable their answers depend on is unchanged; any change runs them."""
    import time
    ws, store = runner
    time.sleep(2.1)  # results are cached only when no input changed within 2 s of the call
    first = _restore(ws, store)  # (the save after the build may have recorded them already)
    again = _restore(ws, store)
    assert again["discovery_cached"] is True and again["key"] == first["key"]
    assert rsnap(ws, store, "save", "--json").check().data["discovery_cached"] is True
    # a config file that moves the target dir appears: cargo is asked, and the new place is used
    ws.write(".cargo/config.toml", '[build]\ntarget-dir = "elsewhere"\n')
    moved = _restore(ws, store)
    assert moved["discovery_cached"] is False
    assert (ws.root / "elsewhere" / "debug").is_dir()
    (ws.root / ".cargo" / "config.toml").unlink()
    back = _restore(ws, store)  # as before the config existed: the first record is right again
    assert back["discovery_cached"] is True and back["result"] == "exact"
    assert ws.build("build", "--offline").all_fresh()
    # the environment counts too
    env = rsnap(ws, store, "restore", "--json", env_extra={"CARGO_TARGET_DIR": str(ws.root / "t2")}).check().data
    assert env["discovery_cached"] is False and (ws.root / "t2" / "debug").is_dir()
    off = rsnap(ws, store, "restore", "--json", env_extra={"RSNAP_NO_DISCOVERY_CACHE": "1"}).check().data
    assert off["discovery_cached"] is False
