"""Issue 2 acceptance: save, fresh clone at the same path, restore, and cargo agrees.

One workspace is built and saved once per module; every test starts from a fresh
clone of it (new mtimes, no target/) on a "cold runner" (CARGO_HOME caches wiped),
restores, and checks cargo's own --message-format=json verdicts.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cargo_util import create_workspace
from rsnap_util import build_and_save, rsnap, one_line_error, stat_tree, cold_runner

# Packages that depend, directly or not, on each workspace crate (fixture layout).
DEPENDENTS = {
    "ws-core": {"ws-core", "ws-util", "ws-gen", "app"},
    "ws-gen": {"ws-gen", "app"},
    "app": {"app"},
}



@pytest.fixture(scope="module")
def saved(registry, gitdep_url, tmp_path_factory):
    """(workspace, store) with a snapshot of `cargo build` + `cargo test --no-run`."""
    ws = create_workspace(tmp_path_factory.mktemp("snap") / "ws", registry.index_url, gitdep_url)
    store, out = build_and_save(ws)
    assert out["files"] > 50
    return ws, store


def test_fresh_clone_restore_compiles_nothing(saved):
    ws, store = saved
    cold_runner(ws)
    res = rsnap(ws, store, "restore", "--json").check().data
    assert res["result"] == "exact"
    assert res["files_written"] > 50
    assert res["sources"]["bumped"] == 0, res["sources"]
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert len(build.units) >= 10
    tests = ws.build("test", "--no-run", "--offline")
    assert tests.all_fresh(), tests.summary()
    assert ws.run_app() == ws.expected_output


@pytest.mark.parametrize("crate,path", [("ws-core", "crates/core/src/lib.rs"), ("app", "crates/app/src/main.rs")])
def test_edit_rebuilds_only_the_crate_and_dependents(saved, crate, path):
    ws, store = saved
    cold_runner(ws)
    old = "pub const REVISION: u32 = 1;" if crate == "ws-core" else "const APP_REVISION: u32 = 1;"
    ws.replace(path, old, old.replace("= 1;", "= 7;"))
    rsnap(ws, store, "restore", "--json").check()
    build = ws.build("build", "--offline")
    assert build.compiled() == DEPENDENTS[crate], build.summary()
    assert not build.scripts_run, build.summary()
    assert "rev=7" in ws.run_app()


def test_edit_after_restore_is_seen(saved):
    ws, store = saved
    cold_runner(ws)
    rsnap(ws, store, "restore", "--json").check()
    ws.replace("crates/core/src/lib.rs", "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 9;")
    build = ws.build("build", "--offline")
    assert build.compiled() == DEPENDENTS["ws-core"], build.summary()
    assert "rev=9" in ws.run_app()


def test_build_script_data_edit_reruns_build_script(saved):
    ws, store = saved
    cold_runner(ws)
    ws.append("crates/gen/data/words.txt", "\nzebra\n")
    rsnap(ws, store, "restore", "--json").check()
    build = ws.build("build", "--offline")
    assert build.scripts_run == {"ws-gen"}, build.summary()
    assert build.compiled() == DEPENDENTS["ws-gen"], build.summary()
    assert "zebra" in ws.run_app()


def test_lockfile_version_bump_rebuilds_that_crate_and_dependents(saved):
    ws, store = saved
    cold_runner(ws)
    res = rsnap(ws, store, "restore", "--json").check().data
    assert res["result"] == "exact"
    ws.cargo("update", "-p", "regdep", "--precise", "1.0.1")
    # A new runner for the bumped lockfile: the key changes, so the restore is partial.
    lock = ws.read("Cargo.lock")
    cold_runner(ws)
    ws.write("Cargo.lock", lock)
    res = rsnap(ws, store, "restore", "--json").check().data
    assert res["result"] == "partial"
    build = ws.build("build")
    assert build.compiled() == {"regdep", "app"}, build.summary()
    assert "1.0.1" in ws.run_app()


def test_restore_onto_current_target_touches_nothing(saved):
    ws, store = saved
    cold_runner(ws)
    rsnap(ws, store, "restore", "--json").check()
    before = stat_tree(ws.target)
    again = rsnap(ws, store, "restore", "--json").check().data
    assert again["files_written"] == 0 and again["files_removed"] == 0
    assert again["metadata_fixed"] == 0
    after = stat_tree(ws.target)
    cargo_files = [p for p in before if not p.startswith(".rsnap/")]
    changed = [p for p in cargo_files if before[p] != after.get(p)]
    assert not changed, changed[:5]
    assert len(cargo_files) > 50


def test_restore_onto_stale_persistent_target_converges(saved):
    """A persistent runner: target holds other artifacts; restore writes the difference and removes extras."""
    ws, store = saved
    cold_runner(ws)
    rsnap(ws, store, "restore", "--json").check()
    junk = ws.target / "debug" / "deps" / "libjunk-0123456789abcdef.rlib"
    junk.write_bytes(b"junk")
    victim = next((ws.target / "debug" / "deps").glob("libws_core-*.rlib"))
    victim.write_bytes(b"corrupted by a previous job")
    res = rsnap(ws, store, "restore", "--json").check().data
    assert res["files_written"] in (1, 2) and res["files_removed"] == 1  # 2: the file and its hard link
    assert not junk.exists()
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert ws.run_app() == ws.expected_output


def save_after_one_line_change(saved, tmp_path, revision: int):
    """CI after a one-line commit, on a copy of the store: restore, edit, build, save."""
    ws, pristine = saved
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    cold_runner(ws)
    rsnap(ws, store, "restore", "--json").check()
    ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", f"const APP_REVISION: u32 = {revision};")
    ws.build("build", "--offline")
    return ws, store, rsnap(ws, store, "save", "--json").check().data


def test_saving_after_a_small_change_writes_little(saved, tmp_path):
    _ws, _store, res = save_after_one_line_change(saved, tmp_path, 3)
    assert res["bytes_written"] < 0.25 * res["bytes_total"], res
    assert res["files_hashed"] < res["files"] / 2, res


def test_save_after_save_rehashes_only_what_cargo_rewrote(saved, tmp_path):
    """Arming gc's usage tracking re-times fingerprint files (their ctime moves); the save that
    arms keeps its stat cache valid across that, so the next save does not re-hash them."""
    ws, store, first = save_after_one_line_change(saved, tmp_path, 4)
    ws.build("build", "--offline")   # fresh: reads every fingerprint (moving atimes), rewrites uplifted .d files
    again = rsnap(ws, store, "save", "--json").check().data
    fingerprints = sum(1 for p in ws.target.rglob("*") if ".fingerprint" in p.parts and p.is_file())
    assert again["blobs_new"] == 0, again
    assert again["files_hashed"] <= 10 < fingerprints, (first, again, fingerprints)


def test_relocated_snapshot_is_a_miss_unless_allowed(saved, tmp_path):
    ws, store = saved
    cold_runner(ws)
    other_home = tmp_path / "other-home"
    shutil.copytree(ws.cargo_home, other_home)
    env = {"CARGO_HOME": str(other_home)}
    key = rsnap(ws, store, "key", "--json").check().data["key"]
    res = rsnap(ws, store, "restore", "--json", "--restore-key", key[:10], env_extra=env).check().data
    assert res["result"] == "miss" and "--allow-relocate" in res["message"]
    assert not (ws.target / "debug").exists()
    res = rsnap(ws, store, "restore", "--json", "--restore-key", key[:10], "--allow-relocate",
                env_extra=env).check().data
    assert res["result"] == "partial" and res["files_written"] > 0


# ---------------------------------------------------------------- bad input

def test_missing_store_is_a_miss_for_restore_and_an_error_for_ls(saved, tmp_path):
    ws, _store = saved
    res = rsnap(ws, tmp_path / "nope", "restore", "--json").check().data
    assert res["result"] == "miss"
    ls = rsnap(ws, tmp_path / "nope", "store", "ls")
    assert ls.returncode == 3
    assert "does not exist" in one_line_error(ls)


def damaged_copy(store: Path, dest: Path, subdir: str, damage) -> Path:
    """A copy of the store with damage(bytes) -> bytes applied to every object under subdir."""
    shutil.copytree(store, dest)
    for obj in (dest / subdir).rglob("*"):
        if obj.is_file():
            obj.write_bytes(damage(obj.read_bytes()))
    return dest


def _flip_middle_byte(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


def _newer_format(data: bytes) -> bytes:
    import zstandard
    doc = json.loads(zstandard.ZstdDecompressor().decompress(data))
    doc["format"] = 99
    return zstandard.ZstdCompressor().compress(json.dumps(doc).encode())


def test_corrupt_blob_costs_its_units_and_build_stays_correct(saved, tmp_path):
    """A corrupt pack is damage (tests/test_damage.py): exit 0, its units left out and rebuilt,
    the restore is complete (a save is allowed), the program right."""
    ws, store = saved
    bad = damaged_copy(store, tmp_path / "store", "packs", _flip_middle_byte)
    cold_runner(ws)
    res = rsnap(ws, bad, "restore", "--json")
    assert res.returncode == 0, res.stderr
    damaged = res.check().data["damaged"]
    assert damaged["corrupt"] >= 1 and damaged["units_left_out"] >= 1, damaged
    assert "corrupt" in res.stderr
    build = ws.build("build")
    assert build.compiled(), build.summary()
    assert ws.run_app() == ws.expected_output
    rsnap(ws, tmp_path / "other", "save").check()


def test_unwritable_target_is_one_line_error(saved):
    ws, store = saved
    cold_runner(ws)
    ws.target.write_text("not a directory")
    res = rsnap(ws, store, "restore")
    assert res.returncode == 4, res.stderr
    one_line_error(res)
    ws.target.unlink()


def test_newer_manifest_format_is_refused(saved, tmp_path):
    ws, store = saved
    newer = damaged_copy(store, tmp_path / "store", "snapshots", _newer_format)
    cold_runner(ws)
    res = rsnap(ws, newer, "restore")
    assert res.returncode == 5
    assert "newer rsnap" in one_line_error(res)
    assert not (ws.target / "debug").exists()


def test_invalid_key_is_a_usage_error(saved):
    ws, store = saved
    res = rsnap(ws, store, "save", "--key", "../../etc")
    assert res.returncode == 2
    one_line_error(res)


def test_save_without_a_build_keeps_the_snapshot_whole(saved, tmp_path):
    """`rsnap restore && rsnap save` (or a retried save) must not let GC call every unit unused."""
    ws, pristine = saved
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    cold_runner(ws)
    first = rsnap(ws, store, "restore", "--json").check().data
    assert first["result"] == "exact"
    again = [rsnap(ws, store, "save", "--json").check().data for _ in range(2)]
    for out in again:
        assert out["gc"]["removed"]["units"] == 0, out["gc"]["removed"]
        assert out["gc"]["signal"]["kind"].startswith("none")
    assert again[0]["files"] == again[1]["files"] > 300
    cold_runner(ws)
    rsnap(ws, store, "restore", "--json").check()
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
