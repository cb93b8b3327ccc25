"""Issue 15.1: a restore leaves out what the coming build replaces or never reads (units certain
to rebuild, incremental dirs of crates no build will compile), and a save after it loses nothing.

Every claim is checked against cargo's own output (units compiled, --message-format=json) and the
files on disk; a full restore (RSNAP_FULL_RESTORE=1) of the same state is the reference.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from cargo_util import create_workspace
from reliability_util import run_killed, run_rsnap, trace_points
from rsnap_util import build_and_save, cold_runner, one_line_error, rsnap

FULL = {"RSNAP_FULL_RESTORE": "1"}
CORE = ("crates/core/src/lib.rs", "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 7;")
APP = ("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", "const APP_REVISION: u32 = 9;")


def tree_digests(root) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            p = os.path.join(dirpath, fn)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def saved(registry, gitdep_url, tmp_path_factory, layout):
    """(workspace, store, incremental dir digests) of `cargo build` + `cargo test --no-run`, per layout."""
    ws = create_workspace(tmp_path_factory.mktemp("partial") / "ws", registry.index_url, gitdep_url, layout=layout)
    store, _out = build_and_save(ws)
    return ws, store, tree_digests(ws.build_dir / "debug" / "incremental")


def _store_copy(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy


def _edited_run(ws, store, edit, env=None):
    """A cold runner with one edit, restored: (restore --json, the build after it)."""
    cold_runner(ws)
    ws.replace(*edit)
    res = rsnap(ws, store, "restore", "--json", env_extra=env).check().data
    assert res["result"] == "exact"
    return res, ws.build("build", "--offline")


@pytest.mark.parametrize("edit,rebuilt", [(APP, {"app"}), (CORE, {"ws-core", "ws-util", "ws-gen", "app"})])
def test_edit_leaves_out_what_is_rebuilt_and_cargo_agrees(saved, edit, rebuilt):
    ws, store, _incr = saved
    full, full_build = _edited_run(ws, store, edit, FULL)
    assert full["skipped"]["units"] == 0 and full["skipped"]["bytes"] == 0
    part, build = _edited_run(ws, store, edit)
    # left out: every unit of the edited crates (their tests too) and idle incremental dirs
    assert part["skipped"]["units"] >= len(rebuilt), part["skipped"]
    assert part["skipped"]["incremental_dirs"] >= 1, part["skipped"]
    assert part["bytes_written"] < full["bytes_written"] - part["skipped"]["bytes"] // 2
    # cargo compiles exactly what it compiles after a full restore, and the result shows the edit
    assert build.compiled() == full_build.compiled() == rebuilt, (build.summary(), full_build.summary())
    assert build.compiled_units() == full_build.compiled_units()
    assert ("rev=7" if edit is CORE else "app rev=9") in ws.run_app()
    # the prediction names the left-out units as rebuilding
    assert {e["package"] for e in part["rebuild"]} >= rebuilt


def test_nothing_changed_leaves_out_only_idle_incremental_dirs(saved):
    ws, store, _incr = saved
    cold_runner(ws)
    res = rsnap(ws, store, "restore", "--json").check().data
    assert res["skipped"]["units"] == 0 and res["skipped"]["incremental_dirs"] >= 2, res["skipped"]
    assert not any((ws.build_dir / "debug" / "incremental").iterdir())
    assert (ws.target / "debug" / "app").is_file()
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert ws.build("test", "--no-run", "--offline").all_fresh()
    assert ws.run_app() == ws.expected_output


def test_save_after_partial_restore_carries_the_left_out_dirs_over(saved, tmp_path):
    """No build between restore and save (a failed job): the new snapshot has every incremental
    file of the old one, byte for byte, and a runner restoring it compiles nothing."""
    ws, pristine, incr = saved
    store = _store_copy(pristine, tmp_path)
    cold_runner(ws)
    res = rsnap(ws, store, "restore", "--json").check().data
    skipped = res["skipped"]["incremental_dirs"]
    out = rsnap(ws, store, "save", "--json").check().data
    assert out["carried_over"]["dirs"] == skipped >= 2, out["carried_over"]
    again = rsnap(ws, store, "save", "--json").check().data  # the record stays good for a retried save
    assert again["carried_over"] == out["carried_over"]
    # a persistent runner: the target is settled with the dirs still left out, and stays so
    settled = rsnap(ws, store, "restore", "--json").check().data
    roots = {"target", "build"} if ws.build_dir != ws.target else {"target"}
    assert set(settled["settled_roots"]) >= roots and settled["files_written"] == 0, settled
    assert rsnap(ws, store, "save", "--json").check().data["carried_over"] == out["carried_over"]
    cold_runner(ws)
    rsnap(ws, store, "restore", "--json", env_extra=FULL).check()
    assert tree_digests(ws.build_dir / "debug" / "incremental") == incr
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()


def test_subset_build_between_restore_and_save_is_not_lost_nor_stale(saved, tmp_path):
    """`cargo build -p ws-core` after a partial restore that left out ws-core and its dependents:
    the save has the rebuilt ws-core; the next runner compiles only the dependents, and right."""
    ws, pristine, _incr = saved
    store = _store_copy(pristine, tmp_path)
    cold_runner(ws)
    ws.replace(*CORE)
    res = rsnap(ws, store, "restore", "--json").check().data
    assert res["skipped"]["units"] >= 4
    ws.build("build", "-p", "ws-core", "--offline")
    # (without --no-gc, gc would drop every unit this build did not use, and their incremental dirs)
    out = rsnap(ws, store, "save", "--json", "--no-gc").check().data
    assert out["carried_over"]["dirs"] >= 1, (res["skipped"], out["carried_over"])  # crates nobody compiled
    cold_runner(ws)
    ws.replace(*CORE)
    rsnap(ws, store, "restore", "--json").check()
    build = ws.build("build", "--offline")
    assert build.compiled() == {"ws-util", "ws-gen", "app"}, build.summary()
    assert "rev=7" in ws.run_app()


def test_partial_restore_killed_then_saved_then_repaired(saved, tmp_path):
    """kill -9 at points of a partial restore (before, while and after leaving things out): save
    refuses, cargo still builds right, the next restore repairs, and its save restores whole."""
    ws, pristine, _incr = saved
    store = _store_copy(pristine, tmp_path)
    cold_runner(ws)
    ws.replace(*APP)
    _res, counts, _names = trace_points(ws, store, tmp_path, "restore", "--json")
    writes = counts["restore.write"]
    points = ["restore.marker:1", f"restore.write:{max(1, writes // 3)}", f"restore.write:{writes}",
              "restore.publish:1", "restore.done:1"]
    missing = [p for p in points if counts[p.split(":")[0]] < int(p.split(":")[1])]
    assert not missing, f"a partial restore no longer passes {missing}: {dict(counts)}"
    for spec in points:
        cold_runner(ws)
        ws.replace(*APP)
        run_killed(ws, store, spec, "restore", "--json")
        save = run_rsnap(ws, store, "save")
        assert save.returncode == 2 and "interrupted" in one_line_error(save), (spec, save.stderr)
        build = ws.build("build")  # online: a killed restore may lack CARGO_HOME's git checkout
        assert "app rev=9" in ws.run_app(), (spec, build.summary())
        again = rsnap(ws, store, "restore", "--json").check().data
        assert again["repaired_interrupted_restore"] is True
        build = ws.build("build", "--offline")  # the snapshot's app, older than the edit, is rebuilt
        assert build.compiled() == {"app"}, (spec, build.summary())
        assert "app rev=9" in ws.run_app()
    rsnap(ws, store, "save", "--json").check()
    cold_runner(ws)
    ws.replace(*APP)
    rsnap(ws, store, "restore", "--json").check()
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert "app rev=9" in ws.run_app()


@pytest.mark.parametrize("damage", ["garbage", "hostile-path", "foreign-blob"])
def test_damaged_record_carries_nothing_and_the_save_stays_whole(saved, tmp_path, damage):
    """The carry-over record lives in the target dir: a damaged or hostile one is ignored (no dir
    carried), the save succeeds, and its snapshot restores and builds fresh."""
    ws, pristine, _incr = saved
    store = _store_copy(pristine, tmp_path)
    cold_runner(ws)
    rsnap(ws, store, "restore", "--json").check()
    record = ws.target / ".rsnap" / "unmaterialized.json"
    doc = json.loads(record.read_text())
    if damage == "garbage":
        record.write_text("{not json")
    elif damage == "hostile-path":
        doc["entries"][0][0] = doc["crate_dirs"][0] + "/../../../../outside"
        record.write_text(json.dumps(doc))
    else:  # a blob location that does not match the entry's size
        digest = next(e[5] for e in doc["entries"] if e[1] == "f")
        doc["blobs"][digest][3] += 1
        record.write_text(json.dumps(doc))
    out = rsnap(ws, store, "save", "--json").check().data
    assert out["carried_over"]["dirs"] == 0
    cold_runner(ws)
    rsnap(ws, store, "restore", "--json").check()
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
