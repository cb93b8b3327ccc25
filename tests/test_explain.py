"""Rebuild prediction at restore, `rsnap explain` after the build, and key continuity.

Real cargo builds of the fixture workspace. Each case starts from a fresh clone of the saved
commit, makes one kind of change, restores, and checks that the `rebuild` list equals what cargo
then compiles (fresh:false compiler-artifacts, build-script runs) with a reason naming the file
or setting, and that `rsnap explain` agrees and flags nothing.
"""
from __future__ import annotations

import pytest

from cargo_util import create_workspace, run_cargo_json
from rsnap_util import cargo_sets, one_line_error, rebuild_sets, rsnap


@pytest.fixture(scope="module")
def saved(registry, gitdep_url, tmp_path_factory, layout):
    ws = create_workspace(tmp_path_factory.mktemp("explain") / "ws", registry.index_url, gitdep_url, layout=layout)
    ws.commit("base")
    store = ws.root.parent / "store"
    ws.build().check()
    rsnap(ws, store, "save", "--json").check()
    return ws, store


def _cycle(ws, store, edit, env: dict | None = None):
    """Fresh clone, edit, restore, build, explain: (restore data, build, explain data)."""
    ws.clone_fresh(allow_dirty=True)
    edit(ws)
    restored = rsnap(ws, store, "restore", "--json", env_extra=env).check().data
    build = run_cargo_json(ws.root, {**ws.env, **(env or {})}, "build").check()
    explained = rsnap(ws, store, "explain", "--json", env_extra=env).check().data
    assert rebuild_sets(restored["rebuild"]) == cargo_sets(build), (restored["rebuild"], build.summary())
    assert rebuild_sets(explained["rebuilt"]) == cargo_sets(build), (explained["rebuilt"], build.summary())
    assert explained["mispredicted"] == []
    return restored, build, explained


def _reason(entries, package, kind=None):
    return " ".join(e["reason"] for e in entries if e["package"] == package and kind in (None, e["target"]))


def test_unchanged_checkout_predicts_nothing(saved):
    ws, store = saved
    restored, build, _ = _cycle(ws, store, lambda ws: None)
    assert restored["rebuild"] == [] and build.all_fresh()
    status = rsnap(ws, store, "status", "--json").check().data
    assert status["rebuild"] == []


def test_leaf_edit(saved):
    ws, store = saved
    edit = lambda ws: ws.replace("crates/app/src/main.rs", "APP_REVISION: u32 = 1", "APP_REVISION: u32 = 7")
    restored, build, explained = _cycle(ws, store, edit)
    assert build.compiled() == {"app"}
    assert "crates/app/src/main.rs changed" in _reason(restored["rebuild"], "app")
    assert "crates/app/src/main.rs" in _reason(explained["rebuilt"], "app")


def test_status_predicts_without_restoring(saved):
    ws, store = saved
    ws.clone_fresh(allow_dirty=True)
    ws.replace("crates/core/src/lib.rs", "REVISION: u32 = 1", "REVISION: u32 = 2")
    status = rsnap(ws, store, "status", "--json").check().data
    assert not ws.target.exists() or not any(ws.target.rglob("*.rlib"))
    restored = rsnap(ws, store, "restore", "--json").check().data
    assert rebuild_sets(status["rebuild"]) == rebuild_sets(restored["rebuild"])
    assert {e["package"] for e in status["rebuild"]} == {"ws-core", "ws-util", "ws-gen", "app"}
    text = rsnap(ws, store, "restore").check().stderr
    assert "4 crates will rebuild: ws-core (crates/core/src/lib.rs changed)" in text


def test_build_script_input_edit(saved):
    ws, store = saved
    restored, build, _ = _cycle(ws, store, lambda ws: ws.write("crates/gen/data/words.txt", "zeta eta\n"))
    assert build.scripts_run == {"ws-gen"}
    assert "crates/gen/data/words.txt changed" in _reason(restored["rebuild"], "ws-gen", "run-build-script")


def test_proc_macro_edit(saved):
    ws, store = saved
    edit = lambda ws: ws.replace("crates/macros/src/lib.rs", "stamp v1", "stamp v2")
    restored, build, _ = _cycle(ws, store, edit)
    assert ("ws-macros", "ws_macros", "proc-macro") in build.compiled_units()
    assert "crates/macros/src/lib.rs changed" in _reason(restored["rebuild"], "ws-macros")
    assert "ws-macros" in _reason(restored["rebuild"], "app")


def test_cargo_lock_bump(saved):
    ws, store = saved
    restored, build, explained = _cycle(ws, store, lambda ws: ws.cargo("update", "-p", "regdep", "--precise", "1.0.1"))
    assert restored["result"] == "partial" and "Cargo.lock" in restored["key_differences"]
    assert build.compiled() == {"regdep", "app"}
    assert "Cargo.lock: regdep 1.0.0 -> 1.0.1" in _reason(restored["rebuild"], "regdep")


def test_rustflags_change(saved):
    ws, store = saved
    restored, build, explained = _cycle(ws, store, lambda ws: None, env={"RUSTFLAGS": "--cfg rsnap_test"})
    assert restored["result"] == "partial" and "env RUSTFLAGS" in restored["key_differences"]
    assert "--cfg rsnap_test" in _reason(restored["rebuild"], "ws-core")
    assert "RUSTFLAGS" in _reason(explained["rebuilt"], "ws-core")


def test_new_feature(saved):
    ws, store = saved
    restored, build, _ = _cycle(ws, store, lambda ws: ws.replace("crates/app/Cargo.toml", "default = []", 'default = ["shout"]'))
    assert build.compiled() == {"regdep", "app"}
    assert "+shout" in _reason(restored["rebuild"], "regdep")


def test_file_added_then_removed(saved):
    """Last in this module: it moves the saved commit (and ends with the sources of the start)."""
    ws, store = saved
    from test_never_stale import apply_op
    restored, build, _ = _cycle(ws, store, lambda ws: apply_op(ws, ("core_extra_add", 3)))
    reason = _reason(restored["rebuild"], "ws-core")
    assert "crates/core/src/lib.rs changed" in reason and "crates/core/src/extra.rs added" in reason
    rsnap(ws, store, "save", "--json").check()
    ws.commit("with extra")
    restored, build, _ = _cycle(ws, store, lambda ws: apply_op(ws, ("core_extra_delete", 0)))
    assert "crates/core/src/extra.rs removed" in _reason(restored["rebuild"], "ws-core")
    assert build.compiled() == {"ws-core", "ws-util", "ws-gen", "app"}


def test_explain_without_restore_is_one_line_error(make_workspace, tmp_path):
    ws = make_workspace()
    res = rsnap(ws, tmp_path / "store", "explain")
    assert res.returncode == 4
    assert "no `rsnap restore` recorded" in one_line_error(res)


def test_lockfile_less_workspace_restores_exact(make_workspace, tmp_path):
    ws = make_workspace()
    ws.git("rm", "-q", "--cached", "Cargo.lock")
    ws.append(".gitignore", "Cargo.lock\n")
    ws.commit("no lockfile")
    store = tmp_path / "store"
    ws.clone_fresh()
    assert not ws.path("Cargo.lock").exists()
    assert rsnap(ws, store, "restore", "--json").check().data["result"] == "miss"
    ws.build().check()
    assert ws.path("Cargo.lock").exists()
    saved = rsnap(ws, store, "save", "--json").check().data
    assert saved["key_source"] == "restore"
    again = rsnap(ws, store, "save", "--json").check().data  # the record is consumed
    assert again["key_source"] == "default" and again["key"] != saved["key"]
    ws.clone_fresh()
    restored = rsnap(ws, store, "restore", "--json").check().data
    assert restored["result"] == "exact" and restored["snapshot_key"] == saved["key"]
    ws.build().check()
    other_env = rsnap(ws, store, "save", "--json", env_extra={"CARGO_PROFILE_DEV_OPT_LEVEL": "0"}).check().data
    assert other_env["key_source"] == "default"  # an input besides Cargo.lock changed: not reused
    assert rsnap(ws, store, "save", "--json", "--key", "mine").check().data["key_source"] == "explicit"
